"""The `tether` command: `sidecar`, `control-plane`, `sessions`, `injector`, `demo`, `inject`,
`uninject`.

Each subcommand's flags live beside the code it runs; this module only wires them together so
that `tether --help` lists everything in one place.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tether import __version__
from tether.envflags import apply_env_defaults
from tether.logsetup import LOG_FORMATS, configure_logging

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already states one or there
    is none to state (no value, a switch that is off, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or not action.option_strings
            or default is None
            or default is False
            or default in (argparse.SUPPRESS, [])
            or action.nargs == 0
        ):
            return text
        return f"{text} (default: %(default)s)"


def _add_log_level(parser: argparse.ArgumentParser, *, top: bool) -> None:
    parser.add_argument(
        "--log-level",
        default="INFO" if top else argparse.SUPPRESS,
        type=str.upper,
        choices=LOG_LEVELS,
        # Below the top level the variable is read by the top-level flag (one place).
        help="logging threshold (default: INFO)" + ("" if top else " [env TETHER_LOG_LEVEL]"),
    )


def _add_log_format(parser: argparse.ArgumentParser, *, top: bool) -> None:
    parser.add_argument(
        "--log-format",
        default="text" if top else argparse.SUPPRESS,
        choices=LOG_FORMATS,
        help="text lines, or one JSON object per line (default: text)"
        + ("" if top else " [env TETHER_LOG_FORMAT]"),
    )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below `parser`, depth first."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subparsers(child)]
    return found


COMMANDS = {
    "sidecar": ("sidecar.cli", "add_sidecar_parser"),
    "control-plane": ("tether.cli_controlplane", "add_control_plane_parser"),
    "sessions": ("tether.cli_controlplane", "add_sessions_parser"),
    "injector": ("tether.injector", "add_injector_parser"),
    "demo": ("tether.demo", "add_demo_parser"),
    "inject": ("tether.cli_inject", "add_inject_parsers"),
    "uninject": ("tether.cli_inject", "add_inject_parsers"),
}
"""Each subcommand's (module, function adding its parser), in `tether --help` order. A run of
one command imports only its module: the sidecar does not carry the control plane's server,
the demo's or the injector's code in its memory (issue 16)."""


def _command_in(argv: Sequence[str]) -> str:
    """The subcommand `argv` names, or "" when top-level help or version comes first (every
    command is listed then)."""
    args = iter(argv)
    for arg in args:
        if arg in ("--log-level", "--log-format"):
            next(args, None)
        elif not arg.startswith("-"):
            return arg
        elif not arg.startswith(("--log-level=", "--log-format=")):
            return ""
    return ""


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; given the `argv` it will parse, only the subcommand it names
    (which parses `argv` exactly as the whole one would)."""
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Keeps MCP sessions and their SSE streams alive across failures.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    _add_log_level(parser, top=True)
    _add_log_format(parser, top=True)
    apply_env_defaults(parser)  # TETHER_LOG_LEVEL, TETHER_LOG_FORMAT
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = COMMANDS.get(_command_in(argv)) if argv is not None else None
    for module, adder in (wanted,) if wanted else dict.fromkeys(COMMANDS.values()):
        getattr(importlib.import_module(module), adder)(sub)
    for child in _subparsers(parser):
        child.formatter_class = DefaultsHelpFormatter
        # `tether sidecar --log-level debug --log-format json` too: given after the
        # subcommand they win; absent there, they leave the top-level values (or
        # TETHER_LOG_LEVEL, TETHER_LOG_FORMAT) alone.
        _add_log_level(child, top=False)
        _add_log_format(child, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format, sys.stderr)
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
