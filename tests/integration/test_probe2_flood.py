"""Outside probe of the control plane's abuse limits (issue 11): one caller, as many report
streams as its host may open, requests as large as gRPC admits, and never an ack read. A real
`tether control-plane` process (the production command) on SQLite; its peak resident memory
is read from /proc. The assertion that
failed, since fixed, is marked "Fixed"."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import grpc

from bench.cp_flood import MANIFEST_LIMIT_MIB, REPORT_METHOD, status_mib
from bench.procs import Child, free_port, python_module
from controlplane.limits import MAX_MESSAGE_BYTES
from tether.api.v1 import sessions_pb2 as pb
from tether.api.v1 import sessions_pb2_grpc as pb_grpc

ITEMS = 4_000
REQUESTS_PER_STREAM = 8
FLOOD_S = 20.0
STREAMS = MANIFEST_CALLS_PER_PEER = 8
"""All that one host may open. Measured peaks of the control plane when this test was written
(commit 16edff5, 64 calls per host, gRPC's dynamic flow-control window): 1 stream 119 MiB, 4:
221, 16: 536, 64: 2,078 MiB. What bounds it now: no BDP probing (gRPC buffers a stream's
messages only as far as its 64 KiB window), a shared read-ahead of 8 MiB, and the manifests'
8 streaming calls per host (`--max-calls-per-peer`)."""


def big_request(batch_id: int) -> bytes:
    """Updates for sessions that do not exist (cheap to refuse, one rejection each), padded
    to just under the 4 MiB message limit."""
    pad = "x" * ((MAX_MESSAGE_BYTES - 64 * 1024) // ITEMS - 60)
    msg = pb.ReportEventsRequest(
        batch_id=batch_id,
        updates=[
            pb.StreamUpdate(
                session_id=f"ghost-{batch_id}-{i}",
                position=pb.StreamPosition(
                    stream_id="a", last_event_id=f"a.1.1{pad}", seq=1, owner_epoch=1
                ),
            )
            for i in range(ITEMS)
        ],
    )
    raw = msg.SerializeToString()
    assert len(raw) < MAX_MESSAGE_BYTES
    return raw


async def test_a_caller_that_never_reads_acks_stays_within_the_memory_limit(
    tmp_path: Path,
) -> None:
    port = free_port()
    cp = Child(
        "control-plane",
        python_module(
            "tether.cli",
            "control-plane",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            f"sqlite:///{tmp_path / 'sessions.db'}",
            # What the manifests set (deploy/base/kustomization.yaml): all one host may open.
            "--max-calls-per-peer",
            str(MANIFEST_CALLS_PER_PEER),
        ),
        tmp_path / "cp.log",
    )
    cp.start()
    try:
        await asyncio.to_thread(cp.wait_port, port)
        requests = [big_request(b) for b in range(1, REQUESTS_PER_STREAM + 1)]
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        ) as channel:
            report: Any = channel.stream_stream(
                REPORT_METHOD,
                request_serializer=lambda b: b,
                response_deserializer=pb.ReportEventsResponse.FromString,
            )
            calls = [report() for _ in range(STREAMS)]

            async def flood(call: Any) -> None:
                with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                    for raw in requests:
                        await call.write(raw)  # and never read an ack

            writers = [asyncio.ensure_future(flood(c)) for c in calls]
            await asyncio.wait(writers, timeout=FLOOD_S)
            peak = status_mib(cp.pid, "VmHWM")
            stub = pb_grpc.SessionServiceStub(channel)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.GetSession(pb.GetSessionRequest(session_id="x"), timeout=30)
            for w in writers:
                w.cancel()
            for c in calls:
                c.cancel()
    finally:
        cp.stop(timeout=10)
    print(f"peak RSS {peak:.0f} MiB")
    assert peak < MANIFEST_LIMIT_MIB, f"peak RSS {peak:.0f} MiB"  # Fixed
