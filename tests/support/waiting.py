"""Waiting for a condition, with a deadline: the tests' one way to wait for something to
become true (no sleep as synchronisation).

`await eventually(lambda: sidecar.proxy.active_streams >= 2, timeout=10, what="two streams")`
polls the check until it returns something truthy and returns that, or raises `TimeoutError`
naming `what` after `timeout` seconds. The check may be a coroutine function (a probe over the
network); exceptions listed in `ignoring` mean "not yet" (a server still starting), and the
last one is chained to the `TimeoutError`. The deadline bounds the whole wait, a hung probe
included. Sleeps that are the scenario (an outage's length, a pace) are not waits: they stay
where they are, with a comment saying so.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")

POLL_S = 0.01


@overload
async def eventually(
    check: Callable[[], Awaitable[T]],
    *,
    timeout: float,
    interval: float = POLL_S,
    ignoring: tuple[type[Exception], ...] = (),
    what: str = "the condition",
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T],
    *,
    timeout: float,
    interval: float = POLL_S,
    ignoring: tuple[type[Exception], ...] = (),
    what: str = "the condition",
) -> T: ...


async def eventually(
    check: Callable[[], object],
    *,
    timeout: float,
    interval: float = POLL_S,
    ignoring: tuple[type[Exception], ...] = (),
    what: str = "the condition",
) -> object:
    """Poll `check()` every `interval` s until it is truthy; return its value."""
    last_error: Exception | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    result = check()
                    if inspect.isawaitable(result):
                        result = await result
                except ignoring as e:
                    last_error = e
                else:
                    if result:
                        return result
                await asyncio.sleep(interval)  # the poll interval; the deadline bounds it
    except TimeoutError:
        raise TimeoutError(f"{what}: not reached within {timeout} s") from last_error
