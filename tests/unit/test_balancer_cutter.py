"""The balancer's event counter (tests/support/balancer.py `EventCutter`): where it cuts."""

from __future__ import annotations

from tests.support.balancer import EventCutter

SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"


def test_cuts_right_after_the_nth_event_even_inside_a_chunk() -> None:
    cutter = EventCutter(2)
    assert cutter.feed(SSE_HEAD + b"id: 1\ndata: a\n\n") == (
        SSE_HEAD + b"id: 1\ndata: a\n\n",
        False,
    )
    forward, cut = cutter.feed(b"id: 2\ndata: b\n\nid: 3\ndata: c\n\n")
    assert (forward, cut) == (b"id: 2\ndata: b\n\n", True)


def test_counts_a_terminator_split_across_chunks_and_headers_split_too() -> None:
    cutter = EventCutter(1)
    assert cutter.feed(SSE_HEAD[:20]) == (SSE_HEAD[:20], False)
    assert cutter.feed(SSE_HEAD[20:] + b"data: a\n") == (SSE_HEAD[20:] + b"data: a\n", False)
    assert cutter.feed(b"\nid: 2\n") == (b"\n", True)


def test_the_first_event_right_after_the_headers_counts() -> None:
    assert EventCutter(1).feed(SSE_HEAD + b"data: a\n\ndata: b\n\n") == (
        SSE_HEAD + b"data: a\n\n",
        True,
    )


def test_other_responses_and_no_limit_pass_untouched() -> None:
    body = JSON_HEAD + b'{"a": "\\n\\n"}\n\n\n\n'
    assert EventCutter(1).feed(body) == (body, False)
    assert EventCutter(None).feed(SSE_HEAD + b"data: a\n\n") == (SSE_HEAD + b"data: a\n\n", False)


def test_events_without_data_do_not_count_even_in_chunked_framing() -> None:
    """Priming events, resume markers and keepalives carry no message: only messages count,
    also when HTTP chunk-size lines sit between the events."""
    cutter = EventCutter(1)
    marker = b"1d\r\nid: p1.1.0\nretry: 50\ndata: \n\n\r\n"
    keepalive = b"e\r\n: keepalive\n\n\r\n"
    message = b"14\r\nid: p1.1.1\ndata: {}\n\n\r\n"
    assert cutter.feed(SSE_HEAD + marker + keepalive) == (SSE_HEAD + marker + keepalive, False)
    assert cutter.feed(message + message) == (message[:-2], True)


CHUNKED_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def test_a_clean_cut_ends_the_chunked_body_after_the_nth_message() -> None:
    cutter = EventCutter(2, clean=True)
    body = b"id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\ndata: c\n\n"
    framed = b"%x\r\n%s\r\n" % (len(body), body)
    # Fed byte by byte: chunk-size lines, payloads and CRLFs split anywhere.
    out = bytearray()
    for i in range(len(CHUNKED_SSE_HEAD + framed)):
        forward, cut = cutter.feed((CHUNKED_SSE_HEAD + framed)[i : i + 1])
        out += forward
        if cut:
            break
    assert cut
    head, _, rest = bytes(out).partition(b"\r\n\r\n")
    assert head + b"\r\n\r\n" == CHUNKED_SSE_HEAD
    # Re-framed: one chunk per forwarded piece, then the last chunk.
    payload = bytearray()
    while rest != b"0\r\n\r\n":
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        payload += rest[:size]
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]
    assert bytes(payload) == b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n"


def test_a_clean_cutter_passes_the_backends_own_end_on() -> None:
    cutter = EventCutter(5, clean=True)
    body = b"data: a\n\n"
    framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    forward, cut = cutter.feed(CHUNKED_SSE_HEAD + framed)
    assert (forward, cut) == (CHUNKED_SSE_HEAD + framed, False)
