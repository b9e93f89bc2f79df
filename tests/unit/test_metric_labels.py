"""The sidecar's metric labels stay bounded whatever clients send, and an upstream outage is
timed from the failure to its end (pure: a registry, fake times)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.metrics import (
    MCP_METHODS,
    OTHER,
    Metrics,
    OutageClock,
    method_label,
    status_label,
)
from sidecar.reconnect import Outcome

OUTAGE = "tether_sidecar_upstream_outage_duration_seconds"


@given(http=st.sampled_from(["GET", "POST", "DELETE", "PUT"]), rpc=st.none() | st.text())
def test_the_method_label_is_one_of_a_fixed_set(http: str, rpc: str | None) -> None:
    assert method_label(http, rpc) in MCP_METHODS | {"GET", "DELETE", OTHER}


def test_known_methods_name_themselves_and_others_do_not() -> None:
    assert method_label("POST", "tools/call") == "tools/call"
    assert method_label("POST", "tools/call-secret") == OTHER
    assert method_label("POST", None) == OTHER  # a response, a batch, an unreadable body
    assert method_label("GET", None) == "GET"


@given(st.integers(min_value=-1000, max_value=1000))
def test_the_status_label_is_a_class(status: int) -> None:
    assert status_label(status) in {"1xx", "2xx", "3xx", "4xx", "5xx", OTHER}


def outages(metrics: Metrics, outcome: str) -> tuple[float | None, float | None]:
    r = metrics.registry
    labels = {"outcome": outcome}
    return r.get_sample_value(OUTAGE + "_count", labels), r.get_sample_value(
        OUTAGE + "_sum", labels
    )


def test_an_outage_runs_from_the_first_failure_to_the_stream_back() -> None:
    metrics = Metrics()
    clock = OutageClock(metrics)
    clock.connection_ended(Outcome.CLOSED, 1.0)  # a polling close: no outage
    clock.reconnected(True, 1.5)
    assert outages(metrics, "resumed") == (None, None)
    clock.connection_ended(Outcome.FAILED, 10.0)
    clock.reconnected(False, 11.0)  # a failed attempt: the outage goes on
    clock.connection_ended(Outcome.FAILED, 11.0)
    clock.reconnected(True, 13.0)
    assert outages(metrics, "resumed") == (1.0, 3.0)
    clock.stream_ended(False, 20.0)  # no outage running: nothing more
    assert outages(metrics, "stopped") == (None, None)


def test_an_outage_the_stream_did_not_survive_ends_with_it() -> None:
    metrics = Metrics()
    clock = OutageClock(metrics)
    clock.connection_ended(Outcome.FAILED, 5.0)
    clock.stream_ended(True, 7.5)
    assert outages(metrics, "failed") == (1.0, 2.5)
