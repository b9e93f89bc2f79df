"""One way to run code around a gRPC method handler, whatever its shape: the interceptors
that must act on every call (authentication, metrics) wrap the handler the continuation gives
them, since grpc.aio's interceptors see no call until they return a handler."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

OnError = Callable[[BaseException], None]
"""Told of an exception the wrapped handler raised (then re-raised)."""
Enter = Callable[[Any], Awaitable[OnError | None]]
"""Runs first with the call's context (it may abort the call); returns what to tell of an
exception the handler then raises, if anything."""


def wrapped(handler: Any, enter: Enter) -> Any:
    """A handler of the same shape as `handler` that runs `enter(context)` first."""
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: Any) -> Any:
            on_error = await enter(context)
            try:
                return await inner(request, context)
            except BaseException as e:
                if on_error is not None:
                    on_error(e)
                raise

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary, **kw)
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    inner = handler.unary_stream or handler.stream_stream

    async def streaming(request: Any, context: Any) -> Any:
        on_error = await enter(context)
        try:
            result = inner(request, context)
            if not inspect.isasyncgen(result):
                await result  # a handler that writes with context.write()
                return
            async with contextlib.aclosing(result) as responses:
                async for response in responses:
                    yield response
        except BaseException as e:
            if on_error is not None:
                on_error(e)
            raise

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.stream_stream_rpc_method_handler(streaming, **kw)
