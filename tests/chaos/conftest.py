"""Chaos fixtures: the integration fixtures, a control plane to watch, and the summary table.

Each scenario adds one row (`chaos_table.add(...)`) to a table printed at the end of the run:
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
from tests.support.chaos import ChaosTable
from tests.support.control_plane import control_plane_on
from tests.support.leaks import _no_leaked_tasks  # noqa: F401 - autouse fixture

_TABLE = pytest.StashKey[ChaosTable]()


@pytest.fixture(scope="session")
def chaos_table(pytestconfig: pytest.Config) -> ChaosTable:
    """The session's table; scenarios append their row once their assertions passed (an
    expected failure appends its row before failing)."""
    return pytestconfig.stash.setdefault(_TABLE, ChaosTable())


@pytest.fixture
async def control_plane(tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    """An in-process control plane on a SQLite file, for scenarios where it is not the victim."""
    async with control_plane_on("sqlite", tmp_path) as running:
        yield running


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    table = terminalreporter.config.stash.get(_TABLE, None)
    if table is None or not table.rows:
        return
    terminalreporter.write_sep("=", "chaos scenarios")
    for line in table.render():
        terminalreporter.write_line(line)
    terminalreporter.write_line(
        "recover_s: seconds from the end of the fault (replacement listening, link up; for the "
        "etcd leader, the kill) to recovery: the client's next new event, or for control-plane "
        "faults the store holding the client's position at that moment; - = never (xfail)"
    )
