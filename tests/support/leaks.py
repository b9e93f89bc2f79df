"""The task-leak check, defined once and imported by the conftests of async test folders.

(Not in tests/conftest.py: an autouse async fixture would also wrap the sync property tests.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves tasks running: leaked tasks hide shutdown bugs."""
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
    if leaked:
        # grpc finishes cancelled calls in tasks of its own: give those a moment to end.
        await asyncio.wait(leaked, timeout=2.0)
        leaked = [t for t in leaked if not t.done()]
    for t in leaked:
        t.cancel()
    assert not leaked, f"test leaked tasks: {[t.get_name() for t in leaked]}"
