"""Every option of a command can also come from an environment variable (`TETHER_<DEST>`).

`apply_env_defaults(parser)` turns `--report-interval` into `TETHER_REPORT_INTERVAL`,
`--admin-listen` into `TETHER_ADMIN_LISTEN`, and so on for every option of that parser, so a
container can be configured from a ConfigMap without a shell wrapper. Rules it keeps:

1. A flag on the command line wins over the variable; the variable wins over the built-in
   default. An empty variable counts as unset (how a manifest blanks one out).
2. A variable satisfies a `required=True` option.
3. The variable's text goes through the option's own `type` and `choices`, lazily, when the
   command that owns the option is the one being run: a bad `TETHER_SESSION_TTL` stops
   `tether control-plane` (argparse's usage error, exit 2, naming the variable) and does not
   bother `tether sessions list`.
4. A repeatable option (`action="append"`) takes a comma-separated list from its variable
   (`TETHER_ALLOWED_ORIGIN=https://a.example,https://b.example`); given on the command line,
   the flags replace that list rather than add to it (rule 1). A switch (`store_true`/
   `store_false`) takes the setting's value: 1/0, true/false, yes/no, on/off.
5. Every option gets a variable or the call raises `TypeError` at start-up: an option kind
   this module cannot fill from text (counters, constants, multi-value `nargs`) is a
   programming error to fix here, not a flag that silently has no variable.

Variables are read when the parser is built, so `tether.cli.build_parser()` sees the
environment of the process (tests build a parser after setting variables).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from typing import Any

ENV_PREFIX = "TETHER_"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_SWITCH_KINDS = (argparse._StoreTrueAction, argparse._StoreFalseAction)
# Exact classes: a subclass (a custom action) may do anything with its values.
_SUPPORTED_KINDS = (argparse._StoreAction, argparse._AppendAction, *_SWITCH_KINDS)
_SKIPPED_KINDS = (argparse._HelpAction, argparse._VersionAction)


class EnvText(str):
    """A default that came from an environment variable: the text plus the variable's name.

    argparse converts string defaults through the option's `type` when the flag is absent;
    being a `str` keeps that path, carrying the name lets the error say where the text came from.
    """

    variable: str

    def __new__(cls, text: str, variable: str) -> EnvText:
        self = super().__new__(cls, text)
        self.variable = variable
        return self


class _EnvAwareAppendAction(argparse._AppendAction):
    """An append action whose command-line values replace a list that came from a variable.

    argparse has no hook for this: its append action copies the current value and appends,
    and the current value is the variable's text until argparse converts it. `apply_env_defaults`
    switches the class of existing append actions to this one (same fields, one method more).
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if isinstance(getattr(namespace, self.dest, None), EnvText):
            setattr(namespace, self.dest, None)
        super().__call__(parser, namespace, values, option_string)


def env_var_name(action: argparse.Action, prefix: str = ENV_PREFIX) -> str:
    """`--max-body-bytes` (dest `max_body_bytes`) -> `TETHER_MAX_BODY_BYTES`."""
    return prefix + action.dest.upper()


def _convert_switch(text: str) -> bool:
    """The setting's value, not "was the switch given": `TETHER_COLOUR=off` for a
    `--no-colour` switch (dest `colour`) means colour is False."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _env_aware_type(action: argparse.Action) -> Callable[[str], Any]:
    """Wrap the option's `type`: command-line text behaves exactly as before; text from a
    variable also gets the `choices` check (argparse skips it for defaults) and an error that
    names the variable."""
    original: Callable[[str], Any] = action.type if callable(action.type) else str
    switch = isinstance(action, _SWITCH_KINDS)
    repeatable = isinstance(action, argparse._AppendAction)

    def convert_one(text: EnvText) -> Any:
        try:
            value = _convert_switch(text) if switch else original(str(text))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            kind = "switch" if switch else getattr(original, "__name__", "value")
            reason = str(exc) if isinstance(exc, argparse.ArgumentTypeError) or switch else ""
            raise argparse.ArgumentTypeError(
                f"environment variable {text.variable}={str(text)!r} is not a valid {kind}"
                + (f": {reason}" if reason else "")
            ) from exc
        if action.choices is not None and value not in action.choices:
            allowed = ", ".join(repr(c) for c in action.choices)
            raise argparse.ArgumentTypeError(
                f"environment variable {text.variable}={str(text)!r}: choose from {allowed}"
            )
        return value

    def convert(text: str) -> Any:
        if not isinstance(text, EnvText):
            return original(text)
        if repeatable:
            parts = [part.strip() for part in text.split(",")]
            return [convert_one(EnvText(part, text.variable)) for part in parts if part]
        return convert_one(text)

    # argparse names the type in its own "invalid <type> value" message for command-line text.
    convert.__name__ = getattr(original, "__name__", "value")
    return convert


def apply_env_defaults(
    parser: argparse.ArgumentParser,
    *,
    prefix: str = ENV_PREFIX,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Let every option of `parser` be set by `<prefix><DEST>`; return {flag: variable}.

    Call it once, after the last `add_argument`. Positional arguments and subparsers are left
    alone. The help text of each option gets `[env NAME]` appended so `--help` documents it.
    """
    env = os.environ if environ is None else environ
    names: dict[str, str] = {}
    for action in parser._actions:
        if not action.option_strings or isinstance(action, _SKIPPED_KINDS):
            continue
        if action.dest == argparse.SUPPRESS:
            continue
        if type(action) not in _SUPPORTED_KINDS or action.nargs not in (None, "?", 0):
            raise TypeError(
                f"{action.option_strings[0]}: {type(action).__name__} with nargs={action.nargs!r}"
                " cannot be read from an environment variable"
            )
        name = env_var_name(action, prefix)
        names[action.option_strings[-1]] = name
        if action.help != argparse.SUPPRESS:
            action.help = f"{action.help or ''} [env {name}]".strip()
        action.type = _env_aware_type(action)
        if type(action) is argparse._AppendAction:
            action.__class__ = _EnvAwareAppendAction
        text = env.get(name, "")
        if text == "":
            continue
        # A str default is converted through `type` by argparse only when the flag is absent
        # (rule 1); for switches the same path runs `_convert_switch`.
        action.default = EnvText(text, name)
        action.required = False
    return names
