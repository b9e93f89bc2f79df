"""`tether.envflags`: options filled from `TETHER_*` variables, flags winning, errors naming the
variable. Pure argparse, no processes (the real CLI in a subprocess is in tests/integration)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tether.cli import build_parser
from tether.envflags import apply_env_defaults


def toy_parser(env: dict[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy", exit_on_error=True)
    p.add_argument("--listen", required=True, help="where")
    p.add_argument("--ttl", type=float, default=60.0)
    p.add_argument("--mode", choices=["a", "b"], default="a")
    p.add_argument("--max-items", type=int, default=3)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--colour", dest="colour", action="store_false")
    p.add_argument("--origin", action="append", default=[])
    p.add_argument("--port", action="append", type=int)
    p.add_argument("name", nargs="?")
    apply_env_defaults(p, environ=env)
    return p


def test_variables_fill_options_with_their_types() -> None:
    env = {
        "TETHER_LISTEN": "0.0.0.0:1",
        "TETHER_TTL": "2.5",
        "TETHER_MODE": "b",
        "TETHER_MAX_ITEMS": "7",
        "TETHER_VERBOSE": "yes",
        "TETHER_COLOUR": "off",
    }
    args = toy_parser(env).parse_args([])
    assert vars(args) == {
        "listen": "0.0.0.0:1",
        "ttl": 2.5,
        "mode": "b",
        "max_items": 7,
        "verbose": True,
        "colour": False,
        "origin": [],
        "port": None,
        "name": None,
    }
    assert type(args.listen) is str  # not the EnvText carrier


def test_repeatable_options_take_a_comma_separated_list() -> None:
    env = {"TETHER_LISTEN": "h:1", "TETHER_ORIGIN": "https://a, https://b", "TETHER_PORT": "1,2"}
    args = toy_parser(env).parse_args([])
    assert args.origin == ["https://a", "https://b"]
    assert args.port == [1, 2]
    # Flags replace the variable's list; they do not add to it.
    args = toy_parser(env).parse_args(["--origin", "https://c", "--origin", "https://d"])
    assert args.origin == ["https://c", "https://d"]
    assert args.port == [1, 2]
    assert toy_parser({"TETHER_LISTEN": "h:1"}).parse_args(["--port", "3"]).port == [3]


def test_flags_win_over_variables_and_variables_over_defaults() -> None:
    env = {"TETHER_LISTEN": "env:1", "TETHER_TTL": "5"}
    args = toy_parser(env).parse_args(["--listen", "flag:2"])
    assert (args.listen, args.ttl, args.max_items) == ("flag:2", 5.0, 3)


def test_a_bad_flag_is_not_judged_by_the_variable() -> None:
    # The variable is bad, but the flag given replaces it: nothing to complain about.
    args = toy_parser({"TETHER_LISTEN": "x", "TETHER_TTL": "soon"}).parse_args(["--ttl", "1"])
    assert args.ttl == 1.0


def test_empty_variable_counts_as_unset() -> None:
    p = toy_parser({"TETHER_LISTEN": "", "TETHER_TTL": ""})
    with pytest.raises(SystemExit):
        p.parse_args([])  # --listen is still required
    assert p.parse_args(["--listen", "h:1"]).ttl == 60.0


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TETHER_TTL": "soon"}, "environment variable TETHER_TTL='soon' is not a valid float"),
        ({"TETHER_MAX_ITEMS": "1.5"}, "TETHER_MAX_ITEMS='1.5' is not a valid int"),
        ({"TETHER_MODE": "c"}, "TETHER_MODE='c': choose from 'a', 'b'"),
        ({"TETHER_VERBOSE": "maybe"}, "TETHER_VERBOSE='maybe' is not a valid"),
        ({"TETHER_PORT": "1,x"}, "TETHER_PORT='x' is not a valid int"),
    ],
)
def test_bad_variable_is_a_usage_error_naming_it(
    env: dict[str, str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        toy_parser({"TETHER_LISTEN": "h:1", **env}).parse_args([])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_bad_command_line_value_keeps_argparse_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        toy_parser({}).parse_args(["--listen", "h:1", "--ttl", "soon"])
    assert "argument --ttl: invalid float value: 'soon'" in capsys.readouterr().err


def test_help_names_the_variable() -> None:
    assert "[env TETHER_MAX_ITEMS]" in toy_parser({}).format_help()


def test_option_kinds_without_a_text_form_are_refused() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--verbosity", action="count")
    with pytest.raises(TypeError, match="--verbosity"):
        apply_env_defaults(p, environ={})


def _subcommand(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices[name]
    return parser


@pytest.mark.parametrize("command", ["sidecar", "control-plane", "injector"])
def test_every_option_of_the_servers_has_a_variable(command: str) -> None:
    for action in _subcommand(command)._actions:
        if action.option_strings and action.dest != "help":
            variable = "TETHER_" + action.dest.upper()
            assert action.help is not None
            assert f"[env {variable}]" in action.help, action.option_strings


def test_real_parsers_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_LISTEN", "0.0.0.0:8080")
    monkeypatch.setenv("TETHER_UPSTREAM", "http://127.0.0.1:3000")
    monkeypatch.setenv("TETHER_REPLAY_EVENTS", "64")
    monkeypatch.setenv("TETHER_STORE", "sqlite:////data/sessions.db")
    monkeypatch.setenv("TETHER_SESSION_TTL", "120")
    sidecar = build_parser().parse_args(["sidecar"])
    assert (sidecar.listen, sidecar.upstream, sidecar.replay_events) == (
        "0.0.0.0:8080",
        "http://127.0.0.1:3000",
        64,
    )
    cp = build_parser().parse_args(["control-plane", "--session-ttl", "30"])
    assert (cp.listen, cp.store, cp.session_ttl) == (
        "0.0.0.0:8080",
        "sqlite:////data/sessions.db",
        30.0,
    )


def test_readme_table_lists_every_variable() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for command in ("sidecar", "control-plane", "injector"):
        for action in _subcommand(command)._actions:
            if action.option_strings and action.dest != "help":
                variable = "TETHER_" + action.dest.upper()
                row = f"| `{variable}` | `{action.option_strings[-1]}"
                assert row in readme, row
