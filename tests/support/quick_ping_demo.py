"""The demo server (`tether.demo_server`, the official Python SDK's server) with the SDK's SSE
keep-alive interval shortened, for tests that wait for a keep-alive:

    python -m tests.support.quick_ping_demo --ping-interval 1 --port 8080 [demo_server flags]

The SDK pings a quiet 2026-07-28 SSE response (a listen) every `_SSE_PING_INTERVAL` seconds,
15 s, read when each wait starts; it has no public setting for it, so this sets that module
attribute before serving. Nothing else changes: the same server, transport and ping code run,
only sooner. It fails loudly if the SDK no longer has the attribute, rather than waiting 15 s
in silence.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import mcp.server._streamable_http_modern as sdk_modern

from tether.demo_server import main as demo_main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.support.quick_ping_demo")
    p.add_argument("--ping-interval", type=float, required=True, help="seconds")
    args, rest = p.parse_known_args(argv)
    if not isinstance(getattr(sdk_modern, "_SSE_PING_INTERVAL", None), float):
        raise SystemExit("mcp.server._streamable_http_modern._SSE_PING_INTERVAL is gone")
    sdk_modern._SSE_PING_INTERVAL = args.ping_interval
    return demo_main(rest)


if __name__ == "__main__":
    sys.exit(main())
