"""Shared test configuration. Integration fixtures live in tests/integration/conftest.py.

The chaos suite's summary table is printed from here rather than from tests/chaos/conftest.py:
with pytest-xdist the scenarios run in worker processes, and the controller, which prints the
terminal summary, loads only this conftest. A scenario's row travels to it inside the test's
report (`user_properties`, named `CHAOS_ROW`), which xdist sends to the controller; without
xdist the same path is taken in one process.

It also says which tests pytest-xdist keeps together (`XDIST_GROUPS`): the suite runs on two
workers (`-n 2 --dist loadgroup`, pyproject.toml).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from xdist.remote import Producer
    from xdist.scheduler.protocol import Scheduling

CHAOS_ROW = "chaos_row"
"""The `user_properties` name of a chaos scenario's row (a `ChaosRow` as a dict)."""

_chaos_rows: list[dict[str, Any]] = []

XDIST_GROUPS = {
    "tests/chaos/": "the scenarios time their recovery: one fault injection at a time",
    "tests/bench/test_bench_smoke.py": "one run of the harness (a module-scoped fixture)",
    "tests/integration/test_sdk_through_sidecar.py": "its servers (a module-scoped fixture)",
    "tests/deploy/test_manifests.py": "the rendered overlays (a module-scoped fixture)",
    "tests/deploy/test_injector_manifests.py": "the rendered overlay (a module-scoped fixture)",
}
"""Tests (by node id prefix) that pytest-xdist runs on one worker, one after another, and why;
every other test is scheduled on its own. A module-scoped fixture is made once per worker
that runs a test of the module, so its module is kept together.

Why not `xdist_group` marks: pytest-xdist (3.8) groups by a suffix it appends to
`item._nodeid` on the workers, which pytest 9.2's `nodeid` no longer reads: the marks are
silently ignored."""


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> Scheduling | None:
    """`--dist loadgroup`, with the groups of `XDIST_GROUPS`."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]  # xdist is untyped
        def _split_scope(self, nodeid: str) -> str:
            """The unit of work a test belongs to: its group, or the test alone."""
            return next((group for group in XDIST_GROUPS if nodeid.startswith(group)), nodeid)

    return GroupScheduling(config, log)


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
