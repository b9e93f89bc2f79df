"""The store figures script at a tiny size, so that it cannot rot. No figure is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.etcd import etcd_available

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_store_figures_run_and_print_their_tables() -> None:
    args = [sys.executable, "-m", "bench.store_figures", "--sessions", "60", "--creations", "20"]
    args += [] if etcd_available() else ["--no-etcd"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| sqlite | 500 | 60 |" in done.stdout
    assert "| sqlite | 60 | 60 |" in done.stdout
    if etcd_available():
        assert "| etcd | 500 | 60 |" in done.stdout
        assert "| 1 | 10,000 |" in done.stdout
