"""`tether control-plane` and `tether sessions`: built by the control-plane work (issue 3)."""

from __future__ import annotations

import argparse
from typing import Any


def _not_yet(args: argparse.Namespace) -> int:
    print(f"tether {args.command}: not available in this build yet")
    return 2


def add_control_plane_parser(sub: Any) -> None:
    p = sub.add_parser("control-plane", help="run the control plane (gRPC)")
    p.set_defaults(run=_not_yet)


def add_sessions_parser(sub: Any) -> None:
    p = sub.add_parser("sessions", help="list, get, watch or delete sessions")
    p.set_defaults(run=_not_yet)
