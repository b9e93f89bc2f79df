"""The optional mypyc build of the sans-IO cores behaves exactly like the pure-Python one:
compile sidecar/sse.py and sidecar/tracker.py into a scratch directory, then run their unit
tests (property tests included) against the compiled modules.

Compiling takes most of the time, so the built extension modules are cached under
`build/mypyc-cores/<key>/`, keyed by the bytes of every source mypyc reads from this repository
(the cores, `sidecar/runcore.py` with its C module's stub, and `tether/model.py`), the mypy
version and the interpreter: a build is reused only for exactly those sources, and the unit
tests run against it every time.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORES = ["sidecar/sse.py", "sidecar/tracker.py"]
# Everything of this repository that mypyc reads to compile CORES (their first-party imports).
COMPILED_INPUTS = [*CORES, "sidecar/runcore.py", "sidecar/_runcore.pyi", "tether/model.py"]
CACHE = ROOT / "build" / "mypyc-cores"

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


def build_key() -> str:
    digest = hashlib.sha256()
    for name in COMPILED_INPUTS:
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes() + b"\0")
    for part in (version("mypy"), sys.version, sysconfig.get_platform(), "MYPYC_OPT_LEVEL=3"):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:32]


async def compiled(env: dict[str, str]) -> Path:
    """The directory holding the compiled cores' extension modules (at their paths relative to
    a source root), built now unless a build of exactly these inputs is cached."""
    target = CACHE / build_key()
    if await asyncio.to_thread(target.is_dir):
        return target
    scratch = await asyncio.to_thread(_scratch_copy)
    try:
        await run("mypyc", *CORES, cwd=scratch, env=env)
        await asyncio.to_thread(_keep, scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _scratch_copy() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="building-", dir=CACHE))
    shutil.copytree(ROOT / "sidecar", scratch / "sidecar", ignore=shutil.ignore_patterns("*.so"))
    return scratch


def _keep(scratch: Path, target: Path) -> None:
    """Move the build's extension modules (mypyc's shared runtime library at the top, the
    cores in sidecar/) into `target`, atomically: a concurrent run sees all of it or none."""
    out = Path(tempfile.mkdtemp(prefix="built-", dir=CACHE))
    (out / "sidecar").mkdir()
    for so in [*scratch.glob("*.so"), *(scratch / "sidecar").glob("*.so")]:
        shutil.copy2(so, out / so.relative_to(scratch))
    try:
        out.rename(target)
    except OSError:
        shutil.rmtree(out)  # another run stored the same build first


def _mypyc_builds(_: str, names: list[str]) -> list[str]:
    return [n for n in names if n.endswith(".so") and not n.startswith("_runcore.")]


async def test_compiled_cores_pass_the_same_unit_tests(tmp_path: Path) -> None:
    if shutil.which("cc") is None or shutil.which("mypyc") is None:
        pytest.skip("needs a C compiler and mypyc (from mypy)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MYPYC_OPT_LEVEL": "3"}
    built = await compiled(env)
    # Every stale mypyc build is left out; the run core's C module (sidecar/_runcore.c, built
    # by the install) goes with the sources, since the unit tests run the bulk path on it.
    shutil.copytree(ROOT / "sidecar", tmp_path / "sidecar", ignore=_mypyc_builds)
    for so in built.rglob("*.so"):
        shutil.copy2(so, tmp_path / so.relative_to(built))
    # The scratch directory comes first, so the compiled modules shadow the sources; they are
    # imported (and checked) before pytest starts, so the tests below use exactly them.
    args = [
        "-q",
        "-p",
        "no:cacheprovider",
        # In this process: the compiled modules are the ones imported above (no xdist workers).
        "-n",
        "0",
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
