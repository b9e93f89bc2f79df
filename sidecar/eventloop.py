"""Which asyncio event loop the sidecar runs on.

The standard loop is the default: measured side by side (`python -m bench --only paths
--compare-loops`), uvloop moved 256 B throughput by about 5% and made the p99 latency at
1,000 events/s worse, because the relay's time goes to Python per event, not to the loop's
socket calls. `--event-loop uvloop` stays available to measure that again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from sidecar.config import ConfigError

T = TypeVar("T")

CHOICES = ("asyncio", "uvloop")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: str) -> LoopFactory | None:
    """The factory of the loop named `choice` (None: the standard loop)."""
    if choice not in CHOICES:
        raise ConfigError(f"--event-loop must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise ConfigError("--event-loop uvloop: uvloop is not installed") from None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], factory: LoopFactory | None) -> T:
    """`asyncio.run` on the chosen loop."""
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
