"""Packaging (issue #14): one version source, version floors that match the generated code,
the demo's SDK in an extra of its own, and a constraints file that pins everything the image
installs. Read from the files themselves and from the environment pip built."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

import tether
from tests.deploy.render import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
GENERATED = REPO_ROOT / "tether" / "api" / "v1"


def requirements(specs: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(s) for s in specs]
    return {r.name.lower().replace("_", "-"): r for r in reqs if r.name != "tether"}


RUNTIME = requirements(PROJECT["dependencies"])
DEMO = requirements(PROJECT["optional-dependencies"]["demo"])
TRACING = requirements(PROJECT["optional-dependencies"]["tracing"])
"""In the image too: `--tracing` works there without another install (README, "Tracing")."""


def floor(req: Requirement) -> Version:
    (minimum,) = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return minimum


def test_the_version_has_one_source() -> None:
    assert "version" not in PROJECT
    assert PROJECT["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "tether.__version__"}
    assert importlib.metadata.version("tether") == tether.__version__


def test_floors_are_what_the_generated_code_checks_at_import() -> None:
    pb2 = (GENERATED / "sessions_pb2.py").read_text()
    made_by = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", pb2)
    assert made_by is not None
    protobuf = Version(".".join(made_by.groups()))
    assert floor(RUNTIME["protobuf"]) == protobuf
    assert Version(f"{protobuf.major + 1}") in {
        Version(s.version) for s in RUNTIME["protobuf"].specifier if s.operator == "<"
    }
    grpc = re.search(
        r"GRPC_GENERATED_VERSION = '([\d.]+)'", (GENERATED / "sessions_pb2_grpc.py").read_text()
    )
    assert grpc is not None
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert floor(RUNTIME[name]) == Version(grpc.group(1)), name
    # The toolchain that made them is pinned to the same release.
    tools = requirements(PROJECT["optional-dependencies"]["test"])["grpcio-tools"]
    assert str(tools.specifier) == f"=={grpc.group(1)}"


def test_the_sidecar_and_control_plane_do_not_need_the_demo_sdk() -> None:
    assert not set(DEMO) & set(RUNTIME)
    assert {"mcp", "uvicorn"} <= set(DEMO)
    for package in ("sidecar", "controlplane"):
        for source in (REPO_ROOT / package).rglob("*.py"):
            text = source.read_text()
            assert not re.search(r"^\s*(import|from) (mcp|uvicorn|starlette)\b", text, re.M), source


IMPORTS_OF_MAIN = """
import json, sys
from tether.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
import os
for name in os.environ['TETHER_TEST_THEN'].split():  # what the command imports once it runs
    __import__(name)
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def imported_by(*argv: str, then: str = "") -> set[str]:
    """The modules `tether ARGV` imports (`tether.cli.main` in a process of its own), with the
    modules in `then`, which the command imports when it runs."""
    run = subprocess.run(
        [sys.executable, "-c", IMPORTS_OF_MAIN, *argv],
        env={**os.environ, "TETHER_TEST_THEN": then},
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    return set(json.loads(run.stderr.splitlines()[-1]))


OTHER_COMMANDS = {"controlplane.server", "tether.demo", "tether.injector", "tether.cli_inject"}


def test_a_command_imports_only_its_own_code() -> None:
    """Issue 16: the sidecar's memory holds no control-plane server, demo or injector code
    (they were 12 MiB of its resident set); `tether --help` still lists every command."""
    assert imported_by("--help") >= OTHER_COMMANDS
    sidecar = imported_by("--log-level", "WARNING", "sidecar", "--help", then="sidecar.app")
    assert "sidecar.proxy" in sidecar
    assert not sidecar & OTHER_COMMANDS
    assert not {m for m in sidecar if m.split(".")[0] in ("mcp", "uvicorn", "opentelemetry")}
    plane = imported_by("control-plane", "--help", then="controlplane.server")
    assert "controlplane.server" in plane
    assert not {"sidecar.proxy", "tether.demo", "tether.injector"} & plane


def pins() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for raw in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", line
        out[req.name.lower().replace("_", "-")] = Version(spec.version)
    return out


def test_constraints_pin_every_dependency_of_the_image_within_its_range() -> None:
    pinned = pins()
    for name, req in {**RUNTIME, **DEMO, **TRACING}.items():
        assert name in pinned, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (name, pinned[name])
    # And everything they pull in: the installed closure of tether[demo] is pinned too.
    seen: set[str] = set()
    todo = list(RUNTIME) + list(DEMO) + list(TRACING)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        assert name in pinned, f"{name} (a dependency of the image) is not pinned"
        for spec in importlib.metadata.requires(name) or []:
            dep = Requirement(spec)
            if dep.marker is None or dep.marker.evaluate({"extra": ""}):
                todo.append(dep.name.lower().replace("_", "-"))


def test_the_image_installs_with_the_constraints_and_the_demo_and_tracing_extras() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "COPY pyproject.toml setup.py README.md constraints.txt ./" in dockerfile
    install = r"pip install --constraint constraints\.txt \"[^\"]*\[demo,tracing\]\""
    assert re.search(install, dockerfile)
    assert "!constraints.txt" in (REPO_ROOT / ".dockerignore").read_text().splitlines()


def test_the_wheel_carries_the_compiled_run_core(tmp_path: Path) -> None:
    """Issue 16: `pip install` builds sidecar/_runcore.c (from a clean checkout, so nothing
    built in this tree can stand in for it), and the module it builds loads and serves."""
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        path = REPO_ROOT / os.fsdecode(name)
        if path.is_file() and not path.name.endswith(".so"):
            (src / path.relative_to(REPO_ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / path.relative_to(REPO_ROOT))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("tether-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        (core,) = [n for n in whl.namelist() if re.fullmatch(r"sidecar/_runcore\..*\.so", n)]
        assert "sidecar/_runcore.pyi" in whl.namelist()
        whl.extract(core, tmp_path / "site")
    check = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('sidecar._runcore', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.format_run(b'id: s.1.', 6, ['u7'], [b'data: x'], b'', 0))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "site" / core)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "([b'id: s.1.7.u7\\ndata: x\\n\\n'], [0, 22])"
