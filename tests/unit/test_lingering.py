"""`Registry.trim_lingering`: finished streams without a client are kept for late resumes
within a byte budget, the longest-lingering forgotten first; a stream a client came back to
is never forgotten. Counted as streams begin to linger, not by scanning every stream."""

from __future__ import annotations

from multidict import CIMultiDict

from sidecar.reconnect import ReconnectConfig
from sidecar.streams import LiveStream, Registry
from sidecar.tracker import StreamKind, TrackerLimits


def registry() -> Registry:
    return Registry(TrackerLimits(), reconnect=ReconnectConfig(), max_event_bytes=1 << 16)


def finished_stream(reg: Registry, events: int) -> LiveStream:
    stream = reg.new_stream(
        kind=StreamKind.POST,
        session_id=None,
        upstream_path="/mcp",
        upstream_headers=CIMultiDict(),
        response_headers=CIMultiDict(),
    )
    stream.core.upstream_opened()
    stream.core.relay(b"".join(b"data: %d\n\n" % i for i in range(events)))
    stream.end("done")
    return stream


def test_the_longest_lingering_go_first_and_only_past_the_budget() -> None:
    reg = registry()
    streams = [finished_stream(reg, 10) for _ in range(5)]
    each = streams[0].tracker.buffered_bytes
    assert each > 0
    for s in streams:
        assert reg.trim_lingering(3 * each, s) in (0, 1)
    assert [s for s in streams if s.stream_id in reg.streams] == streams[2:]


def test_a_stream_with_a_client_back_is_kept_and_counted_again_when_it_leaves() -> None:
    reg = registry()
    old, new = finished_stream(reg, 10), finished_stream(reg, 10)
    each = old.tracker.buffered_bytes
    reg.trim_lingering(10 * each, old)
    reg.trim_lingering(10 * each, new)
    old.attach()  # a late resume
    reg.unlinger(old)
    assert reg.trim_lingering(0) == 1  # only `new` lingers
    assert old.stream_id in reg.streams
    assert new.stream_id not in reg.streams
    old.detach()
    assert reg.trim_lingering(0, old) == 1
    assert old.stream_id not in reg.streams


def test_streams_forgotten_elsewhere_leave_the_count() -> None:
    reg = registry()
    streams = [finished_stream(reg, 10) for _ in range(3)]
    for s in streams:
        reg.trim_lingering(1 << 30, s)
    reg.remove_stream(streams[0])  # the janitor's linger timeout, say
    assert reg._lingering_bytes == sum(s.tracker.buffered_bytes for s in streams[1:])
    assert reg.trim_lingering(0) == 2
    assert reg._lingering_bytes == 0


def test_an_open_stream_is_not_counted() -> None:
    reg = registry()
    stream = reg.new_stream(
        kind=StreamKind.POST,
        session_id=None,
        upstream_path="/mcp",
        upstream_headers=CIMultiDict(),
        response_headers=CIMultiDict(),
    )
    assert reg.trim_lingering(0, stream) == 0
    assert stream.stream_id in reg.streams
