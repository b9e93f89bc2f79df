"""`tether control-plane` and `tether sessions`: flag parsing, store URLs, and the commands'
output against a real control plane on port 0."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.config import EtcdUrl, SqliteUrl, StoreUrlError, parse_store_url
from controlplane.server import RunningControlPlane
from tether import cli_controlplane
from tether.api.v1 import sessions_pb2 as pb
from tether.api.v1 import sessions_pb2_grpc
from tether.cli import build_parser


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("sqlite:///tether.db", SqliteUrl(Path("tether.db"))),
        ("sqlite:////var/lib/tether/s.db", SqliteUrl(Path("/var/lib/tether/s.db"))),
        ("etcd://10.0.0.1:2379", EtcdUrl((("10.0.0.1", 2379),), "/tether")),
        (
            "etcd://a:1,b.example:2,[::1]:3/prod/tether/",
            EtcdUrl((("a", 1), ("b.example", 2), ("::1", 3)), "/prod/tether"),
        ),
    ],
)
def test_store_urls(url: str, parsed: object) -> None:
    assert parse_store_url(url) == parsed


@pytest.mark.parametrize(
    "url",
    [
        "",
        "tether.db",
        "sqlite://",
        "sqlite:///",
        "sqlite:///dir/",
        "sqlite:/x.db",
        "sqlite:x.db",
        "sqlite://host/x.db",
        "sqlite://///x.db",
        "sqlite:///x.db?mode=ro",
        "sqlite:///d/..",
        "etcd://",
        "etcd://host",
        "etcd://host:port",
        "etcd://host:99999",
        "etcd://h:1/../x",
        "etcd://h:1/a b",
        "redis://h:1",
    ],
)
def test_bad_store_urls_say_why(url: str) -> None:
    with pytest.raises(StoreUrlError, match=r"etcd|sqlite|port|prefix|host|file|endpoint"):
        parse_store_url(url)


def test_sqlite_errors_show_both_forms_and_the_path() -> None:
    with pytest.raises(StoreUrlError) as caught:
        parse_store_url("sqlite://///var/x.db")
    assert "path '//var/x.db'" in str(caught.value)
    assert "sqlite:///relative/path.db" in str(caught.value)
    assert "sqlite:////absolute/path.db" in str(caught.value)


async def test_a_sqlite_store_in_a_missing_directory_names_it(tmp_path: Path) -> None:
    from controlplane.config import open_store
    from controlplane.store.protocol import StoreUnavailableError

    missing = tmp_path / "nowhere" / "s.db"
    with pytest.raises(StoreUnavailableError) as caught:
        await open_store(SqliteUrl(missing), session_ttl=60)
    assert str(caught.value) == f"sqlite {missing}: directory {missing.parent} does not exist"


def test_control_plane_flags() -> None:
    args = build_parser().parse_args(
        ["control-plane", "--listen", "0.0.0.0:7000", "--store", "etcd://h:1,h:2"]
    )
    assert (args.listen, args.store, args.session_ttl) == ("0.0.0.0:7000", "etcd://h:1,h:2", 3600)


def test_control_plane_refuses_a_bad_store(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["control-plane", "--store", "mysql://x"])
    assert args.run(args) == 2
    assert "unknown scheme" in capsys.readouterr().err


async def seed(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = sessions_pb2_grpc.SessionServiceStub(ch)
        call = stub.ReportEvents(None)  # None: no request iterator, the test writes
        sessions = [
            pb.Session(session_id=f"s{i}", owner="pod-a", upstream_address="up:1") for i in range(3)
        ]
        pos = pb.StreamPosition(stream_id="st", last_event_id="st.1.4", seq=4, owner_epoch=1)
        await call.write(
            pb.ReportEventsRequest(
                batch_id=1,
                upserts=[pb.SessionUpsert(session=s) for s in sessions],
                updates=[pb.StreamUpdate(session_id="s1", position=pos)],
            )
        )
        ack = await call.read()
        assert isinstance(ack, pb.ReportEventsResponse)
        assert ack.batch_id == 1
        await call.done_writing()


async def run_sessions(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args: Any = build_parser().parse_args(["sessions", *argv])
    command = {"list": cli_controlplane._list, "get": cli_controlplane._get}.get(
        args.action, cli_controlplane._delete
    )
    code = await cli_controlplane._call_control_plane(command, args)
    out, err = capsys.readouterr()
    return code, out, err


async def test_sessions_list_get_delete(
    control_plane: RunningControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(control_plane.address)
    cp = ["--control-plane", control_plane.address]
    code, out, _ = await run_sessions(["list", *cp, "--page-size", "2"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["SESSION", "OWNER", "EPOCH"]
    assert [line.split()[0] for line in lines[1:]] == ["s0", "s1", "s2"]

    code, out, _ = await run_sessions(["-o", "json", "list", *cp], capsys)
    doc = json.loads(out)
    assert [s["sessionId"] for s in doc["sessions"]] == ["s0", "s1", "s2"]
    assert doc["sessions"][1]["streams"][0] == {
        "streamId": "st",
        "lastEventId": "st.1.4",
        "seq": "4",
        "ownerEpoch": "1",
    }

    code, out, _ = await run_sessions(["get", "s1", *cp], capsys)
    assert code == 0
    assert "st.1.4" in out
    assert "pod-a (epoch 1)" in out

    code, out, _ = await run_sessions(["delete", "s1", *cp, "-o", "json"], capsys)
    assert json.loads(out)["session"]["sessionId"] == "s1"

    code, out, err = await run_sessions(["get", "s1", *cp], capsys)
    assert (code, out) == (1, "")
    assert err == "error: no session id is or starts with 's1'\n"

    code, _, err = await run_sessions(["get", "a/b", *cp], capsys)
    assert code == 1
    assert err.startswith("error: INVALID_ARGUMENT")


async def test_sessions_get_takes_a_unique_prefix(
    control_plane: RunningControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(control_plane.address)  # s0, s1, s2
    cp = ["--control-plane", control_plane.address]
    code, out, _ = await run_sessions(["get", "s", *cp], capsys)
    assert code == 1
    code, out, err = await run_sessions(["get", "s", *cp], capsys)
    assert (code, out) == (1, "")
    assert err == "error: 's' is the start of 3 session ids: s0, s1, s2\n"
    code, out, err = await run_sessions(["get", "x", *cp], capsys)
    assert err == "error: no session id is or starts with 'x'\n"
    code, out, _ = await run_sessions(["get", "s1", *cp, "-o", "json"], capsys)
    assert json.loads(out)["sessionId"] == "s1"


async def test_sessions_get_by_prefix_over_several_pages(
    control_plane: RunningControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    async with grpc.aio.insecure_channel(control_plane.address) as ch:
        stub = sessions_pb2_grpc.SessionServiceStub(ch)
        call = stub.ReportEvents(None)
        ids = [f"a{i:04}" for i in range(1500)] + ["b-unique"]
        await call.write(
            pb.ReportEventsRequest(
                batch_id=1,
                upserts=[
                    pb.SessionUpsert(session=pb.Session(session_id=i, owner="p")) for i in ids
                ],
            )
        )
        await call.read()
        await call.done_writing()
    code, out, err = await run_sessions(
        ["get", "b-", "--control-plane", control_plane.address], capsys
    )
    assert code == 0, err
    assert "b-unique" in out


async def test_a_dead_control_plane_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run_sessions(["list", "--control-plane", "127.0.0.1:1"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith("error: control plane 127.0.0.1:1 unavailable: ")
    assert err.count("\n") == 1
    assert "AioRpcError" not in err


def test_control_plane_addresses(capsys: pytest.CaptureFixture[str]) -> None:
    args: Any = build_parser().parse_args(["sessions", "list", "--control-plane", "http://cp"])
    assert args.run(args) == 2
    assert "try --control-plane cp" in capsys.readouterr().err


def test_log_level_after_the_subcommand() -> None:
    parser = build_parser()
    assert parser.parse_args(["sidecar", "--listen", ":1", "--upstream", "u"]).log_level == "INFO"
    for argv in (
        ["--log-level", "debug", "sidecar", "--listen", ":1", "--upstream", "u"],
        ["sidecar", "--log-level", "debug", "--listen", ":1", "--upstream", "u"],
        ["sessions", "list", "--log-level", "DEBUG"],
        ["control-plane", "--log-level", "debug"],
    ):
        assert parser.parse_args(argv).log_level == "DEBUG", argv


def test_log_format_after_the_subcommand() -> None:
    parser = build_parser()
    assert parser.parse_args(["sessions", "list"]).log_format == "text"
    for argv in (
        ["--log-format", "json", "sessions", "list"],
        ["sessions", "list", "--log-format", "json"],
        ["control-plane", "--log-format", "json"],
        ["demo", "--log-format", "json"],
    ):
        assert parser.parse_args(argv).log_format == "json", argv


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["sidecar"], ["(default: 0.05)", "(default: 10000)", "(default: asyncio)"]),
        (["control-plane"], ["(default 127.0.0.1:50051)", "(default 3600)"]),
        (["sessions", "list"], ["(default: 0)", "(default: INFO)"]),
        (["demo"], ["(default 8930; 0 = any)", "(default: 8933)"]),
    ],
)
def test_help_shows_the_defaults(
    argv: list[str], shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in shown:
        assert default in text, default


async def test_sessions_watch_coalesces_position_updates(
    control_plane: RunningControlPlane,
) -> None:
    import argparse
    import asyncio
    import io

    from tests.support.waiting import eventually
    from tether.tasks import spawn

    await seed(control_plane.address)  # s0, s1, s2; s1 has a stream
    out = io.StringIO()
    async with grpc.aio.insecure_channel(control_plane.address) as ch:
        stub = sessions_pb2_grpc.SessionServiceStub(ch)
        args = argparse.Namespace(owner=None, all=False, output="table")
        watching = spawn(cli_controlplane._watch(stub, args, out), name="test-watch")
        try:
            await eventually(lambda: "synced" in out.getvalue(), timeout=10, what="snapshot")
            call = stub.ReportEvents(None)
            for seq in (5, 6, 7):
                pos = pb.StreamPosition(stream_id="st", last_event_id=f"st.1.{seq}", seq=seq)
                pos.owner_epoch = 1
                update = pb.StreamUpdate(session_id="s1", position=pos)
                await call.write(pb.ReportEventsRequest(batch_id=seq, updates=[update]))
                await call.read()
            await call.done_writing()
            await stub.DeleteSession(pb.DeleteSessionRequest(session_id="s1"))
            await eventually(lambda: "DELETE" in out.getvalue(), timeout=10, what="the delete")
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["EVENT", "SESSION", "OWNER", "EPOCH", "STREAMS", "SEQ", "UPDATES"]
    assert [line.split()[:2] for line in lines[1:4]] == [
        ["PUT", "s0"],
        ["PUT", "s1"],
        ["PUT", "s2"],
    ]
    # The three position updates are not lines of their own: the delete counts them.
    assert lines[4] == "-- synced: changes follow --"
    rest = lines[5:]
    assert len(rest) == 1, lines
    assert rest[0].split() == ["DELETE", "s1", "pod-a", "1", "1", "7", "3"]
    assert lines[0].index("OWNER") == lines[1].index("pod-a") == rest[0].index("pod-a")
