"""What happened to each Registry call: observed once, then counted (metrics) and logged (one line per call).

:class:`RequestObserver` is a server interceptor: it wraps every
``shardstore.v1.Registry`` handler, measures the call, and hands a
:class:`RequestRecord` to its sinks (:meth:`ServerMetrics.observe
<shardstore.rpc.metrics.ServerMetrics.observe>` and :func:`log_request`).
Health checks and reflection are not observed: probes every few seconds would
drown the request log.

:class:`JsonFormatter` turns any log record into one JSON object per line; the
request log's records carry their fields under ``request`` (``--log-format json``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import grpc

from shardstore.repo.refs import DEFAULT_TAG

REQUEST_LOG = "shardstore.rpc.requests"
OBSERVED_PREFIX = "/shardstore.v1.Registry/"

request_log = logging.getLogger(REQUEST_LOG)


@dataclass
class RequestRecord:
    """One finished call. ``sent_bytes``/``received_bytes``: protobuf bytes of the responses / requests."""

    method: str
    code: str
    seconds: float
    peer: str
    sent_bytes: int = 0
    received_bytes: int = 0
    ref: str | None = None
    manifest_id: str | None = None
    blob_id: str | None = None
    shards: int | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


Sink = Callable[[RequestRecord], None]


def describe_request(request: Any) -> dict[str, Any]:
    """What a request asks for, for the log: the ref, or the object ids (shards by count: there may be thousands)."""
    fields: dict[str, Any] = {}
    name = getattr(request, "name", "")
    if name:
        fields["ref"] = f"{name}:{getattr(request, 'tag', '') or DEFAULT_TAG}"
    for key in ("manifest_id", "blob_id"):
        value = getattr(request, key, "")
        if value:
            fields[key] = value
    shard_ids = getattr(request, "shard_ids", None)
    if shard_ids is not None:
        fields["shards"] = len(shard_ids)
    return fields


def log_request(record: RequestRecord) -> None:
    """The request log: INFO for calls that succeeded or were cancelled by their client, WARNING for errors."""
    level = logging.INFO if record.code in ("OK", "CANCELLED") else logging.WARNING
    if request_log.isEnabledFor(level):
        target = record.ref or record.manifest_id or record.blob_id or (
            f"{record.shards} shards" if record.shards is not None else "")
        request_log.log(level, "%s %s %s %d B %.3f s %s", record.method, target, record.code,
                        record.sent_bytes + record.received_bytes, record.seconds, record.peer,
                        extra={"request": record.as_dict()})


def _size(message: Any) -> int:
    """A response's size on the wire: shard chunks leave already serialized (rpc/chunks.py)."""
    return len(message) if isinstance(message, bytes) else int(message.ByteSize())


class _Call:
    """The measurements of one call in progress."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.context = context
        self.started = time.perf_counter()
        self.sent = 0
        self.received = 0
        self.fields: dict[str, Any] = {}

    def request(self, message: Any) -> None:
        self.received += message.ByteSize()
        if not self.fields:
            self.fields = describe_request(message)

    def finish(self, exc: BaseException | None) -> RequestRecord:
        code = self.context.code()
        if code is None or isinstance(code, int):  # not set by an abort: the handler's outcome decides
            code = (grpc.StatusCode.OK if exc is None else grpc.StatusCode.CANCELLED
                    if isinstance(exc, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN)
        details = self.context.details() if code is not grpc.StatusCode.OK else None
        return RequestRecord(
            method=self.method, code=code.name, seconds=time.perf_counter() - self.started,
            peer=self.context.peer() or "", sent_bytes=self.sent, received_bytes=self.received,
            error=(details.decode(errors="replace") if isinstance(details, bytes) else details) or None,
            **self.fields,
        )


class RequestObserver(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Measures every Registry call and hands a :class:`RequestRecord` to each sink when it ends."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = tuple(sinks)

    def _emit(self, call: _Call, exc: BaseException | None) -> None:
        record = call.finish(exc)
        for sink in self.sinks:
            sink(record)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method_path: str = details.method
        if handler is None or not method_path.startswith(OBSERVED_PREFIX):
            return handler
        method = method_path[len(OBSERVED_PREFIX):]
        wrap = {
            (False, False): (grpc.unary_unary_rpc_method_handler, self._unary, handler.unary_unary),
            (False, True): (grpc.unary_stream_rpc_method_handler, self._streaming, handler.unary_stream),
            (True, False): (grpc.stream_unary_rpc_method_handler, self._unary, handler.stream_unary),
            (True, True): (grpc.stream_stream_rpc_method_handler, self._streaming, handler.stream_stream),
        }
        make_handler, wrapper, behavior = wrap[(handler.request_streaming, handler.response_streaming)]
        return make_handler(wrapper(method, behavior, handler.request_streaming),
                            request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)

    def _requests(self, call: _Call, request: Any, streaming: bool) -> Any:
        if not streaming:
            call.request(request)
            return request

        async def counted() -> AsyncIterator[Any]:
            async for message in request:
                call.request(message)
                yield message

        return counted()

    def _unary(self, method: str, behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(method, context)
            try:
                response = await behavior(self._requests(call, request, streaming), context)
            except BaseException as exc:
                self._emit(call, exc)
                raise
            if response is not None:
                call.sent += _size(response)
            self._emit(call, None)
            return response

        return observed

    def _streaming(self, method: str, behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):
            # A handler that writes through context.write (an inner interceptor relaying a generator):
            # count what it writes through a context that sees each message.
            async def observed_writes(request: Any, context: grpc.aio.ServicerContext) -> None:
                call = _Call(method, context)
                try:
                    await behavior(self._requests(call, request, streaming), _CountingContext(context, call))
                except BaseException as exc:
                    self._emit(call, exc)
                    raise
                self._emit(call, None)

            return observed_writes

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(method, context)
            try:
                async for response in behavior(self._requests(call, request, streaming), context):
                    call.sent += _size(response)
                    yield response
            except BaseException as exc:
                self._emit(call, exc)
                raise
            self._emit(call, None)

        return observed


class _CountingContext:
    """A servicer context that counts the bytes of each message written through it; the rest passes through."""

    def __init__(self, context: grpc.aio.ServicerContext, call: _Call) -> None:
        self._context = context
        self._call = call

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._call.sent += _size(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a request log's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request = getattr(record, "request", None)
        if isinstance(request, dict):
            entry.update(request)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
