"""`tether.rpcerrors.one_line`: a failed gRPC call is one line, never the AioRpcError repr."""

from __future__ import annotations

import grpc
import pytest

from tests.support.procs import free_port
from tether.api.v1 import sessions_pb2 as pb
from tether.api.v1 import sessions_pb2_grpc
from tether.rpcerrors import MAX_CHARS, one_line


async def test_a_real_unavailable_error_is_one_line() -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        stub = sessions_pb2_grpc.SessionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetSession(pb.GetSessionRequest(session_id="s"), timeout=5)
    assert "\n" in str(caught.value)  # what it replaces
    text = one_line(caught.value)
    assert text.startswith("UNAVAILABLE: ")
    assert "\n" not in text
    assert "AioRpcError" not in text


def test_other_errors_are_collapsed_and_bounded() -> None:
    assert one_line(ValueError("a\n  b")) == "a b"
    assert one_line(KeyError()) == "KeyError"
    assert len(one_line(ValueError("x" * 10_000))) == MAX_CHARS
