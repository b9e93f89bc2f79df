"""Abuse limits of the control plane: what one caller may hold in memory, as plain counters.

The servicer is a thin loop around these (no I/O here); each decides and returns, the loop
obeys. Together they bound the control plane's memory under a flood of reports, whoever
sends it:

  1. A request carries at most `MAX_ITEMS_PER_REQUEST` items (the sidecar cuts its batches at
     5,000) and at most `MAX_MESSAGE_BYTES` on the wire (gRPC refuses longer messages before
     decoding them). A longer request ends its stream with RESOURCE_EXHAUSTED: decoding it
     alone would cost more memory than the whole read-ahead.
  2. Read-ahead (`ReadAhead`): a ReportEvents stream reads its next request only while its
     unacknowledged requests hold fewer than `READ_AHEAD_ITEMS` items, `READ_AHEAD_BYTES`
     wire bytes and `READ_AHEAD_REQUESTS` requests. So a stream holds at most those limits
     plus one request; a client sending faster than the store flushes is slowed down by
     gRPC flow control (the server stops reading), not by the server's memory growing.
  3. Shared read-ahead (`SharedReadAhead`): all ReportEvents streams together keep at most
     `TOTAL_READ_AHEAD_ITEMS` items and `TOTAL_READ_AHEAD_BYTES` bytes decoded and not yet
     acknowledged, except that a stream with nothing in flight may be admitted up to twice
     those limits: many streams flooding at once share one budget, and a stream that is not
     flooding does not queue behind those that are. Twice the limits is the hard bound (one
     request is admitted whatever its size when nothing else is held). A request waiting for
     admission is held as gRPC decoded it (one per stream), not yet converted; while the budget
     is full no stream reads at all, and the senders wait on gRPC flow control.
  4. Streaming calls per peer (`PeerCalls`): at most `max_calls` concurrent ReportEvents and
     WatchSessions calls per peer key (the caller's host; 0 = no limit); one more is refused
     with RESOURCE_EXHAUSTED. A key is forgotten when its last call ends, so the table holds
     one entry per peer with a call open.

What bounds memory, then: twice rule 3's budget, plus one protobuf request per stream
waiting for admission, plus the write batcher's pending writes (`controlplane.batcher`, its
rule 2), plus each watch's queue. Rule 4 bounds the streams one host can open; the number of
hosts is the deployment's. Measured under floods in BENCHMARKS.md (`python -m bench.cp_flood`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_MESSAGE_BYTES = 4 << 20
"""`grpc.max_receive_message_length` of the server: the sidecar sends an upsert of up to
3 MiB (a large `initialize` body) in a batch cut at about 1 MiB, so 4 MiB (gRPC's default,
set explicitly so that it is a decision, not an accident) admits every batch it sends."""

MAX_ITEMS_PER_REQUEST = 5_000
"""Upserts plus updates in one ReportEvents request: the sidecar cuts its batches at 5,000
(`sidecar.reporter.MAX_BATCH_ITEMS`); keep the two equal."""

READ_AHEAD_ITEMS = 20_000
READ_AHEAD_BYTES = 4 << 20
READ_AHEAD_REQUESTS = 64
"""Rule 2's limits, per ReportEvents stream. 20,000 items keep a sidecar's pipeline full
across a flush (`python -m bench --only control-plane` absorbs about 100,000 updates/s, as
with the unbounded read-ahead before; at 5,000 it fell to about 70,000) while a stream holds
at most about 30,000 decoded items (about 10-20 MiB)."""

TOTAL_READ_AHEAD_ITEMS = 40_000
TOTAL_READ_AHEAD_BYTES = 8 << 20
"""Rule 3's limits, over all ReportEvents streams of the process."""

GRPC_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Without BDP probing a stream's flow-control window stays at gRPC's 64 KiB, so gRPC
    # itself does not read a flooding stream's messages far ahead of the servicer (with it,
    # 16 streams of maximal requests held over 500 MiB).
    ("grpc.http2.bdp_probe", 0),
    # gRPC binds with SO_REUSEPORT by default on Linux: a second control plane started on a
    # busy port would share it, and clients would alternate between two stores. Off, the bind
    # fails and the process says so (`controlplane.server`).
    ("grpc.so_reuseport", 0),
]
"""The server's gRPC options that bound what gRPC buffers below the servicer (rule 1)."""

