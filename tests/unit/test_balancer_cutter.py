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
