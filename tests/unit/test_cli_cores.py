"""The CLI's pure parts: control plane targets (`tether.ports`), unique prefixes
(`tether.prefix`) and what `sessions watch` prints (`tether.watchview`)."""

from __future__ import annotations

from typing import Any

import pytest

from tether.ports import control_plane_target
from tether.prefix import MAX_CANDIDATES, PrefixMatch
from tether.watchview import HEADER, SYNCED_LINE, WatchEvent, WatchView


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("cp", "cp:50051"),
        ("cp.tether.svc:7000", "cp.tether.svc:7000"),
        ("10.0.0.1", "10.0.0.1:50051"),
        ("[::1]", "[::1]:50051"),
        ("[::1]:9", "[::1]:9"),
        ("::1", "[::1]:50051"),
    ],
)
def test_control_plane_targets(given: str, target: str) -> None:
    assert control_plane_target(given) == target


def test_a_url_gets_a_hint() -> None:
    with pytest.raises(ValueError, match=r"try --control-plane cp:50051\)"):
        control_plane_target("http://cp:50051")
    with pytest.raises(ValueError, match=r"try --control-plane cp\)"):
        control_plane_target("grpc://cp/")


@pytest.mark.parametrize("bad", ["", ":50051", "cp:port", "cp:0", "cp:70000", "cp/x", "[::1]x"])
def test_bad_targets_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="expected HOST"):
        control_plane_target(bad)


def test_a_unique_prefix_and_the_scan_stops_past_it() -> None:
    match = PrefixMatch("ab")
    match.feed(["aa1", "ab12", "ac"])
    assert (match.unique, match.done) == ("ab12", True)
    assert PrefixMatch("zz").error() == "no session id is or starts with 'zz'"


def test_an_ambiguous_prefix_lists_a_bounded_number_of_candidates() -> None:
    match = PrefixMatch("s")
    ids = [f"s{i:03}" for i in range(MAX_CANDIDATES + 5)]
    match.feed(ids[:7])
    assert not match.done  # the next page may hold more
    match.feed(ids[7:])
    assert match.unique is None
    assert len(match.candidates) == MAX_CANDIDATES
    assert match.error().startswith(f"'s' is the start of {MAX_CANDIDATES + 5} session ids: s000")
    assert match.error().endswith("and 5 more")


def put(sid: str, *, owner: str = "pod-a", epoch: int = 1, streams: int = 1, seq: int = 0) -> Any:
    return WatchEvent("PUT", sid, owner, epoch, streams, seq)


def test_position_updates_are_coalesced_and_counted() -> None:
    view = WatchView()
    out = view.feed(put("s1"))
    assert out[0].split() == list(HEADER)
    assert out[1].split() == ["PUT", "s1", "pod-a", "1", "1", "0"]
    assert view.feed(WatchEvent("SYNCED")) == [SYNCED_LINE]
    assert view.feed(put("s1", seq=5)) == []
    assert view.feed(put("s1", seq=9)) == []
    (line,) = view.feed(put("s1", owner="pod-b", epoch=2, seq=9))
    assert line.split() == ["PUT", "s1", "pod-b", "2", "1", "9", "2"]
    assert view.feed(put("s1", owner="pod-b", epoch=2, seq=10)) == []
    (line,) = view.feed(WatchEvent("DELETE", "s1", "pod-b", 2, 1, 10))
    assert line.split() == ["DELETE", "s1", "pod-b", "2", "1", "10", "1"]


def test_all_prints_every_change() -> None:
    view = WatchView(show_all=True)
    lines = [line for seq in range(3) for line in view.feed(put("s1", seq=seq))]
    assert len(lines) == 4  # the header and three PUTs


def test_columns_stay_aligned_as_they_widen() -> None:
    view = WatchView()
    lines = view.feed(put("s1")) + view.feed(put("s" * 50, owner="o"))
    lines += view.feed(put("s2"))
    header, first, long_line, short_line = lines
    assert header.index("OWNER") == first.index("pod-a") < long_line.index(" o ") + 1
    assert short_line.index("pod-a") == long_line.index(" o ") + 1  # later lines follow it
    (expired,) = view.feed(WatchEvent("EXPIRE", "s3"))
    assert expired.index(" - ") + 1 == short_line.index("pod-a")


def test_remembered_sessions_are_bounded() -> None:
    view = WatchView(max_tracked=2)
    for sid in ("s1", "s2", "s3"):
        view.feed(put(sid))
    assert len(view.feed(put("s1"))) == 1  # forgotten, so printed again as new
    assert view.feed(put("s3")) == []
