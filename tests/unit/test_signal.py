"""`sidecar.streams.Signal`, the wake-up between a stream's pump and its writers: every waiter
wakes on a notify, a bounded wait ends False, and waiters that stop waiting (timeout or
cancellation) neither linger in the signal nor disturb the others."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.streams import Signal
from tests.support.waiting import eventually

DEADLINE = 5.0


async def waiting(signal: Signal, count: int) -> None:
    """Return once `count` waiters are listed."""
    await eventually(lambda: signal.waiting >= count, timeout=DEADLINE, what=f"{count} waiters")


async def test_a_notify_wakes_every_waiter_once() -> None:
    signal = Signal()
    waiters = [asyncio.create_task(signal.wait(60.0)) for _ in range(3)]
    await waiting(signal, 3)
    signal.notify()
    async with asyncio.timeout(DEADLINE):
        assert await asyncio.gather(*waiters) == [True, True, True]
    assert signal.waiting == 0
    signal.notify()  # nobody waits: a notify is not remembered for a later wait
    assert await signal.wait(0.01) is False


async def test_a_bounded_wait_ends_false_and_is_no_longer_listed() -> None:
    signal = Signal()
    for _ in range(100):  # an idle stream's heartbeat waits
        assert await signal.wait(0.0) is False
    assert signal.waiting == 0


async def test_a_cancelled_waiter_leaves_the_others_waiting() -> None:
    signal = Signal()
    stays = asyncio.create_task(signal.wait())
    goes = asyncio.create_task(signal.wait(60.0))
    await waiting(signal, 2)
    goes.cancel()
    with pytest.raises(asyncio.CancelledError):
        await goes
    assert signal.waiting == 1
    assert not stays.done()
    signal.notify()
    async with asyncio.timeout(DEADLINE):
        assert await stays is True


async def test_cancelled_after_its_notify_it_is_not_listed_again() -> None:
    signal = Signal()
    task = asyncio.create_task(signal.wait(60.0))
    await waiting(signal, 1)
    signal.notify()
    task.cancel()  # before the task ran again: the wake is lost to it, nothing else is
    with pytest.raises(asyncio.CancelledError):
        await task
    assert signal.waiting == 0
    later = asyncio.create_task(signal.wait(60.0))
    await waiting(signal, 1)
    signal.notify()
    async with asyncio.timeout(DEADLINE):
        assert await later is True


async def test_a_wait_closed_unfinished_leaves_nothing_behind() -> None:
    """A coroutine closed while it waits (a task torn down without a cancel) ends quietly."""
    signal = Signal()
    wait = signal.wait(60.0)
    step = wait.__await__()
    next(step)  # suspended on its future
    assert signal.waiting == 1
    wait.close()
    assert signal.waiting == 0
