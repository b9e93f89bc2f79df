"""Tests for the sans-IO SSE parser and encoder in `sidecar.sse`.

Example tests pin the WHATWG event-stream rules one at a time. Property tests then show that
chunking never changes the result, that the parser agrees with `reference_parse` (a slow
line-by-line transcription of the spec, which is how the parser's fast paths are proven equal
to the general one), that garbage never raises, and that `encode_event` round-trips.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.sse import SSEError, SSEEvent, SSEParser, SSERun, encode_comment, encode_event
from tests.support.runcores import each_run_core  # noqa: F401 - a fixture

Result = list[SSEEvent | SSEError]
BOM = b"\xef\xbb\xbf"

PROPERTY_SETTINGS = settings(max_examples=300, deadline=None)


def parse(*chunks: bytes, max_event_bytes: int = 1 << 20) -> Result:
    """Feed `chunks` one by one, then close; return everything the parser produced."""
    parser = SSEParser(max_event_bytes=max_event_bytes)
    out: Result = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    out.extend(parser.close())
    return out


def run(
    chunks: Iterable[bytes], max_event_bytes: int = 1 << 20
) -> tuple[Result, str, int | None, SSEError | None]:
    parser = SSEParser(max_event_bytes=max_event_bytes)
    out: Result = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    out.extend(parser.close())
    return out, parser.last_event_id, parser.retry, parser.failed


def run_with_runs(
    chunks: Iterable[bytes], max_event_bytes: int = 1 << 20
) -> tuple[Result, str, int | None, SSEError | None, int]:
    """As `run`, through `feed_runs`, with runs expanded; the last item counts the runs."""
    parser = SSEParser(max_event_bytes=max_event_bytes)
    out: Result = []
    runs = 0
    for chunk in chunks:
        for item in parser.feed_runs(chunk):
            if isinstance(item, SSERun):
                runs += 1
                out.extend(item.events())
            else:
                out.append(item)
    out.extend(parser.close())
    return out, parser.last_event_id, parser.retry, parser.failed, runs


def split_at(raw: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(points)]


def bytewise(raw: bytes) -> list[bytes]:
    return [raw[i : i + 1] for i in range(len(raw))]


# --- The reference: the WHATWG "event stream interpretation", line by line -----------------


def reference_parse(raw: bytes) -> tuple[list[SSEEvent], str, int | None]:
    """Interpret a whole stream exactly as the spec text reads, with no eye on speed.

    Returns the dispatched events, the event source's last event ID string (set at each
    dispatch, as a browser would send it on reconnect) and the reconnection time, which the
    spec sets as soon as a `retry` line is processed, even in an event that never ends.
    """
    text = raw.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]

    lines: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in "\r\n":
            lines.append("".join(current))
            current = []
            if char == "\r" and text[i + 1 : i + 2] == "\n":
                i += 1
        else:
            current.append(char)
        i += 1
    # `current` is an unterminated last line: never processed, like the rest of its event.

    events: list[SSEEvent] = []
    data_buffer = ""
    event_type_buffer = ""
    last_event_id_buffer = ""
    last_event_id_string = ""
    reconnection_time: int | None = None
    block_id: str | None = None
    block_retry: int | None = None
    for line in lines:
        if line == "":
            last_event_id_string = last_event_id_buffer
            if data_buffer == "":
                event_type_buffer = ""
            else:
                if data_buffer.endswith("\n"):
                    data_buffer = data_buffer[:-1]
                events.append(
                    SSEEvent(
                        data=data_buffer,
                        event=event_type_buffer or "message",
                        id=block_id,
                        last_event_id=last_event_id_string,
                        retry=block_retry,
                    )
                )
                data_buffer = ""
                event_type_buffer = ""
            block_id = None
            block_retry = None
            continue
        if line.startswith(":"):
            continue
        if ":" in line:
            field, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            field, value = line, ""
        if field == "event":
            event_type_buffer = value
        elif field == "data":
            data_buffer += value + "\n"
        elif field == "id":
            if "\0" not in value:
                last_event_id_buffer = value
                block_id = value
        elif field == "retry" and value and all(c in "0123456789" for c in value):
            reconnection_time = int(value)
            block_retry = reconnection_time
    return events, last_event_id_string, reconnection_time


# --- Line endings ---------------------------------------------------------------------------


@pytest.mark.parametrize("newline", [b"\n", b"\r", b"\r\n"])
def test_each_line_ending_style(newline: bytes) -> None:
    raw = b"event: ping" + newline + b"data: a" + newline + newline
    assert parse(raw) == [SSEEvent(data="a", event="ping")]


def test_mixed_line_endings_in_one_stream() -> None:
    raw = b"data: a\rdata: b\r\ndata: c\n\r\ndata: d\r\r"
    assert parse(raw) == [SSEEvent(data="a\nb\nc"), SSEEvent(data="d")]


def test_cr_at_chunk_end_ends_the_line_at_once() -> None:
    parser = SSEParser()
    # The blank line is a lone CR so far: a paused stream must still dispatch now.
    assert parser.feed(b"data: x\r\n\r") == [SSEEvent(data="x")]
    # Its LF arrives later and must not count as another line.
    assert parser.feed(b"\ndata: y\r\n\r\n") == [SSEEvent(data="y")]


def test_lf_opening_a_chunk_after_a_cr_is_skipped() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    # Were the LF an empty line, "a" would be dispatched alone.
    assert parser.feed(b"\ndata: b\r\n\r\n") == [SSEEvent(data="a\nb")]


def test_crlf_split_in_many_places() -> None:
    raw = b"id: 1\r\ndata: a\r\n\r\nid: 2\r\ndata: b\r\n\r\n"
    expected = [
        SSEEvent(data="a", id="1", last_event_id="1"),
        SSEEvent(data="b", id="2", last_event_id="2"),
    ]
    for cut in range(len(raw) + 1):
        assert parse(raw[:cut], raw[cut:]) == expected
    assert parse(*bytewise(raw)) == expected


def test_unicode_line_separators_are_data() -> None:
    # Only CR and LF end lines: not str.splitlines()'s VT, FF, FS, NEL, U+2028...
    value = "a\x0bb\x0cc\x1cd\x85e\u2028f"
    assert parse(f"data: {value}\n\n".encode()) == [SSEEvent(data=value)]


# --- BOM --------------------------------------------------------------------------------------


def test_leading_bom_is_stripped() -> None:
    assert parse(BOM + b"data: a\n\n") == [SSEEvent(data="a")]


def test_bom_split_across_chunks() -> None:
    assert parse(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == [SSEEvent(data="a")]
    assert parse(b"\xef\xbb", b"\xbfdata: a\n\n") == [SSEEvent(data="a")]


def test_only_one_bom_is_stripped() -> None:
    # The second BOM becomes part of the field name, so the line is an unknown field.
    assert parse(BOM + BOM + b"data: a\n\ndata: b\n\n") == [SSEEvent(data="b")]


def test_bom_after_stream_start_is_kept() -> None:
    assert parse(b"data: a\n\n" + BOM + b"data: b\n\n") == [SSEEvent(data="a")]
    assert parse(b"data: " + BOM + b"\n\n") == [SSEEvent(data="\ufeff")]


def test_partial_bom_prefix_that_is_not_a_bom() -> None:
    # "\xef\xbb" then something else: no BOM, and the bytes are (invalid) data.
    out = parse(b"\xef\xbb", b"x\n\n")
    assert out == [SSEError("undecodable", "event is not valid UTF-8 at byte 0")]


# --- Fields -----------------------------------------------------------------------------------


def test_comment_lines_are_ignored() -> None:
    assert parse(b": keep-alive\n\n:\ndata: a\n: mid\n\n") == [SSEEvent(data="a")]


def test_field_without_colon_has_empty_value() -> None:
    assert parse(b"data\n\n") == [SSEEvent(data="")]
    assert parse(b"event: x\nevent\ndata: a\n\n") == [SSEEvent(data="a", event="message")]


def test_exactly_one_leading_space_is_removed() -> None:
    assert parse(b"data:a\n\n") == [SSEEvent(data="a")]
    assert parse(b"data: a\n\n") == [SSEEvent(data="a")]
    assert parse(b"data:  a \n\n") == [SSEEvent(data=" a ")]
    assert parse(b"id:  7\ndata:x\n\n") == [SSEEvent(data="x", id=" 7", last_event_id=" 7")]


def test_value_keeps_later_colons() -> None:
    assert parse(b"data: a:b: c\n\n") == [SSEEvent(data="a:b: c")]


def test_multi_line_data_is_joined_with_lf() -> None:
    raw = b"data: one\ndata:\ndata: three\n\n"
    assert parse(raw) == [SSEEvent(data="one\n\nthree")]


def test_empty_data_line_dispatches_empty_data() -> None:
    assert parse(b"data:\n\n") == [SSEEvent(data="")]
    assert parse(b"data:\ndata:\n\n") == [SSEEvent(data="\n")]


def test_block_without_data_dispatches_nothing_but_id_and_retry_take_effect() -> None:
    parser = SSEParser()
    assert parser.feed(b"id: 5\nretry: 300\nevent: e\n\n") == []
    assert (parser.last_event_id, parser.retry) == ("5", 300)
    # The event type does not leak into the next block.
    assert parser.feed(b"data: a\n\n") == [SSEEvent(data="a", last_event_id="5")]


def test_id_persists_across_events_and_empty_id_resets_it() -> None:
    raw = b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\n"
    assert parse(raw) == [
        SSEEvent(data="a", id="1", last_event_id="1"),
        SSEEvent(data="b", id=None, last_event_id="1"),
        SSEEvent(data="c", id="", last_event_id=""),
    ]


def test_id_containing_nul_is_ignored() -> None:
    raw = b"id: 1\n\nid: 2\x003\ndata: a\n\nid:\x00\ndata: b\n\n"
    assert parse(raw) == [
        SSEEvent(data="a", id=None, last_event_id="1"),
        SSEEvent(data="b", id=None, last_event_id="1"),
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"1500", 1500),
        (b"0", 0),
        (b"007", 7),
        (b"", None),
        (b"15a", None),
        (b"-1", None),
        (b"1.5", None),
        (b" 15", None),  # the second space is not a digit
        ("\u0661\u0662".encode(), None),  # Arabic-Indic digits are digits, not ASCII digits
        ("\u00b2".encode(), None),
    ],
)
def test_retry_takes_only_ascii_digits(value: bytes, expected: int | None) -> None:
    parser = SSEParser()
    out = parser.feed(b"retry: " + value + b"\ndata: a\n\n")
    assert out == [SSEEvent(data="a", retry=expected)]
    assert parser.retry == expected


def test_retry_persists_while_event_retry_is_per_block() -> None:
    parser = SSEParser()
    assert parser.feed(b"retry: 10\ndata: a\n\ndata: b\n\nretry: x\n\n") == [
        SSEEvent(data="a", retry=10),
        SSEEvent(data="b"),
    ]
    assert parser.retry == 10


def test_unknown_fields_are_ignored() -> None:
    raw = b"foo: bar\nDATA: x\nretryy: 5\n: c\ndata: a\nid : 3\n\n"
    assert parse(raw) == [SSEEvent(data="a")]


def test_empty_event_type_means_message() -> None:
    assert parse(b"event:\ndata: a\n\n") == [SSEEvent(data="a", event="message")]
    assert parse(b"event: \ndata: a\n\n") == [SSEEvent(data="a", event="message")]


def test_blank_lines_between_events_dispatch_nothing() -> None:
    assert parse(b"\n\n\r\n\rdata: a\n\n\n\n\ndata: b\n\n\n") == [
        SSEEvent(data="a"),
        SSEEvent(data="b"),
    ]


def test_mcp_sdk_crlf_bytes() -> None:
    # What the official MCP python-sdk server writes: a priming event, then messages.
    message = b'{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}'
    raw = (
        b"id: 2:3\r\ndata: \r\nretry: 500\r\n\r\n"
        b"id: 2:4\r\nevent: message\r\ndata: " + message + b"\r\n\r\n"
    )
    expected = [
        SSEEvent(data="", id="2:3", last_event_id="2:3", retry=500),
        SSEEvent(data=message.decode(), id="2:4", last_event_id="2:4"),
    ]
    parser = SSEParser()
    assert parser.feed(raw) == expected
    assert (parser.last_event_id, parser.retry) == ("2:4", 500)
    assert parse(*bytewise(raw)) == expected


def test_multibyte_character_split_across_chunks() -> None:
    raw = "data: h\u00e9llo \u2603 \U0001f600\n\n".encode()
    assert parse(*bytewise(raw)) == [SSEEvent(data="h\u00e9llo \u2603 \U0001f600")]


# --- End of stream ------------------------------------------------------------------------------


def test_close_discards_an_unterminated_event() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n\nid: 9\ndata: b\n") == [SSEEvent(data="a")]
    assert parser.close() == []
    # An id of an event that never ended is never the stream's last event ID.
    assert parser.last_event_id == ""
    assert parser.feed(b"\n") == []


def test_close_applies_a_retry_line_of_an_unterminated_event() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\nretry: 250\nretry: 99") == []
    assert parser.retry is None
    assert parser.close() == []
    assert parser.retry == 250  # "99" never ended its line


def test_feed_after_close_returns_nothing() -> None:
    parser = SSEParser()
    parser.close()
    assert parser.feed(b"data: a\n\n") == []
    assert parser.close() == []


# --- Errors --------------------------------------------------------------------------------------


def test_too_large_event_keeps_earlier_events() -> None:
    parser = SSEParser(max_event_bytes=16)
    out = parser.feed(b"data: ok\n\ndata: " + b"x" * 20 + b"\n\ndata: later\n\n")
    assert out == [SSEEvent(data="ok"), SSEError("too_large", "event exceeds 16 bytes")]
    assert parser.failed == out[-1]
    assert parser.feed(b"data: more\n\n") == []
    assert parser.close() == []


def test_event_of_exactly_the_limit_is_accepted() -> None:
    block = b"data: " + b"x" * 10  # 16 bytes
    assert parse(block + b"\r\n\r\n", max_event_bytes=16) == [SSEEvent(data="x" * 10)]
    assert parse(*bytewise(block + b"\n\n"), max_event_bytes=16) == [SSEEvent(data="x" * 10)]


def test_unterminated_event_over_the_limit_fails_without_waiting() -> None:
    parser = SSEParser(max_event_bytes=1000)
    assert parser.feed(b"data: a\n\ndata: ") == [SSEEvent(data="a")]
    out: Result = []
    for _ in range(200):  # no terminator ever: the parser must not keep buffering
        out += parser.feed(b"y" * 10)
    assert out == [SSEError("too_large", "event exceeds 1000 bytes")]
    assert parser.failed is not None


def test_undecodable_event_keeps_earlier_events() -> None:
    parser = SSEParser()
    out = parser.feed(b"id: 1\ndata: ok\n\ndata: \xff\xfe\n\ndata: later\n\n")
    assert out == [
        SSEEvent(data="ok", id="1", last_event_id="1"),
        SSEError("undecodable", "event is not valid UTF-8 at byte 6"),
    ]
    assert parser.failed == out[-1]
    assert parser.last_event_id == "1"
    assert parser.feed(b"data: more\n\n") == []


def test_undecodable_event_across_chunks() -> None:
    raw = b"data: ok\n\ndata: \xe2\x98\n\n"  # a truncated U+2603
    expected = [SSEEvent(data="ok"), SSEError("undecodable", "event is not valid UTF-8 at byte 6")]
    assert parse(raw) == expected
    assert parse(*bytewise(raw)) == expected


def test_constructor_rejects_a_useless_limit() -> None:
    with pytest.raises(ValueError, match="max_event_bytes"):
        SSEParser(max_event_bytes=0)


# --- Encoder -------------------------------------------------------------------------------------


def test_encode_event_examples() -> None:
    assert encode_event(data="hi") == b"data: hi\n\n"
    assert encode_event(data="a\nb", id="2:4", event="message", retry=500) == (
        b"id: 2:4\nretry: 500\ndata: a\ndata: b\n\n"
    )
    assert encode_event(data="", event="ping") == b"event: ping\ndata: \n\n"
    assert encode_event(data="x\r\ny\rz") == b"data: x\ndata: y\ndata: z\n\n"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"id": "a\nb"},
        {"id": "a\rb"},
        {"id": "a\x00b"},
        {"event": "a\nb"},
        {"retry": -1},
    ],
)
def test_encode_event_rejects_fields_a_reader_would_get_wrong(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="SSE"):
        encode_event(data="x", **kwargs)  # type: ignore[arg-type]


def test_encode_comment() -> None:
    assert encode_comment("keep-alive") == b": keep-alive\n\n"
    assert encode_comment("a\r\nb\nc\rd") == b": a b c d\n\n"
    assert parse(encode_comment("x\ny") + encode_event(data="a")) == [SSEEvent(data="a")]


# --- Properties ----------------------------------------------------------------------------------

_LINE_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
_FIELD_NAMES = st.sampled_from(
    ["data", "data", "data", "id", "id", "event", "retry", "retry", "dat", "Data", "x", ""]
)
_VALUES = st.one_of(
    _LINE_TEXT,
    st.from_regex(r"[0-9]{1,6}", fullmatch=True),
    # Edge values: NUL (ids ignore it), BOM and U+2028 (data, not line breaks), non-ASCII digits.
    st.sampled_from(["", " ", ":", "\x00", "1\x002", "\ufeff", "\u2028", "12a", "\u0661"]),
)


@st.composite
def _lines(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["field", "field", "field", "bare", "comment", "blank", "blank"]))
    if kind == "blank":
        return ""
    if kind == "comment":
        return ":" + draw(_LINE_TEXT)
    name = draw(_FIELD_NAMES)
    if kind == "bare":
        return name
    space = draw(st.sampled_from(["", " ", " ", "  "]))
    return f"{name}:{space}{draw(_VALUES)}"


@st.composite
def event_streams(draw: st.DrawFn) -> bytes:
    """Streams of random lines, line endings, comments and blank lines, maybe a BOM."""
    lines = draw(st.lists(_lines(), max_size=30))
    endings = draw(
        st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=len(lines), max_size=len(lines))
    )
    text = "".join(line + end for line, end in zip(lines, endings, strict=True))
    if draw(st.booleans()):  # sometimes an unterminated last line
        text += draw(_lines())
    raw = text.encode()
    if draw(st.booleans()):
        raw = BOM + raw
    return raw


@st.composite
def streams_and_chunkings(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    raw = draw(event_streams())
    cuts = draw(st.lists(st.integers(0, len(raw)), max_size=12))
    return raw, split_at(raw, cuts)


@PROPERTY_SETTINGS
@given(streams_and_chunkings())
def test_chunking_never_changes_the_result(case: tuple[bytes, list[bytes]]) -> None:
    raw, chunks = case
    whole = run([raw])
    assert run(chunks) == whole
    assert run(bytewise(raw)) == whole


@PROPERTY_SETTINGS
@given(streams_and_chunkings())
def test_parser_agrees_with_the_reference(case: tuple[bytes, list[bytes]]) -> None:
    raw, chunks = case
    events, last_event_id, retry = reference_parse(raw)
    assert run(chunks) == (events, last_event_id, retry, None)


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["\n", "\r\n"]), _LINE_TEXT, _LINE_TEXT), max_size=8))
def test_well_formed_events_take_the_fast_path_and_agree(
    events: list[tuple[str, str, str]],
) -> None:
    # The shapes real servers send (`id: `, `event: `, `data: ` lines): the parser's prefix
    # fast path, checked against the reference on its own as well as in the mix above.
    raw = "".join(
        f"id: {i}{nl}event: {event}{nl}data: {data}{nl}data: {data}{nl}{nl}"
        for i, (nl, event, data) in enumerate(events)
    ).encode()
    expected, last_event_id, retry = reference_parse(raw)
    assert len(expected) == len(events)
    assert run([raw]) == (expected, last_event_id, retry, None)


@st.composite
def plain_streams(draw: st.DrawFn) -> bytes:
    """Streams of the plain blocks runs are made of, some with a near miss that must not be
    taken for one: an empty or NUL id, empty data, another event type, a second data line, a
    comment, another field order, no space after the colon."""
    line_end = draw(st.sampled_from(["\n", "\r\n"]))
    fields = draw(st.sampled_from([["data"], ["id", "data"], ["id", "event", "data"]]))
    shape = draw(st.permutations(fields))
    blocks = []
    for k in range(draw(st.integers(0, 8))):
        lines = []
        for field in shape:
            if field == "id":
                lines.append(f"id: {k}")
            elif field == "event":
                lines.append("event: message")
            else:
                lines.append("data: " + draw(st.sampled_from(['{"result":1}', "x", "é", "a b"])))
        if not draw(st.integers(0, 7)):
            lines = draw(
                st.sampled_from(
                    [
                        [f"id: {k}", "data:x"],
                        ["id: ", "data: x"],
                        ["id: a\x00b", "data: x"],
                        ["id:  spaced ", "data: x"],
                        ["id: ~t", "data: x"],
                        ["data: "],
                        ["event: other", "data: x"],
                        ["data: x", "data: y"],
                        [": comment", "data: x"],
                        ["data: x", f"id: {k}"],
                        [],
                    ]
                )
            )
        blocks.append("".join(line + line_end for line in lines) + line_end)
    return "".join(blocks).encode()


@PROPERTY_SETTINGS
@given(streams_and_chunkings())
@pytest.mark.usefixtures("each_run_core")  # the bulk path on each run core
def test_runs_expand_to_exactly_the_events(case: tuple[bytes, list[bytes]]) -> None:
    _, chunks = case
    assert run_with_runs(chunks)[:4] == run(chunks)


@PROPERTY_SETTINGS
@given(plain_streams(), st.lists(st.integers(0, 400), max_size=8))
@pytest.mark.usefixtures("each_run_core")  # the bulk path on each run core
def test_plain_streams_come_as_runs_that_expand_to_exactly_the_events(
    raw: bytes, cuts: list[int]
) -> None:
    chunks = split_at(raw, [c for c in cuts if c <= len(raw)])
    expected = run([raw])
    assert run_with_runs([raw])[:4] == expected
    assert run_with_runs(chunks)[:4] == expected


@pytest.mark.usefixtures("each_run_core")  # the bulk path on each run core
def test_uniform_plain_blocks_are_one_run() -> None:
    sdk = b"".join(b"id: s:%d\r\nevent: message\r\ndata: {}\r\n\r\n" % k for k in range(5))
    parser = SSEParser()
    (item,) = parser.feed_runs(sdk)
    assert isinstance(item, SSERun)
    assert item.ids == [f"s:{k}" for k in range(5)]
    assert len(item) == 5
    assert item.plain_ids  # "s:0" to "s:4" go into our ids as they are
    assert item.data_lines == [b"data: {}"] * 5
    assert not item.notifications
    note = b'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n'
    (notes,) = SSEParser().feed_runs(note * 3)
    assert isinstance(notes, SSERun)
    assert notes.notifications  # the tracker need not look for answers in these
    assert parser.last_event_id == "s:4"
    # Without ids, each event carries the last-event-ID from before the run.
    (item,) = parser.feed_runs(b'data: {"result":{}}\n\ndata: 2\n\n')
    assert isinstance(item, SSERun)
    assert item.ids is None
    assert item.events() == [
        SSEEvent('{"result":{}}', "message", None, "s:4"),
        SSEEvent("2", "message", None, "s:4"),
    ]
    item.start = 1  # a consumer took the first one
    assert len(item) == 1
    assert item.events() == [SSEEvent("2", "message", None, "s:4")]


def _assert_well_shaped(out: Sequence[SSEEvent | SSEError], failed: SSEError | None) -> None:
    assert all(isinstance(item, SSEEvent) for item in out[:-1])
    if out and isinstance(out[-1], SSEError):
        assert failed == out[-1]
    else:
        assert failed is None


@PROPERTY_SETTINGS
@given(
    st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=10), st.sampled_from([8, 64])
)
def test_garbage_never_raises(raw: bytes, cuts: list[int], limit: int) -> None:
    chunks = split_at(raw, [c for c in cuts if c <= len(raw)])
    for max_event_bytes in (1 << 20, limit):
        out, _, _, failed = whole = run([raw], max_event_bytes)
        _assert_well_shaped(out, failed)
        # Errors, like events, do not depend on where the chunks were cut.
        assert run(chunks, max_event_bytes) == whole


@PROPERTY_SETTINGS
@given(st.binary(max_size=200))
def test_nothing_after_an_error(raw: bytes) -> None:
    parser = SSEParser(max_event_bytes=8)
    out = parser.feed(raw + b"\n\n" + b"\xff\n\n")
    assert isinstance(out[-1], SSEError)
    assert parser.failed == out[-1]
    assert parser.feed(b"data: a\n\n") == []


_IDS = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00"))
_NO_NEWLINES = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"))


@PROPERTY_SETTINGS
@given(
    st.lists(
        st.tuples(
            st.text(st.characters(codec="utf-8")),
            st.none() | _IDS,
            _NO_NEWLINES,
            st.none() | st.integers(0, 10**12),
        ),
        max_size=5,
    ),
    st.lists(st.integers(0, 10_000), max_size=6),
)
def test_encode_event_round_trips(
    events: list[tuple[str, str | None, str, int | None]], cuts: list[int]
) -> None:
    raw = b"".join(
        encode_event(data=data, id=id_, event=event, retry=retry) + encode_comment("ping")
        for data, id_, event, retry in events
    )
    expected: list[SSEEvent] = []
    last_event_id = ""
    for data, id_, event, retry in events:
        if id_ is not None:
            last_event_id = id_
        wire_data = data.replace("\r\n", "\n").replace("\r", "\n")
        expected.append(SSEEvent(wire_data, event or "message", id_, last_event_id, retry))
    out, _, _, failed = run(split_at(raw, [c for c in cuts if c <= len(raw)]))
    assert out == expected
    assert failed is None
