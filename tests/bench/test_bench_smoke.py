"""The benchmark harness at tiny sizes, so that it cannot rot. No timing is asserted.

One `python -m bench --smoke --only <every group>` run covers every figure group (200 events
per stream, 20 idle streams, 100 control-plane updates, 3 resumes, 26 stateless requests of
each kind per path; for the MCP group, the official SDK server and client: 8 no-op calls, 40
progress notifications and 10 open calls per path; the control-plane floods, 2,000 items per
flood, which a plain run leaves out), once for the whole module: one harness start-up instead
of two. The harness fails loudly (non-zero exit) when a
stream does not deliver all its events, a stateless answer is not the result of its request,
or an SDK call misses a notification or its result, so its exit status and the printed tables
are what is checked. The nginx path needs Debian's `nginx-light` (or `nginx`): without it, that
part alone is left out of the run and its test is skipped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import GROUPS
from bench.procs import find_nginx
from tests.support.etcd import etcd_available

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
HAVE_NGINX = find_nginx() is not None


@pytest.fixture(scope="module")
def report() -> str:
    args = [sys.executable, "-m", "bench", "--smoke", "--only", *GROUPS]
    args += ["--tuned-nginx"] if HAVE_NGINX else ["--no-nginx"]
    args += [] if etcd_available() else ["--no-etcd"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=200, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def section(report: str, title: str) -> str:
    assert f"### {title}" in report, report
    return report.split(f"### {title}", 1)[1].split("###", 1)[0]


def test_every_figure_group_prints_its_table(report: str) -> None:
    mcp = section(report, "MCP traffic: official SDK server and client")
    for revision in ("2025-11-25", "2026-07-28"):
        for path in ("direct", "sidecar"):
            assert f"| {revision} | {path} |" in mcp, mcp
    assert report.index("### MCP traffic") < report.index("### Throughput, one stream")
    throughput = section(report, "Throughput, one stream")
    assert "| 256 B | direct |" in throughput
    assert "| 4096 B | sidecar |" in throughput
    assert "| sidecar |" in section(report, "Latency at 1,000 events/s")
    assert "| 20 (20) | sidecar |" in section(report, "Concurrent idle SSE streams")
    assert "| sqlite | 100 |" in section(report, "Control plane: 100 streams")
    assert "| 3 |" in section(report, "Resume through a new sidecar")
    assert "| resume p99 ≤ 50 ms |" in section(report, "Targets")
    stateless = section(report, "Stateless requests (MCP 2026-07-28")
    for request in ("tools/list", "tools/call noop"):
        for answer in ("JSON", "SSE (10 progress + result)"):
            for path in ("direct", "sidecar"):
                assert f"| {request} | {answer} | {path} |" in stateless, stateless
    assert "Command: `python -m bench --smoke" in report


def test_every_idle_stream_delivered(report: str) -> None:
    idle = section(report, "Concurrent idle SSE streams")
    assert "| 20/20 |" in idle


@pytest.mark.skipif(not HAVE_NGINX, reason="nginx is not installed (apt-get install nginx-light)")
def test_nginx_path(report: str) -> None:
    assert "| 256 B | nginx |" in section(report, "Throughput, one stream")
    assert "| 4096 B | nginx (proxy_buffer_size 64k) |" in section(report, "Throughput, one stream")
    assert "| nginx |" in section(report, "Latency at 1,000 events/s")
    mcp = section(report, "MCP traffic: official SDK server and client")
    assert "| 2025-11-25 | nginx |" in mcp
    assert "| 2026-07-28 | nginx |" in mcp
    targets = section(report, "MCP targets (issue 16")
    for target in ("added p50 of a no-op", "CPU per notification", "RSS with 10 calls open"):
        assert target in targets, targets
    assert "| 20 (20) | nginx |" in section(report, "Concurrent idle SSE streams")
    stateless = section(report, "Stateless requests (MCP 2026-07-28")
    assert "| tools/list | JSON | nginx |" in stateless
    assert "| tools/call noop | SSE (10 progress + result) | nginx |" in stateless


def test_flood_group_prints_its_table(report: str) -> None:
    """The `cp-flood` group at the smoke size (2,000 items per flood): every flood on every
    store gets its row, and the control plane answered after each."""
    table = section(report, "Control plane under floods: 2,000 items per flood")
    stores = ["sqlite", "etcd"] if etcd_available() else ["sqlite"]
    for store in stores:
        for flood in ("updates-known", "updates-unknown", "upserts"):
            row = next(line for line in table.splitlines() if f"| {store} | {flood} |" in line)
            cells = [c.strip() for c in row.split("|")]
            assert cells[9] == "yes", row  # serving after the flood
    unknown = next(line for line in table.splitlines() if "| sqlite | updates-unknown |" in line)
    assert [c.strip() for c in unknown.split("|")][5] == "2,000"  # every item was rejected
    assert "control plane peak RSS ≤ 256 MiB (sqlite, upserts flood)" in section(report, "Targets")


def test_flood_module_runs_on_its_own() -> None:
    args = [sys.executable, "-m", "bench.cp_flood", "--count", "300", "--batch", "100"]
    args += ["--store", "sqlite", "--only", "updates-unknown"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| sqlite | updates-unknown |" in done.stdout
    assert "Command: `python -m bench.cp_flood --count 300" in done.stdout
