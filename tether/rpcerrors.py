"""One line for a failed gRPC call: `str()` of a `grpc.aio.AioRpcError` is a multi-line repr
(`<AioRpcError of RPC that terminated with: status = ... debug_error_string = ...>`), which
splits a log record or a CLI error over several lines."""

from __future__ import annotations

import grpc

MAX_CHARS = 500


def one_line(error: BaseException) -> str:
    """`CODE: details` for a gRPC error, else the error's text; whitespace collapsed, bounded."""
    if isinstance(error, grpc.aio.AioRpcError):
        text = f"{error.code().name}: {error.details() or ''}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())[:MAX_CHARS]
