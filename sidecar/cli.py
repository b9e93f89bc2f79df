"""`tether sidecar`: flags map one to one onto `SidecarConfig`."""

from __future__ import annotations

import argparse
from typing import Any


def _run(args: argparse.Namespace) -> int:
    print("tether sidecar: not available in this build yet")
    return 2


def add_sidecar_parser(sub: Any) -> None:
    p = sub.add_parser("sidecar", help="run the sidecar proxy in front of an MCP server")
    p.set_defaults(run=_run)
