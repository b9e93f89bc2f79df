"""A short coverage-guided fuzzing run in CI, so the harness cannot rot (long runs: see
fuzz_sse.py)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("fuzz_sse.py")


@pytest.mark.timeout(120)
async def test_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HARNESS),
        "-runs=30000",
        "-max_len=4096",
        "-seed=1",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=HARNESS.parent.parent.parent,
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "Done 30000 runs" in text
