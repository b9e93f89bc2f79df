"""A control plane in its own process that reports its write batcher's counters.

The `tether control-plane` command exposes no counters, so the control-plane benchmark runs
this instead: the same `start_control_plane` (same servicer, batcher and store), plus, on
SIGUSR1, one JSON line on stdout with `writes_received` (updates absorbed, before
coalescing), `writes_flushed` (writes the store made), `flushes` and the process's CPU
seconds. It prints `ready <port>` once serving; SIGTERM stops it gracefully.

    python -m bench.cp_server --store sqlite:///PATH | etcd://H:P [--flush-interval 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence

from bench.procs import self_cpu_seconds
from controlplane.config import ControlPlaneConfig, parse_store_url
from controlplane.server import start_control_plane


async def run(store: str, flush_interval: float) -> None:
    config = ControlPlaneConfig(
        listen="127.0.0.1:0", store=parse_store_url(store), flush_interval=flush_interval
    )
    running = await start_control_plane(config)
    batcher = running.batcher

    def counters() -> None:
        snapshot = {
            "writes_received": batcher.writes_received,
            "writes_flushed": batcher.writes_flushed,
            "flushes": batcher.flushes,
            "cpu_seconds": self_cpu_seconds(),
        }
        print(json.dumps(snapshot), flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, counters)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {running.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await running.stop(grace=1.0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cp_server", description=__doc__)
    p.add_argument("--store", required=True)
    p.add_argument("--flush-interval", type=float, default=0.05)
    args = p.parse_args(argv)
    asyncio.run(run(args.store, args.flush_interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
