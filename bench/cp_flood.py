"""Abuse floods against a real control-plane process: its peak memory, its log, its rate.

Each flood gets a fresh `tether control-plane` process (the production command, default log
level INFO, its stderr in a file) so that its peak resident memory (`VmHWM` in
`/proc/<pid>/status`, the kernel's own high-water mark: nothing is missed between samples)
belongs to that flood alone. The client sends `--count` items as fast as it can on
`--streams` concurrent ReportEvents calls, in requests of `--batch` items (the sidecar's own
batches are at most 5,000 items), reading every acknowledgement as it comes (a client that
reads its acks keeps the server busiest). Floods:

  updates-known    stream updates for 1,000 sessions created first (increasing positions)
  updates-unknown  stream updates for sessions that were never created (all rejected)
  upserts          upserts of distinct new sessions (each creates one), 256 B `initialize`

After each flood a unary call (`GetSession`) must still answer: the process kept serving.
Figures: peak RSS (MiB), RSS at the end, log lines the process wrote, items/s, rejections.

    python -m bench.cp_flood [--count 1000000] [--store sqlite|etcd|both] [--batch 5000]
    python -m bench --only cp-flood            (the same, inside the harness)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.procs import Child, free_port, python_module, raise_fd_limit
from tether.api.v1 import sessions_pb2 as pb
from tether.api.v1 import sessions_pb2_grpc as pb_grpc

FLOODS = ("updates-known", "updates-unknown", "upserts")
KNOWN_SESSIONS = 1_000
DEFAULT_BATCH = 5_000
DEFAULT_STREAMS = 4
REPORT_METHOD = "/tether.v1.SessionService/ReportEvents"
MANIFEST_LIMIT_MIB = 256
"""`resources.limits.memory` of the control plane in deploy/base/control-plane.yaml."""


@dataclass(frozen=True)
class FloodFigures:
    store: str
    flood: str
    items: int
    batch: int
    streams: int
    seconds: float
    acks: int
    rejections: int
    peak_rss_mib: float
    end_rss_mib: float
    log_lines: int
    serving_after: bool
    errors: tuple[str, ...] = ()
    """Why calls ended early (the flood's items were then not all sent)."""

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


def status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def _position(stream: str, seq: int) -> pb.StreamPosition:
    return pb.StreamPosition(
        stream_id=stream,
        last_event_id=f"{stream}.1.{seq}",
        upstream_event_id=str(seq),
        seq=seq,
        owner_epoch=1,
    )


def _session(sid: str, init: bytes) -> pb.Session:
    return pb.Session(
        session_id=sid,
        upstream_session_id=sid,
        upstream_address="http://flood:8080/mcp",
        owner="flood",
        owner_epoch=1,
        protocol_version="2025-06-18",
        initialize_request=init,
    )


def requests(flood: str, count: int, batch: int, part: int, parts: int) -> Iterator[bytes]:
    """The serialized requests of one stream (`part` of `parts`), built lazily so the client's
    own memory stays flat. Items are numbered across streams so that no two streams repeat."""
    init = b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"x":"' + b"y" * 190 + b'"}}'
    mine = range(part, count, parts)
    for b, start in enumerate(range(0, len(mine), batch), start=1):
        items = mine[start : start + batch]
        if flood == "upserts":
            msg = pb.ReportEventsRequest(
                batch_id=b,
                upserts=[
                    pb.SessionUpsert(session=_session(f"flood-{part}-{i}", init)) for i in items
                ],
            )
        elif flood == "updates-unknown":
            msg = pb.ReportEventsRequest(
                batch_id=b,
                updates=[
                    pb.StreamUpdate(session_id=f"ghost-{i}", position=_position("a", 1))
                    for i in items
                ],
            )
        else:
            msg = pb.ReportEventsRequest(
                batch_id=b,
                updates=[
                    pb.StreamUpdate(
                        session_id=f"known-{i % KNOWN_SESSIONS}",
                        position=_position("a", i // KNOWN_SESSIONS + 1),
                    )
                    for i in items
                ],
            )
        yield msg.SerializeToString()


async def _one_stream(
    channel: grpc.aio.Channel, reqs: Iterator[bytes]
) -> tuple[int, int, str | None]:
    """Send every request of `reqs` on one ReportEvents call, reading acks concurrently;
    returns (acks, rejections, the error that ended the call early or None)."""
    report: Any = channel.stream_stream(
        REPORT_METHOD,
        request_serializer=lambda b: b,
        response_deserializer=pb.ReportEventsResponse.FromString,
    )
    call = report()
    acks = rejections = 0

    async def read() -> None:
        nonlocal acks, rejections
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:  # type: ignore[attr-defined]
                return
            acks += 1
            rejections += len(msg.rejections)

    reader = asyncio.ensure_future(read())
    error: str | None = None
    try:
        for raw in reqs:
            await call.write(raw)
        await call.done_writing()
        await reader
    except (grpc.aio.AioRpcError, grpc.aio.UsageError):
        # The server ended the call (a failed store write, a limit): a figure, not a crash.
        code = await call.code()
        error = f"{code.name}: {await call.details()}"
    finally:
        reader.cancel()
    return acks, rejections, error


async def _create_known(channel: grpc.aio.Channel) -> None:
    init = b'{"jsonrpc":"2.0","method":"initialize"}'
    stub = pb_grpc.SessionServiceStub(channel)
    call = stub.ReportEvents(None)
    upserts = [
        pb.SessionUpsert(session=_session(f"known-{i}", init)) for i in range(KNOWN_SESSIONS)
    ]
    await call.write(pb.ReportEventsRequest(batch_id=1, upserts=upserts))
    ack = await call.read()
    if ack is grpc.aio.EOF or ack.rejections:  # type: ignore[attr-defined]
        raise RuntimeError(f"setup refused: {ack}")
    await call.done_writing()
    await call.read()


async def flood_once(
    *, tmp: Path, store: str, store_url: str, flood: str, count: int, batch: int, streams: int
) -> FloodFigures:
    port = free_port()
    log_path = tmp / f"cp-{store}-{flood}.log"
    cp = Child(
        f"control-plane-{store}-{flood}",
        python_module(
            "tether.cli",
            "control-plane",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            store_url,
        ),
        log_path,
    )
    cp.start()
    try:
        await asyncio.to_thread(cp.wait_port, port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            if flood == "updates-known":
                await _create_known(channel)
            lines_before = _lines(log_path)
            start = time.perf_counter()
            results = await asyncio.gather(
                *(
                    _one_stream(channel, requests(flood, count, batch, part, streams))
                    for part in range(streams)
                )
            )
            seconds = time.perf_counter() - start
            stub = pb_grpc.SessionServiceStub(channel)
            serving = True
            try:
                await stub.GetSession(pb.GetSessionRequest(session_id="known-7"), timeout=30)
            except grpc.aio.AioRpcError as e:
                serving = e.code() == grpc.StatusCode.NOT_FOUND
            peak = status_mib(cp.pid, "VmHWM")
            end = status_mib(cp.pid, "VmRSS")
    finally:
        cp.stop(timeout=10)
    return FloodFigures(
        store=store,
        flood=flood,
        items=count,
        batch=batch,
        streams=streams,
        seconds=seconds,
        acks=sum(r[0] for r in results),
        rejections=sum(r[1] for r in results),
        peak_rss_mib=peak,
        end_rss_mib=end,
        log_lines=_lines(log_path) - lines_before,
        serving_after=serving,
        errors=tuple(sorted({r[2] for r in results if r[2] is not None})),
    )


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


async def run_floods(
    *,
    tmp: Path,
    count: int,
    batch: int = DEFAULT_BATCH,
    streams: int = DEFAULT_STREAMS,
    stores: Sequence[str],
    floods: Sequence[str] = FLOODS,
    log: Callable[[str], None] = lambda _: None,
) -> list[FloodFigures]:
    out: list[FloodFigures] = []
    for store in stores:
        for flood in floods:
            cluster: Any = None
            if store == "etcd":
                from tests.support.etcd import start_etcd

                cluster = await asyncio.to_thread(start_etcd, tmp / f"etcd-{flood}")
                url = cluster.url
            else:
                url = f"sqlite:///{tmp}/flood-{flood}.db"
            try:
                fig = await flood_once(
                    tmp=tmp,
                    store=store,
                    store_url=url,
                    flood=flood,
                    count=count,
                    batch=batch,
                    streams=streams,
                )
            finally:
                if cluster is not None:
                    await asyncio.to_thread(cluster.stop)
            log(
                f"flood {store} {flood}: peak {fig.peak_rss_mib:.0f} MiB, "
                f"{fig.log_lines:,} log lines, {fig.items_per_s:,.0f} items/s"
            )
            out.append(fig)
    return out


def table(figures: Sequence[FloodFigures]) -> Iterator[str]:
    if not figures:
        return
    count, batch, streams = figures[0].items, figures[0].batch, figures[0].streams
    yield (
        f"### Control plane under floods: {count:,} items per flood, {streams} streams, "
        f"{batch:,} items per request"
    )
    yield ""
    yield (
        "| store | flood | items/s | acks | rejections | peak RSS MiB | RSS at end MiB "
        f"| log lines | serving after | peak ≤ {MANIFEST_LIMIT_MIB} MiB | calls ended early |"
    )
    yield "|---|---|---:|---:|---:|---:|---:|---:|:---:|:---:|---|"
    for f in figures:
        ok = f.peak_rss_mib <= MANIFEST_LIMIT_MIB
        yield (
            f"| {f.store} | {f.flood} | {f.items_per_s:,.0f} | {f.acks:,} | {f.rejections:,} "
            f"| {f.peak_rss_mib:.0f} | {f.end_rss_mib:.0f} | {f.log_lines:,} "
            f"| {'yes' if f.serving_after else '**no**'} | {'yes' if ok else '**no**'} "
            f"| {'; '.join(f.errors) or '-'} |"
        )
    yield ""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.cp_flood", description=__doc__)
    p.add_argument("--count", type=int, default=1_000_000, help="items per flood")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="items per request")
    p.add_argument(
        "--streams", type=int, default=DEFAULT_STREAMS, help="concurrent ReportEvents calls"
    )
    p.add_argument("--store", choices=["sqlite", "etcd", "both"], default="both")
    p.add_argument("--only", nargs="+", choices=FLOODS, default=list(FLOODS))
    args = p.parse_args(argv)
    stores = ["sqlite", "etcd"] if args.store == "both" else [args.store]
    if "etcd" in stores:
        from tests.support.etcd import etcd_available

        if not etcd_available():
            print("etcd not installed: SQLite only", file=sys.stderr)
            stores.remove("etcd")
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[cp-flood {time.monotonic() - started:5.1f}s] {msg}", file=sys.stderr, flush=True)

    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="tether-flood-") as tmp:
        figures = asyncio.run(
            run_floods(
                tmp=Path(tmp),
                count=args.count,
                batch=args.batch,
                streams=args.streams,
                stores=stores,
                floods=args.only,
                log=log,
            )
        )
    for line in table(figures):
        print(line)
    cmd = " ".join(["python -m bench.cp_flood", *argv])
    print(f"Command: `{cmd}` ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
