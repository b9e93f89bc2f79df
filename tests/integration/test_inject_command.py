"""`tether inject` and `tether uninject` as real processes (issue 15): on files and on standard
input, composable in a pipe, comments and document order kept, every byte of an untouched
document kept, errors as one line and exit 1 with nothing on stdout."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.render import REPO_ROOT, validate
from tests.support.procs import python_module
from tether.inject import PROXY_PORT_NAME, SIDECAR_NAME, is_injected, uninject

FIXTURES = REPO_ROOT / "tests" / "deploy" / "fixtures"
PLAIN = FIXTURES / "mcp-example-plain.yaml"
_yaml: Any = __import__("yaml")


def tether(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    return subprocess.run(
        python_module("tether.cli", *args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=REPO_ROOT,
    )


def comments(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("#")]


def kinds(text: str) -> list[tuple[str, str]]:
    return [(d["kind"], d["metadata"]["name"]) for d in _yaml.safe_load_all(text) if d]


def test_inject_a_file_keeps_comments_and_order_and_uninject_gives_it_back() -> None:
    original = PLAIN.read_text()
    done = tether("inject", "-f", str(PLAIN))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    out = done.stdout
    assert comments(out) == comments(original)  # every comment, in order
    assert kinds(out) == kinds(original)
    deployment, service, budget = _yaml.safe_load_all(out)
    assert is_injected(deployment)
    assert SIDECAR_NAME in {
        c["name"] for c in deployment["spec"]["template"]["spec"]["initContainers"]
    }
    assert service["spec"]["ports"][0]["targetPort"] == PROXY_PORT_NAME
    assert budget == list(_yaml.safe_load_all(original))[2]
    for obj in (deployment, service, budget):
        validate(obj, "1.29.0")
    # Composable: the output is a valid input, and uninject restores the very bytes.
    back = tether("uninject", "-f", "-", stdin=out)
    assert back.returncode == 0, back.stderr
    assert back.stdout == original


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.yaml")), ids=lambda p: p.stem)
def test_a_pipe_through_inject_twice_and_uninject(path: Path) -> None:
    """stdin to stdout; injecting injected output changes nothing; uninject gives back the
    same objects (and the same bytes, where ruamel.yaml writes a restored value as it was)."""
    original = path.read_text()
    once = tether("inject", "-f", "-", stdin=original)
    assert once.returncode == 0, once.stderr
    twice = tether("inject", "-f", "-", stdin=once.stdout)
    assert twice.returncode == 0, twice.stderr
    assert twice.stdout == once.stdout
    assert comments(once.stdout) == comments(original)
    back = tether("uninject", "-f", "-", stdin=once.stdout)
    assert back.returncode == 0, back.stderr
    assert list(_yaml.safe_load_all(back.stdout)) == list(_yaml.safe_load_all(original))
    # Two cosmetic exceptions, both in the documents that changed: a comment after a value
    # that grew keeps its new column, and a replaced preStop hook comes back in block style.
    if path.stem not in {"chart-deployment-named-ports", "multi-container"}:
        assert back.stdout == original


def test_without_opt_in_every_byte_is_kept_unless_all() -> None:
    original = (FIXTURES / "untouched.yaml").read_text()
    done = tether("inject", "-f", str(FIXTURES / "untouched.yaml"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == original
    forced = tether("inject", "--all", "-f", str(FIXTURES / "untouched.yaml"))
    assert forced.returncode == 0, forced.stderr
    deployment, service = _yaml.safe_load_all(forced.stdout)
    assert is_injected(deployment)
    assert service["spec"]["ports"][0]["targetPort"] == PROXY_PORT_NAME
    assert comments(forced.stdout) == comments(original)


def test_flags_reach_the_sidecar() -> None:
    done = tether(
        "inject",
        "-f",
        str(PLAIN),
        "-n",
        "team-a",
        "--image",
        "registry.example.com/tether:0.1.0",
        "--control-plane",
        "cp.tether.svc:50051",
        "--proxy-port",
        "8081",
        "--admin-port",
        "9091",
        "--drain-timeout",
        "60",
        "--allowed-host",
        "mcp.example.com",
    )
    assert done.returncode == 0, done.stderr
    deployment = next(_yaml.safe_load_all(done.stdout))
    spec = deployment["spec"]["template"]["spec"]
    (sidecar,) = spec["initContainers"]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert sidecar["image"] == "registry.example.com/tether:0.1.0"
    assert env["TETHER_CONTROL_PLANE"] == "cp.tether.svc:50051"
    assert env["TETHER_LISTEN"] == "0.0.0.0:8081"
    assert env["TETHER_DRAIN_TIMEOUT"] == "60"
    assert env["TETHER_OWNER"] == "$(POD_NAME)@$(POD_NAMESPACE)"
    hosts = env["TETHER_ALLOWED_HOST"].split(",")
    assert {"mcp.example.com", "mcp-example", "mcp-example.team-a"} <= set(hosts)
    assert spec["containers"][0]["lifecycle"]["preStop"]["httpGet"]["port"] == 9091
    assert spec["terminationGracePeriodSeconds"] == 60 + 5 + 5 + 5
    assert uninject(deployment) == next(_yaml.safe_load_all(PLAIN.read_text()))


@pytest.mark.parametrize(
    ("stdin", "args", "message"),
    [
        (
            "apiVersion: v1\nkind: Pod\n"
            "metadata: {name: p, annotations: {tether.dev/inject: 'true'}}\n"
            "spec: {containers: [{name: a, image: 'i:1'}]}\n",
            ("inject", "-f", "-"),
            "tether inject: error: Pod/p: container a has no port: set tether.dev/upstream-port",
        ),
        ("a: [b\n", ("inject", "-f", "-"), "tether inject: error: while parsing a flow sequence"),
        ("", ("inject", "-f", "/nonexistent/file.yaml"), "tether inject: error: [Errno 2]"),
    ],
    ids=["no-port", "bad-yaml", "missing-file"],
)
def test_errors_are_one_line_and_exit_1(stdin: str, args: tuple[str, ...], message: str) -> None:
    done = tether(*args, stdin=stdin)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(message), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_other_commands_do_not_load_the_yaml_library() -> None:
    """Every `tether` command builds the whole parser: the sidecar's start must not pay for
    ruamel.yaml (about 15 ms to import), which only `inject`/`uninject` use."""
    code = (
        "import sys; from tether.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.startswith('ruamel')))"
    )
    done = subprocess.run(
        [python_module("tether.cli")[0], "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "[]"
