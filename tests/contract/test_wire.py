"""The wire contract: generated code matches the .proto (drift check), descriptors live under
`tether/v1/`, and the converters round-trip every domain value."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.api import convert
from tether.api.v1 import sessions_pb2 as pb
from tether.model import (
    InvalidIdError,
    OwnerName,
    SessionEvent,
    SessionEventType,
    SessionId,
    SessionRecord,
    StreamId,
    StreamPosition,
    parse_session_id,
)

ROOT = Path(__file__).resolve().parents[2]


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    gen = load_generator()
    written = gen.generate(tmp_path)
    committed = ROOT / "tether" / "api" / "v1"
    names = sorted(p.name for p in written)
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file()), (
        "generated files differ from tether/api/v1: run python scripts/gen_proto.py"
    )
    for name in names:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), (
            f"{name} is stale: run python scripts/gen_proto.py"
        )


def test_descriptors_are_namespaced() -> None:
    assert pb.DESCRIPTOR.name == "tether/v1/sessions.proto"
    assert pb.DESCRIPTOR.package == "tether.v1"
    assert "SessionService" in pb.DESCRIPTOR.services_by_name


ids = st.text(alphabet="abcXYZ019._~+=:@-", min_size=1, max_size=40).filter(
    lambda s: not s.startswith(".")
)
times = st.one_of(st.just(0.0), st.integers(1, 4_000_000_000_000_000).map(lambda n: n / 1e6))
positions = st.builds(
    StreamPosition,
    stream_id=ids.map(StreamId),
    last_event_id=st.text(max_size=20),
    upstream_event_id=st.text(max_size=20),
    seq=st.integers(0, 2**64 - 1),
    owner_epoch=st.integers(0, 2**64 - 1),
)
records = st.builds(
    SessionRecord,
    session_id=ids.map(SessionId),
    upstream_session_id=st.text(max_size=20),
    upstream_address=st.text(max_size=20),
    owner=ids.map(OwnerName),
    owner_epoch=st.integers(0, 2**64 - 1),
    protocol_version=st.text(max_size=10),
    initialize_request=st.binary(max_size=50),
    credential_fingerprint=st.text(alphabet="0123456789abcdef", max_size=64),
    streams=st.lists(positions, max_size=4).map(SessionRecord.streams_of),
    created_at=times,
    updated_at=times,
    expires_at=times,
)


@given(records)
def test_session_round_trips(rec: SessionRecord) -> None:
    back = convert.session_from_pb(
        pb.Session.FromString(convert.session_to_pb(rec).SerializeToString())
    )
    # Times travel as whole nanoseconds: exact to 1 ns or a few float ULPs (large times),
    # not to the last bit of a float.
    for name in ("created_at", "updated_at", "expires_at"):
        assert getattr(back, name) == pytest.approx(getattr(rec, name), abs=1e-9, rel=1e-15)
    times_of_rec = {n: getattr(rec, n) for n in ("created_at", "updated_at", "expires_at")}
    assert dataclasses.replace(back, **times_of_rec) == rec


def test_times_come_back_as_the_floats_they_were() -> None:
    """Found by Hypothesis in CI: `seconds * 1e9` rounded the product before it was made whole
    nanoseconds, so 102347109.037037 came back as 102347109.03703701."""
    rec = SessionRecord(
        session_id=SessionId("s"),
        upstream_session_id="u",
        upstream_address="http://mcp:3000/mcp",
        owner=OwnerName("o"),
        owner_epoch=1,
        created_at=102347109.037037,
        updated_at=1796178107.9114387,
        expires_at=4_000_000_000.000001,
    )
    assert convert.session_from_pb(convert.session_to_pb(rec)) == rec


@given(records, st.sampled_from([SessionEventType.PUT, SessionEventType.DELETE]))
def test_event_round_trips(rec: SessionRecord, kind: SessionEventType) -> None:
    ev = SessionEvent(kind, rec.session_id, rec)
    assert convert.event_from_pb(convert.event_to_pb(ev)) == ev
    synced = SessionEvent(SessionEventType.SYNCED)
    assert convert.event_from_pb(convert.event_to_pb(synced)) == synced
    # What the sidecar's ownership watch reads: the whole record, its streams left out.
    bare = SessionEvent(kind, rec.session_id, dataclasses.replace(rec, streams={}))
    assert convert.event_from_pb(convert.event_to_pb(ev), positions=False) == bare


@pytest.mark.parametrize(
    "bad", ["", ".", "..", ".hidden", "a/b", "a\\b", "a b", "é", "x" * 257, "a\x00b", "*"]
)
def test_bad_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidIdError):
        parse_session_id(bad)
    with pytest.raises(InvalidIdError):
        convert.session_from_pb(pb.Session(session_id=bad, owner="pod"))


def test_jwt_and_uuid_session_ids_are_accepted() -> None:
    for ok in ["3f2b8c1e-9d4a-4e8b-a1c2-7f6e5d4c3b2a", "eyJh.eyJz.SflK_w-x", "a" * 256]:
        assert parse_session_id(ok) == ok


def test_a_bad_item_does_not_spoil_its_batch() -> None:
    msg = pb.ReportEventsRequest(
        batch_id=7,
        upserts=[pb.SessionUpsert(session=pb.Session(session_id="a/b", owner="p"))],
        updates=[
            pb.StreamUpdate(session_id="ok", position=pb.StreamPosition(stream_id="s", seq=1)),
            pb.StreamUpdate(session_id="ok"),
        ],
    )
    batch, invalid = convert.batch_from_pb(msg)
    assert batch.batch_id == 7
    assert [u.session_id for u in batch.updates] == ["ok"]
    assert len(invalid) == 2
    assert convert.batch_from_pb(convert.batch_to_pb(batch))[0] == batch
