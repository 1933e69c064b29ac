"""The server's gate: every call passes through :class:`CallGuard`, a grpc.aio interceptor.

It does three things that must hold for every RPC, streams included, so no
handler can forget them:

* **access control**: the bearer token is checked against the token table and
  the method's rule (:mod:`shardstore.rpc.auth`) before the handler runs; for
  calls that name a model, once the request is decoded; refs listed back are
  filtered to what the token may read;
* **a stalled reader cannot pin a handler**: each message a server-streaming
  handler yields must be taken by the transport within ``send_timeout``
  seconds (a client that stops reading fills the HTTP/2 window and then the
  write waits); past that the handler is cancelled and closed, freeing what
  it held (prefetched shards, the stream count, its concurrency slot);
* **bookkeeping**: ``in_flight`` counts calls in progress; tests and the load
  benchmark watch it return to zero after cancellations.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from shardstore.errors import ShardstoreError
from shardstore.rpc.auth import Rule, TokenTable, bearer_token, rule_for
from shardstore.rpc.status import code_for, error_metadata

log = logging.getLogger("shardstore.rpc.guard")

DEFAULT_SEND_TIMEOUT_S = 60.0


async def _abort(context: grpc.aio.ServicerContext, exc: ShardstoreError) -> None:
    context.set_trailing_metadata(error_metadata(exc))
    await context.abort(code_for(exc), str(exc))


def _drop(write: asyncio.Future[Any]) -> None:
    """Cancel a write nobody will await, and collect its outcome so that asyncio does not report it as lost."""
    write.cancel()
    write.add_done_callback(lambda done: done.cancelled() or done.exception())


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class CallGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Access control, send timeouts and an in-flight count for every call of one server."""

    def __init__(self, registry_service: str, tokens: TokenTable | None = None,
                 send_timeout: float | None = DEFAULT_SEND_TIMEOUT_S) -> None:
        self.registry_service = registry_service
        self.tokens = tokens
        self.send_timeout = send_timeout
        self.in_flight = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        token: str | None = None
        rule: Rule | None = None
        refused: ShardstoreError | None = None
        if self.tokens is not None:
            try:
                rule = rule_for(details.method, self.registry_service)
                if rule is not None:
                    token = bearer_token(details.invocation_metadata)
                    self.tokens.authorize(token, rule.scope)  # the scope alone; the model name comes with the request
            except ShardstoreError as exc:
                refused = exc
        return self._wrap(handler, token, rule, refused)

    def _check(self, token: str | None, rule: Rule | None, request: Any) -> None:
        if self.tokens is not None and rule is not None and rule.name_field is not None:
            self.tokens.authorize(token, rule.scope, getattr(request, rule.name_field))

    def _filter_refs(self, token: str | None, rule: Rule | None, response: Any) -> Any:
        if self.tokens is None or rule is None or not rule.filters_refs:
            return response
        prefixes = [g.prefix for g in self.tokens.authorize(token, rule.scope)]
        if "" not in prefixes:
            kept = [e for e in response.refs if any(e.name.startswith(p) for p in prefixes)]
            del response.refs[:]
            response.refs.extend(kept)
        return response

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def _admit(self, context: grpc.aio.ServicerContext, token: str | None, rule: Rule | None,
                     refused: ShardstoreError | None, request: Any = None) -> None:
        """Abort the call unless its token may make it (and, given a request, may touch the model it names)."""
        if refused is not None:
            await _abort(context, refused)
        if request is not None:
            try:
                self._check(token, rule, request)
            except ShardstoreError as exc:
                await _abort(context, exc)

    def _wrap(self, handler: grpc.RpcMethodHandler, token: str | None, rule: Rule | None,
              refused: ShardstoreError | None) -> grpc.RpcMethodHandler:
        guard = self
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with guard._counted():
                    await guard._admit(context, token, rule, refused, request)
                    return guard._filter_refs(token, rule, await _maybe_await(inner_uu(request, context)))

            return grpc.unary_unary_rpc_method_handler(unary_unary, **codec)

        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                with guard._counted():
                    await guard._admit(context, token, rule, refused, request)
                    await guard._relay(inner_us(request, context), context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, **codec)

        # Streamed requests (uploads) carry content-addressed objects and name no model: the scope is the check.
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                with guard._counted():
                    await guard._admit(context, token, rule, refused)
                    return await _maybe_await(inner_su(requests, context))

            return grpc.stream_unary_rpc_method_handler(stream_unary, **codec)

        inner_ss = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
            with guard._counted():
                await guard._admit(context, token, rule, refused)
                await guard._relay(inner_ss(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, **codec)

    async def _relay(self, produced: Any, context: grpc.aio.ServicerContext) -> None:
        """Write what a streaming handler yields, each message within the send timeout."""
        if not inspect.isasyncgen(produced):
            await _maybe_await(produced)  # a handler that writes through context.write itself
            return
        # aclosing: when this call ends early (cancelled, timed out) the handler's generator is
        # closed now, running its cleanup (prefetch cancelled, counters restored), not whenever GC gets to it.
        async with contextlib.aclosing(produced) as messages:
            async for message in messages:
                write = asyncio.ensure_future(context.write(message))
                try:
                    done, _pending = await asyncio.wait({write}, timeout=self.send_timeout)
                except BaseException:  # this call was cancelled (client gone, deadline): so is its write
                    _drop(write)
                    raise
                if not done:
                    _drop(write)
                    log.warning("%s: client took no data for %g s; handler dropped", context.peer(), self.send_timeout)
                    # grpc cannot send a status while a write is stuck (it would queue behind the write), so
                    # the handler is cancelled instead: what it holds is freed now, and the call itself ends
                    # with the client's deadline, keepalive, or connection.
                    raise asyncio.CancelledError
                await write  # its error, if any
