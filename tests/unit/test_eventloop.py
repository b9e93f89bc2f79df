"""`--event-loop`: the standard loop by default, uvloop on request, a clear error otherwise."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from sidecar.config import ConfigError
from sidecar.eventloop import loop_factory, run


async def _loop_type() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_is_the_standard_loop() -> None:
    factory = loop_factory("asyncio")
    assert factory is None
    assert run(_loop_type(), factory).startswith("asyncio")


def test_unknown_loop_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="must be one of asyncio, uvloop"):
        loop_factory("trio")


def test_uvloop_runs_on_uvloop_or_says_it_is_missing() -> None:
    if importlib.util.find_spec("uvloop") is None:
        with pytest.raises(ConfigError, match="uvloop is not installed"):
            loop_factory("uvloop")
    else:
        assert run(_loop_type(), loop_factory("uvloop")).startswith("uvloop")
