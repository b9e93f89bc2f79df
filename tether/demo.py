"""`tether demo`: an example MCP server, a sidecar and a control plane on one machine."""

from __future__ import annotations

import argparse
from typing import Any


def _run(args: argparse.Namespace) -> int:
    print("tether demo: not available in this build yet")
    return 2


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run everything on this machine with the bundled MCP server")
    p.set_defaults(run=_run)
