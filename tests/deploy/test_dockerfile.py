"""A static reading of the Dockerfile and .dockerignore: no engine runs here (CI has none),
so this checks what can be checked from the text, and says so. What it cannot check (that
the image builds, that the wheels install without a compiler) is for `pytest tests/kind`,
which builds the image on a machine with Docker."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass, field

from tests.deploy.render import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPILERS = ("gcc", "g++", "clang", "build-essential", "make", "cc ")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        return [v for k, v in self.instructions if k == keyword]


def parse() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments gone."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            stages.append(Stage(base=base, name=name))
        elif not stages and keyword == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


def test_multi_stage_on_slim_python_311() -> None:
    _, stages = parse()
    assert len(stages) >= 2
    assert all(s.base == "python:3.11-slim" for s in stages)
    build, final = stages[0], stages[-1]
    assert build.name is not None
    # The final stage takes only the built environment from the first one.
    copies_from = [v for v in final.values("COPY") if v.startswith("--from=")]
    assert copies_from == [f"--from={build.name} /opt/tether /opt/tether"]
    assert not [v for v in final.values("COPY") if not v.startswith("--from=")]


def test_final_stage_runs_tether_as_a_fixed_non_root_user() -> None:
    _, stages = parse()
    final = stages[-1]
    (user,) = final.values("USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), "numeric, so Kubernetes can verify runAsNonRoot"
    assert int(uid) == 10001
    assert [i for i in final.instructions if i[0] in ("USER", "ENTRYPOINT")][-1][0] == "ENTRYPOINT"
    (entrypoint,) = final.values("ENTRYPOINT")
    assert json.loads(entrypoint) == ["tether"]
    assert any("useradd" in v and "--uid 10001" in v for v in final.values("RUN"))


def test_no_build_tools_in_the_final_stage() -> None:
    _, stages = parse()
    final_runs = " ".join(stages[-1].values("RUN"))
    assert "pip" not in final_runs
    assert "apt-get install" not in final_runs
    for tool in COMPILERS:
        assert tool not in final_runs


def test_the_build_installs_every_package_of_the_project() -> None:
    _, stages = parse()
    copied = stages[0].values("COPY")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert f"{package} ./{package}" in copied, package
        assert (REPO_ROOT / package / "__init__.py").is_file()
    assert any(c.startswith("pyproject.toml ") for c in copied)


def _matches(path: str, pattern: str) -> bool:
    if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
        return True
    return pattern.startswith("**/") and fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern[3:])


def _ignored(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last matching pattern decides; `!` re-includes."""
    ignored = False
    for rule in rules:
        negate = rule.startswith("!")
        if _matches(path, rule.removeprefix("!").rstrip("/")):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    rules = [r.strip() for r in DOCKERIGNORE.read_text().splitlines() if r.strip() and r[0] != "#"]
    for needed in ("pyproject.toml", "README.md", "tether/cli.py", "sidecar/proxy.py"):
        assert not _ignored(needed, rules), needed
    for unwanted in (
        ".git/HEAD",
        "tests/conftest.py",
        "bench/parser_bench.py",
        "tether-demo.db",
        "tether/__pycache__/cli.cpython-311.pyc",
        ".venv/bin/python",
        "deploy/base/kustomization.yaml",
    ):
        assert _ignored(unwanted, rules), unwanted
