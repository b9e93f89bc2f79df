"""Chaos fixtures: the integration fixtures, a control plane to watch, and the summary table.

Each scenario adds one row (`chaos_table.add(...)`) to a table printed at the end of the run
(by tests/conftest.py):
scenario x (events sent, received, lost, duplicated, seconds to recover).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.server import RunningControlPlane
from tests.integration.conftest import (  # noqa: F401 - fixtures
    http,
    numbered_upstream,
    procs,
    sidecar_factory,
)
from tests.support.chaos import ChaosTable, ReportedChaosTable
from tests.support.control_plane import control_plane_on
from tests.support.leaks import _no_leaked_tasks  # noqa: F401 - autouse fixture


@pytest.fixture
def chaos_table(request: pytest.FixtureRequest) -> ChaosTable:
    """The table scenarios add their row to once their assertions passed (an expected failure
    adds its row before failing). A row goes into the test's report, from which
    tests/conftest.py prints the table at the end of the run, also from xdist workers."""
    return ReportedChaosTable(request.node)


@pytest.fixture
async def control_plane(tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    """An in-process control plane on a SQLite file, for scenarios where it is not the victim."""
    async with control_plane_on("sqlite", tmp_path) as running:
        yield running
