"""Throughput of `SSEParser` on the sidecar's hot path, without I/O.

Run `python bench/parser_bench.py`. Streams of MCP-shaped events (`id`, `event`, one JSON
`data` line) of about 256 B and 4 KiB, with LF and with CRLF endings (the official MCP SDK
server sends CRLF), are fed in 64 KiB chunks; the best of several runs is printed.
"""

from __future__ import annotations

import json
import time

from sidecar.sse import SSEParser

CHUNK = 64 * 1024
STREAM_BYTES = 32 * 1024 * 1024
RUNS = 5


def make_stream(event_size: int, newline: bytes) -> tuple[list[bytes], int]:
    """Return the stream cut into chunks and its number of events."""
    events: list[bytes] = []
    total = 0
    i = 0
    while total < STREAM_BYTES:
        head = b"id: 2:%d%sevent: message%s" % (i, newline, newline)
        payload = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"n": i}}
        body = json.dumps(payload).encode()
        fixed = len(head) + len(b"data: ") + len(body) + 2 * len(newline) + len(b', "pad": ""')
        pad = b"x" * max(0, event_size - fixed)
        data = body[:-1] + b', "pad": "' + pad + b'"}'
        event = head + b"data: " + data + newline + newline
        events.append(event)
        total += len(event)
        i += 1
    stream = b"".join(events)
    chunks = [stream[k : k + CHUNK] for k in range(0, len(stream), CHUNK)]
    return chunks, len(events)


def run(chunks: list[bytes], expected: int) -> float:
    """Parse the whole stream once; return the elapsed seconds."""
    parser = SSEParser()
    count = 0
    start = time.perf_counter()
    for chunk in chunks:
        count += len(parser.feed(chunk))
    elapsed = time.perf_counter() - start
    if count != expected or parser.failed is not None:
        raise SystemExit(f"parsed {count} events, expected {expected} ({parser.failed})")
    return elapsed


def main() -> None:
    print(f"{'event':>8} {'endings':>7} {'events/s':>12} {'MB/s':>8}")
    for event_size in (256, 4096):
        for label, newline in (("LF", b"\n"), ("CRLF", b"\r\n")):
            chunks, n = make_stream(event_size, newline)
            size = sum(map(len, chunks))
            best = min(run(chunks, n) for _ in range(RUNS))
            print(f"{event_size:>7}B {label:>7} {n / best:>12,.0f} {size / best / 1e6:>8.0f}")


if __name__ == "__main__":
    main()
