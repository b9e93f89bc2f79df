"""`tether.probe` (verdicts from probe outcomes) and `sidecar.readiness` (what /readyz says):
pure cores, no sockets."""

from __future__ import annotations

import pytest

from sidecar.readiness import Inputs, Status, readiness
from tether.probe import MAX_DETAIL, Change, ProbeState


def test_no_verdict_before_the_first_outcome_then_it_decides_at_once() -> None:
    state = ProbeState(fall=3, rise=3)
    assert (state.up, state.detail) == (None, "not probed yet")
    assert state.observe(False, "refused") == Change(False, "refused")
    assert state.up is False


def test_fall_and_rise_need_outcomes_in_a_row() -> None:
    state = ProbeState(fall=2, rise=3)
    assert state.observe(True) == Change(True, "")
    assert state.observe(False, "a") is None  # one failure: still up
    assert state.observe(True) is None  # the streak is broken
    assert state.observe(False, "b") is None
    assert state.observe(False, "c") == Change(False, "c")
    assert state.observe(False, "d") is None  # no change: no line to log
    assert state.detail == "d"  # but the latest reason is shown
    assert [state.observe(True), state.observe(True)] == [None, None]
    assert state.observe(True) == Change(True, "")
    assert (state.up, state.detail) == (True, "")


def test_detail_is_bounded_and_thresholds_are_checked() -> None:
    state = ProbeState()
    state.observe(False, "x" * 10_000)
    assert len(state.detail) == MAX_DETAIL
    with pytest.raises(ValueError, match="at least 1"):
        ProbeState(fall=0)


def inputs(**changes: object) -> Inputs:
    base: dict[str, object] = {
        "started": True,
        "draining": False,
        "upstream_up": True,
        "upstream_detail": "",
        "control_plane_connected": True,
        "ready_requires_control_plane": False,
        "streams": 3,
    }
    return Inputs(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({}, Status.READY),
        ({"started": False}, Status.STARTING),
        ({"upstream_up": None}, Status.STARTING),
        ({"draining": True, "upstream_up": False}, Status.DRAINING),
        ({"upstream_up": False}, Status.UPSTREAM_UNREACHABLE),
        ({"control_plane_connected": False}, Status.READY),  # rule 2
        (
            {"control_plane_connected": False, "ready_requires_control_plane": True},
            Status.CONTROL_PLANE_UNREACHABLE,
        ),
        ({"control_plane_connected": None, "ready_requires_control_plane": True}, Status.READY),
    ],
)
def test_readiness_verdicts(changes: dict[str, object], status: Status) -> None:
    verdict = readiness(inputs(**changes))
    assert verdict.status is status
    assert verdict.http_status == (200 if status is Status.READY else 503)
    assert verdict.body["status"] == status.value


def test_readiness_body_says_why() -> None:
    down = readiness(inputs(upstream_up=False, upstream_detail="connect: refused"))
    assert down.body == {
        "status": "upstream unreachable",
        "upstream": "unreachable",
        "detail": "connect: refused",
        "control_plane": "connected",
        "streams": 3,
    }
    no_cp = readiness(inputs(control_plane_connected=False))
    assert (no_cp.http_status, no_cp.body["control_plane"]) == (200, "unreachable")
    assert "control_plane" not in readiness(inputs(control_plane_connected=None)).body
