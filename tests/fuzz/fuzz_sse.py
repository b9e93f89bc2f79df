"""Coverage-guided fuzzing (atheris) of everything that reads bytes from the network.

Long runs, outside CI:   python tests/fuzz/fuzz_sse.py -max_total_time=3600 [corpus_dir]
A short run is part of the test suite (tests/fuzz/test_fuzz.py).

Properties checked on every input, fed in fuzzer-chosen chunks:
- the SSE parser never raises; it returns events and at most one trailing SSEError, after
  which it stays closed; its pending buffer stays within the event size limit;
- chunking does not change the result;
- the bulk path (runs) relays exactly what the event path does, through the stream core the
  pump uses, with a client that reads at every pause: the same bytes written, the same end,
  state, cursor and duplicate drops; on each run core, the compiled one and its pure-Python
  twins (sidecar.runcore);
- client-facing event ids either parse or are refused, never raise, and round-trip.
"""

from __future__ import annotations

import random
import sys

import atheris

with atheris.instrument_imports():
    from sidecar import runcore
    from sidecar.reconnect import Outcome, ReconnectConfig
    from sidecar.sse import SSEError, SSEEvent, SSEParser
    from sidecar.stream_core import Send, StreamCore
    from sidecar.tracker import EventId, StreamKind, StreamTracker, TrackerLimits
    from tether.model import StreamId

LIMIT = 4096
_C = runcore.compiled()
if _C is None:
    raise ImportError("sidecar._runcore is not built: this target runs the bulk path on both cores")
CORES = [_C, runcore.PYTHON]


def parse(data: bytes, cuts: list[int]) -> list[SSEEvent | SSEError]:
    parser = SSEParser(max_event_bytes=LIMIT)
    out: list[SSEEvent | SSEError] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        out += parser.feed(data[start:cut])
        start = cut
    out += parser.close()
    errors = [i for i, item in enumerate(out) if isinstance(item, SSEError)]
    assert errors in ([], [len(out) - 1]), "an error must be last and alone"
    if errors:
        assert parser.failed is not None
        assert parser.feed(b"data: more\n\n") == []
    return out


def relay(data: bytes, cuts: list[int], bulk: bool) -> tuple[object, ...]:
    """Relay the chunks through a `StreamCore`, as the pump does (the same calls), with a
    client that reads at every pause; returns everything observable."""
    tracker = StreamTracker(
        StreamId("p0"),
        limits=TrackerLimits(dedup_window=8, replay_max_events=64, replay_max_bytes=1 << 15),
    )
    core = StreamCore(
        tracker,
        StreamKind.POST,
        reconnect=ReconnectConfig(),
        max_event_bytes=LIMIT,
        request_ids=(1, 2),
        rng=random.Random(0),  # the reconnect jitter is part of what is compared
        bulk=bulk,
    )
    core.upstream_opened()
    written: list[bytes] = []
    position = 0

    def client_turn() -> None:
        nonlocal position
        step = core.next_write(position)
        if isinstance(step, Send):
            written.append(step.data)
            position = step.upto
            core.sent(position)

    start = 0
    for cut in [*sorted(cuts), len(data)]:
        step = core.relay(data[start:cut])
        start = cut
        while step.paused:
            client_turn()
            step = core.relay()
    end = core.upstream_ended(Outcome.CLOSED, now=0.0)
    client_turn()
    return b"".join(written), end, core.state, core.reason, core.cursor, tracker.duplicates


def test_one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    cuts = [fdp.ConsumeIntInRange(0, 64) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    whole = parse(data, [])
    chunked = parse(data, [min(c, len(data)) for c in cuts])
    assert whole == chunked, "chunking changed the result"
    cut_list = [min(c, len(data)) for c in cuts]
    events = relay(data, cut_list, False)
    for core in CORES:
        runcore.use(core)
        assert relay(data, cut_list, True) == events, f"runs changed the result ({core} core)"
    text = data.decode("utf-8", "replace")
    eid = EventId.parse(text)
    if eid is not None:
        assert EventId.parse(str(eid)) == eid


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
