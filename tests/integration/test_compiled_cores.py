"""The optional mypyc build of the sans-IO cores behaves exactly like the pure-Python one:
compile sidecar/sse.py and sidecar/tracker.py into a scratch directory, then run their unit
tests (property tests included) against the compiled modules."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORES = ["sidecar/sse.py", "sidecar/tracker.py"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def run(*argv: str, cwd: Path, env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text


async def test_compiled_cores_pass_the_same_unit_tests(tmp_path: Path) -> None:
    if shutil.which("cc") is None or shutil.which("mypyc") is None:
        pytest.skip("needs a C compiler and mypyc (from mypy)")
    shutil.copytree(ROOT / "sidecar", tmp_path / "sidecar", ignore=shutil.ignore_patterns("*.so"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MYPYC_OPT_LEVEL": "3"}
    await run("mypyc", *CORES, cwd=tmp_path, env=env)
    # The scratch directory comes first, so the compiled modules shadow the sources; they are
    # imported (and checked) before pytest starts, so the tests below use exactly them.
    args = [
        "-q",
        "-p",
        "no:cacheprovider",
        "-c",
        str(ROOT / "pyproject.toml"),
        "--rootdir",
        str(ROOT),
        str(ROOT / "tests/unit/test_sse.py"),
        str(ROOT / "tests/unit/test_tracker.py"),
    ]
    script = (
        "import sys, pytest\n"
        "import sidecar.sse as s, sidecar.tracker as t\n"
        "assert s.__file__.endswith('.so') and t.__file__.endswith('.so'), (s, t)\n"
        f"sys.exit(pytest.main({args!r}))\n"
    )
    out = await run(sys.executable, "-c", script, cwd=tmp_path, env=env)
    assert " passed" in out
