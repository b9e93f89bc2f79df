"""The `tether` command: `sidecar`, `control-plane`, `sessions` and `demo`.

Each subcommand's flags live beside the code it runs; this module only wires them together so
that `tether --help` lists everything in one place.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tether import __version__
from tether.envflags import apply_env_defaults
from tether.logsetup import LOG_FORMATS, configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Keeps MCP sessions and their SSE streams alive across failures.",
    )
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default: INFO)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text lines, or one JSON object per line (default: text)",
    )
    apply_env_defaults(parser)  # TETHER_LOG_LEVEL, TETHER_LOG_FORMAT
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from sidecar.cli import add_sidecar_parser
    from tether.cli_controlplane import add_control_plane_parser, add_sessions_parser
    from tether.demo import add_demo_parser

    add_sidecar_parser(sub)
    add_control_plane_parser(sub)
    add_sessions_parser(sub)
    add_demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format, sys.stderr)
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