DEFAULT_MAX_CALLS_PER_PEER = 64
"""Rule 4's default: a sidecar opens one ReportEvents and at most one WatchSessions call, so
64 leaves room for a node's worth of sidecars behind one address (a NAT or a proxy). Each call
can hold about 12 MiB under a flood of maximal requests (one decoded request waiting for
admission, gRPC's buffers), so where every caller has an address of its own (Kubernetes pods)
set 8: the manifests do (`deploy/base/kustomization.yaml`), and 8 such calls peak at about
190 MiB, inside the manifest's 256 MiB (`tests/integration/test_probe2_flood.py`)."""


class RequestTooLargeError(Exception):
    """A request over rule 1's item limit; the message says what to do."""


def check_request_items(items: int) -> None:
    """Rule 1: raise `RequestTooLargeError` for a request of more than the limit."""
    if items > MAX_ITEMS_PER_REQUEST:
        raise RequestTooLargeError(
            f"request carries {items} items; at most {MAX_ITEMS_PER_REQUEST} per request "
            "(split it into several requests)"
        )


@dataclass
class SharedReadAhead:
    """Rule 3: what all report streams together have read and not yet acknowledged."""

    max_items: int = TOTAL_READ_AHEAD_ITEMS
    max_bytes: int = TOTAL_READ_AHEAD_BYTES
    items: int = 0
    bytes: int = 0


@dataclass
class ReadAhead:
    """Rule 2 (and rule 3, through `shared`): what one stream has read and not yet
    acknowledged."""

    shared: SharedReadAhead = field(default_factory=SharedReadAhead)
    max_items: int = READ_AHEAD_ITEMS
    max_bytes: int = READ_AHEAD_BYTES
    max_requests: int = READ_AHEAD_REQUESTS
    items: int = 0
    bytes: int = 0
    requests: int = 0

    def may_read(self) -> bool:
        """Whether to read the stream's next request: rule 2, and rule 3 as far as it can be
        known before the request's size is (a stream with nothing in flight reads unless
        the shared budget is at its hard limit; others, unless it is full)."""
        shared = self.shared
        if self.requests == 0:
            return shared.items < 2 * shared.max_items and shared.bytes < 2 * shared.max_bytes
        return (
            self.items < self.max_items
            and self.bytes < self.max_bytes
            and self.requests < self.max_requests
            and shared.items < shared.max_items
            and shared.bytes < shared.max_bytes
        )

    def may_admit(self, items: int, nbytes: int) -> bool:
        """Whether a request just read may be decoded and kept now (rule 3). Checked after
        reading, with its size known, so that streams reading at the same moment cannot all
        pass on the same free room."""
        shared = self.shared
        if shared.items == 0 and shared.bytes == 0:
            return True
        factor = 2 if self.requests == 0 else 1
        return (
            shared.items + items <= factor * shared.max_items
            and shared.bytes + nbytes <= factor * shared.max_bytes
        )

    def read(self, items: int, nbytes: int) -> None:
        self.items += items
        self.bytes += nbytes
        self.requests += 1
        self.shared.items += items
        self.shared.bytes += nbytes

    def acknowledged(self, items: int, nbytes: int) -> None:
        self.items -= items
        self.bytes -= nbytes
        self.requests -= 1
        self.shared.items -= items
        self.shared.bytes -= nbytes

    def release_all(self) -> None:
        """The stream ended: give back to the shared budget whatever it still held."""
        self.shared.items -= self.items
        self.shared.bytes -= self.bytes
        self.items = self.bytes = self.requests = 0


@dataclass
class PeerCalls:
    """Rule 4: concurrent streaming calls per peer key."""

    max_calls: int = DEFAULT_MAX_CALLS_PER_PEER
    _open: dict[str, int] = field(default_factory=dict)

    def try_open(self, key: str) -> bool:
        """Count one more call of `key`; False (nothing counted) if that is over the limit."""
        n = self._open.get(key, 0)
        if self.max_calls > 0 and n >= self.max_calls:
            return False
        self._open[key] = n + 1
        return True

    def close(self, key: str) -> None:
        n = self._open.get(key, 0) - 1
        if n > 0:
            self._open[key] = n
        else:
            self._open.pop(key, None)

    def open_calls(self, key: str) -> int:
        return self._open.get(key, 0)

    def __len__(self) -> int:
        """Peers with a call open (rule 4: no entry for a peer without one)."""
        return len(self._open)


def peer_key(peer: str) -> str:
    """The host part of a gRPC peer string (`ipv4:10.0.0.7:51234` -> `ipv4:10.0.0.7`,
    `ipv6:[::1]:5555` -> `ipv6:[::1]`): every connection of one host shares its limits and
    its log lines. Behind a proxy that hides callers' addresses all callers share one key."""
    if peer.startswith(("ipv4:", "ipv6:")):
        host, sep, port = peer.rpartition(":")
        if sep and port.isdigit():
            return host
    return peer
