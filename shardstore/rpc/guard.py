"""The server's gate: every call passes through :class:`CallGuard`, a grpc.aio interceptor.

It does four things that must hold for every RPC, streams included, so no
handler can forget them:

* **access control before any body is read**: the bearer token comes in the
  call's headers; it is checked against the token table and the method's rule
  (:mod:`shardstore.rpc.auth`) before a byte of the request is read, so a call
  without a valid token ends at once and holds nothing; for calls that name a
  model, the name is checked once the request is decoded; refs listed back are
  filtered to what the token may read;
* **capacity is taken only by calls that are moving**: grpc reads a unary
  call's request before its handler runs, and its own ``maximum_concurrent_rpcs``
  counts a call from the moment its headers arrive, so calls that never send
  their message would hold every slot. The guard therefore serves every method
  as a streamed request and reads the first message itself: a call waits in a
  bounded queue for its first message (at most ``first_message_timeout``; when
  the queue is full the *oldest* waiter is dropped, so a flood of stalled calls
  cannot lock newcomers out), and takes one of ``max_calls`` slots, and one of
  ``max_calls_per_peer`` slots of its client address, only once that message
  is in. Later messages of a streamed request must each come within
  ``receive_timeout``;
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
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from shardstore.errors import InvalidInputError, ShardstoreError
from shardstore.rpc.auth import Rule, TokenTable, bearer_token, rule_for
from shardstore.rpc.status import code_for, error_metadata

log = logging.getLogger("shardstore.rpc.guard")

DEFAULT_SEND_TIMEOUT_S = 60.0
_END = object()  # a streamed request that ended before its first message


@dataclass(frozen=True)
class CallLimits:
    """How much of the server calls may take, and for how long they may keep it without moving."""

    # Calls running at once (their request received), server-wide and per client address. The
    # per-peer share keeps one client (or one attacker) from taking the capacity others need.
    max_calls: int = 256
    max_calls_per_peer: int = 64
    # Calls whose first message has not arrived yet. They cost grpc's call state and nothing else;
    # past this many the oldest is dropped, so newcomers (who send at once) always get in.
    max_waiting: int = 1024
    # A client sends its request right after the headers; one that has not after this long never will.
    # Generous: the whole first message must be in (a large manifest over a slow link takes seconds),
    # and a stalled call costs no slot meanwhile, so waiting longer is cheap.
    first_message_timeout: float = 30.0
    # Between two messages of a streamed request (uploads); like the client's idle timeout.
    receive_timeout: float | None = 60.0

    def __post_init__(self) -> None:
        if min(self.max_calls, self.max_calls_per_peer, self.max_waiting) < 1 or self.first_message_timeout <= 0:
            raise InvalidInputError("call limits must be positive")

    @property
    def grpc_ceiling(self) -> int:
        """grpc's own concurrent-call limit: a safety net far above what the guard lets through."""
        return 2 * (self.max_calls + self.max_waiting)


def peer_address(peer: str | None) -> str:
    """The client's address without its port (``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``): limits are per host."""
    if not peer:
        return "unknown"
    kind, _sep, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rpartition(':')[0]}"
    return peer


async def _refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # abort raises


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
    """Access control, call limits, send and receive timeouts and an in-flight count for every call of one server."""

    def __init__(self, registry_service: str, tokens: TokenTable | None = None,
                 send_timeout: float | None = DEFAULT_SEND_TIMEOUT_S, limits: CallLimits | None = None) -> None:
        self.registry_service = registry_service
        self.tokens = tokens
        self.send_timeout = send_timeout
        self.limits = limits or CallLimits()
        self.in_flight = 0  # every call inside the guard, waiting or running
        self.running = 0  # calls holding a slot
        self.dropped_waiting = 0  # calls dropped because the waiting queue was full
        self._per_peer: Counter[str] = Counter()
        self._waiting: OrderedDict[int, asyncio.Future[Any]] = OrderedDict()
        self._next_waiter = 0

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

    @property
    def waiting(self) -> int:
        """Calls waiting for their first message."""
        return len(self._waiting)

    async def _first_message(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        """The call's first request message (or ``_END``), read while the call waits in the bounded queue."""
        read: asyncio.Future[Any] = asyncio.ensure_future(requests.__anext__())
        waiter = self._next_waiter
        self._next_waiter += 1
        self._waiting[waiter] = read
        while len(self._waiting) > self.limits.max_waiting:
            _oldest, stalled = self._waiting.popitem(last=False)
            stalled.cancel()  # its call is refused below, in its own task
            self.dropped_waiting += 1
        try:
            done, _pending = await asyncio.wait({read}, timeout=self.limits.first_message_timeout)
        except BaseException:
            _drop(read)
            raise
        finally:
            self._waiting.pop(waiter, None)
        if not done:
            _drop(read)
            await _refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"no request within {self.limits.first_message_timeout:g} s of the call's headers")
        if read.cancelled():
            await _refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "server busy: too many calls waiting for their request; retry")
        try:
            return read.result()
        except StopAsyncIteration:
            return _END

    async def _take_slot(self, context: grpc.aio.ServicerContext, peer: str) -> None:
        if self.running >= self.limits.max_calls:
            await _refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"server busy: {self.limits.max_calls} calls in progress; retry")
        if self._per_peer[peer] >= self.limits.max_calls_per_peer:
            await _refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"too many calls at once from {peer} (at most {self.limits.max_calls_per_peer}); retry")
        self.running += 1
        self._per_peer[peer] += 1

    def _free_slot(self, peer: str) -> None:
        self.running -= 1
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]

    async def _rest(self, first: Any, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[Any]:
        """A streamed request from its first message on, each later one within the receive timeout."""
        if first is _END:
            return
        yield first
        timeout = self.limits.receive_timeout
        while True:
            try:
                async with asyncio.timeout(timeout):
                    message = await requests.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                await _refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no request message for {timeout:g} s; call dropped")
            yield message

    def _wrap(self, handler: grpc.RpcMethodHandler, token: str | None, rule: Rule | None,
              refused: ShardstoreError | None) -> grpc.RpcMethodHandler:
        """Serve the method as a streamed request, so that nothing is read before the guard decides."""
        guard = self
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
        unary_request = not handler.request_streaming
        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

        async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            with guard._counted():
                if refused is not None:
                    await _abort(context, refused)  # no token, or not enough: nothing is read, nothing held
                first = await guard._first_message(requests, context)
                if unary_request and first is _END:
                    await _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request message")
                peer = peer_address(context.peer())
                await guard._take_slot(context, peer)
                try:
                    if unary_request:
                        try:
                            guard._check(token, rule, first)
                        except ShardstoreError as exc:
                            await _abort(context, exc)
                        produced = inner(first, context)
                    else:
                        produced = inner(guard._rest(first, requests, context), context)
                    if handler.response_streaming:
                        await guard._relay(produced, context)
                        return None
                    return guard._filter_refs(token, rule, await _maybe_await(produced))
                finally:
                    guard._free_slot(peer)

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(call, **codec)
        return grpc.stream_unary_rpc_method_handler(call, **codec)

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
