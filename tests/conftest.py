"""Shared test configuration. Integration fixtures live in tests/integration/conftest.py.

The chaos suite's summary table is printed from here rather than from tests/chaos/conftest.py:
with pytest-xdist the scenarios run in worker processes, and the controller, which prints the
terminal summary, loads only this conftest. A scenario's row travels to it inside the test's
report (`user_properties`, named `CHAOS_ROW`), which xdist sends to the controller; without
xdist the same path is taken in one process.
"""

from __future__ import annotations

from typing import Any

import pytest

CHAOS_ROW = "chaos_row"
"""The `user_properties` name of a chaos scenario's row (a `ChaosRow` as a dict)."""

_chaos_rows: list[dict[str, Any]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        for name, value in report.user_properties:
            if name == CHAOS_ROW:
                assert isinstance(value, dict), value
                _chaos_rows.append(value)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _chaos_rows:
        return
    from tests.support.chaos import ChaosRow, ChaosTable

    table = ChaosTable([ChaosRow(**row) for row in _chaos_rows])
    terminalreporter.write_sep("=", "chaos scenarios")
    for line in table.render():
        terminalreporter.write_line(line)
    terminalreporter.write_line(
        "recover_s: seconds from the end of the fault (replacement listening, link up; for the "
        "etcd leader, the kill) to recovery: the client's next new event, or for control-plane "
        "faults the store holding the client's position at that moment; - = never (xfail)"
    )
