"""Run a test's bulk path on each run core (sidecar.runcore rule 1: both give the same)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import pytest

from sidecar import runcore

CORES: list[Literal["c", "python"]] = ["c", "python"]
"""Both cores; "c" fails loudly (ImportError) when the C module was not built."""


@contextmanager
def using(core: Literal["c", "python"]) -> Iterator[None]:
    """`core` in use inside the block, the previous one after it."""
    before = runcore.use(core)
    try:
        yield
    finally:
        runcore.use(before)


@pytest.fixture(scope="module", params=CORES)
def each_run_core(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test of a module that uses this runs once on each core (module scope: the
    property tests draw no fixture per example)."""
    with using(request.param):
        yield request.param
