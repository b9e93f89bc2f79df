"""The drain core (`sidecar.drain`): its rules as playbooks, no sockets."""

from __future__ import annotations

import pytest

from sidecar.drain import DrainState, Parking, holds_drain
from sidecar.tracker import EventId, StreamKind, new_stream_id


def _id(kind: StreamKind) -> EventId:
    return EventId(new_stream_id(kind), 1, 3)


def test_what_holds_a_drain() -> None:
    """Rule 3: a call and its resumed answer hold it; streams that never end do not."""
    assert holds_drain("POST", None)
    assert holds_drain("DELETE", None)
    assert holds_drain("GET", _id(StreamKind.POST))
    assert not holds_drain("GET", None)  # a standalone (or legacy) stream
    assert not holds_drain("GET", _id(StreamKind.STANDALONE))


def test_serving_until_begun_then_never_ready_again() -> None:
    d = DrainState(timeout=30)
    before = (d.ready, d.keep_alive())
    assert before == (True, True)
    assert not d.drained(0.0)
    assert d.begin(10.0)
    assert not d.begin(11.0), "one drain: its deadline stands"
    assert not d.ready
    assert not d.keep_alive(), "rule 2"
    assert d.remaining(25.0) == 15.0


def test_drained_once_nothing_is_in_flight_and_the_connections_settled() -> None:
    d = DrainState(timeout=30, settle=0.5)
    d.request_started(9.0)
    d.begin(10.0)
    assert not d.drained(12.0)
    d.request_started(12.0)  # arrived meanwhile on an open connection: served, counted
    d.request_finished(13.0)
    assert not d.drained(13.0)
    d.request_finished(14.0)
    assert not d.drained(14.2), "a kept-alive connection's next request may still come"
    assert d.drained(14.5)
    assert not d.timed_out(14.5)


def test_orphan_calls_hold_it_too() -> None:
    d = DrainState(timeout=30, settle=0.0)
    d.begin(0.0)
    assert not d.drained(1.0, upstream_busy=1)
    assert d.drained(1.0, upstream_busy=0)


def test_the_timeout_ends_a_drain_with_work_in_flight() -> None:
    d = DrainState(timeout=5)
    d.begin(0.0)
    d.request_started(1.0)
    assert not d.drained(4.9)
    assert d.drained(5.0)
    assert d.timed_out(5.0)


def test_a_finish_without_a_start_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        DrainState(timeout=1).request_finished(0.0)


def test_parking_closes_only_connections_idle_for_the_settle_time() -> None:
    """Rule 5: a connection freed a moment ago is left for its client's next request; one
    idle since the drain began, or for the settle time, is closed; busy ones never."""
    parking: Parking[str] = Parking(min_idle=0.5)
    live = ["parked", "busy", "freed"]
    assert parking.to_close(live, {"busy"}, now=10.0) == []  # idle ones count from now
    parking.idle("freed", now=10.4)
    assert parking.to_close(live, {"busy"}, now=10.5) == ["parked"]
    assert parking.to_close(live, {"busy"}, now=10.8) == ["parked"]
    assert parking.to_close(live, {"busy"}, now=10.9) == ["parked", "freed"]
    # Connections that are gone are forgotten: the map stays as small as the live set.
    assert parking.to_close(["busy"], {"busy"}, now=11.0) == []
    assert parking._since == {}
