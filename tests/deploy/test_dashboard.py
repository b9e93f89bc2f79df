"""The Grafana dashboard (`deploy/grafana/tether-dashboard.json`) is built on exactly the names
Tether exports: every metric each query names is on the `/metrics` of a real sidecar or a real
control plane, started here on loopback and scraped over HTTP."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.config import ControlPlaneConfig, SqliteUrl
from controlplane.server import start_control_plane
from sidecar.app import start_sidecar
from sidecar.config import SidecarConfig
from tests.deploy.render import DEPLOY
from tests.integration.conftest import serve_app
from tests.support.numbered_upstream import make_app
from tests.support.scrape import Scrape, names_of, scrape

DASHBOARD = DEPLOY / "grafana" / "tether-dashboard.json"

# --- reading metric names out of PromQL -------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
     "group_right", "inf", "nan", "atan2"}
)  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects. Strings, Grafana variables, label
    matchers, ranges and `by (...)`-style label lists are removed first; of the identifiers
    left, those followed by `(` are functions or aggregations, and keywords are skipped."""
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub("1", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('sum by (method) (rate(a_total{status!~"2xx|x{y}"}[$__rate_interval]))', {"a_total"}),
        ("histogram_quantile(0.99, sum by (le, m) (rate(h_bucket[5m])))", {"h_bucket"}),
        ("sum(rate(s_sum[1m])) / sum(rate(s_count[1m])) > bool 0.5", {"s_sum", "s_count"}),
        ("x * on (instance) group_left (component, version) info", {"x", "info"}),
        ("sum(rate(a[5m] offset 1h)) by (job) or vector(0)", {"a"}),
        ("count by (component, version) (tether_build_info)", {"tether_build_info"}),
        ('{__name__="skipped"} + 1e3 + ns:recorded:rate5m', {"ns:recorded:rate5m"}),
    ],
)
def test_metric_names_are_read_out_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expression) of every query, rows' nested panels included."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", ()):
                if target.get("expr"):
                    yield panel.get("title", "?"), target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])


# --- real servers ------------------------------------------------------------------------------


async def _scrapes(tmp_path: Path) -> AsyncIterator[list[Scrape]]:
    """A control plane (admin port on) and a sidecar reporting to it, in front of a numbered
    upstream: one scrape of each. Labelled families nothing has observed yet still show their
    names and types (`Scrape.names`)."""
    cp = await start_control_plane(
        ControlPlaneConfig(
            listen="127.0.0.1:0", store=SqliteUrl(tmp_path / "s.db"), admin_listen="127.0.0.1:0"
        )
    )
    try:
        async with serve_app(make_app()) as upstream:
            sidecar = await start_sidecar(
                SidecarConfig(
                    listen_host="127.0.0.1",
                    listen_port=0,
                    upstream=upstream,
                    admin_host="127.0.0.1",
                    admin_port=0,
                    control_plane=cp.address,
                )
            )
            try:
                async with aiohttp.ClientSession() as http:
                    yield [
                        await scrape(http, f"http://127.0.0.1:{sidecar.admin_port}/metrics"),
                        await scrape(http, f"http://127.0.0.1:{cp.admin_port}/metrics"),
                    ]
            finally:
                await sidecar.stop()
    finally:
        await cp.stop()


@pytest.fixture
async def exported(tmp_path: Path) -> AsyncIterator[set[str]]:
    async for scrapes in _scrapes(tmp_path):
        yield names_of(scrapes)


async def test_every_dashboard_query_names_a_metric_tether_exports(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    found = list(queries(dashboard))
    assert len(found) >= 20, "the dashboard lost its queries"
    missing: dict[str, set[str]] = {}
    used: set[str] = set()
    for title, expr in found:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        used |= names
        if names - exported:
            missing[title] = names - exported
    assert not missing, f"queries name metrics no Tether process exports: {missing}"
    # The panels the issue asks for are there: each of these is queried.
    for name in (
        "tether_sidecar_upstream_request_duration_seconds_bucket",
        "tether_sidecar_resume_duration_seconds_bucket",
        "tether_sidecar_upstream_outage_duration_seconds_count",
        "tether_sidecar_requests_reissued_total",
        "tether_sidecar_listens_reissued_total",
        "tether_control_plane_grpc_handled_total",
        "tether_control_plane_grpc_handling_seconds_bucket",
        "tether_control_plane_store_write_duration_seconds_bucket",
        "tether_control_plane_store_write_batch_size_sum",
        "tether_control_plane_sessions",
        "tether_control_plane_watchers",
        "tether_control_plane_rejections_total",
        "tether_build_info",
        "process_resident_memory_bytes",
    ):
        assert name in used, name


async def test_a_misspelt_metric_is_caught(exported: set[str]) -> None:
    """The check can fail: a name one letter off, or a counter without `_total`, is not
    exported."""
    for expr in (
        "sum(rate(tether_sidecar_upstream_request_duration_second_count[5m]))",
        "rate(tether_control_plane_rejections[5m])",
    ):
        assert metric_names(expr) - exported
