"""The run core: the bulk path's two per-event loops, compiled or in pure Python.

A stretch of plain events (`sse.SSERun`) costs two loops over its events: finding its lines
(`scan_run`, for the parser) and writing each renumbered event (`format_run`, for the
tracker). On 256 B events they were most of the sidecar's CPU (issue 16), so they also exist
in C (`sidecar/_runcore.c`, built by `pip install`). The C module is used when it was built;
the pure-Python twins here are the fallback, for a build without a compiler.

Rules:

1. Both cores return the same values for the same arguments (the C module's rule 1 and 3);
   the property tests and the fuzz target run the bulk path on each (`use`).
2. C is used when it is built, unless `use()` says otherwise: `tether sidecar --run-core`
   (`auto`, the default, as at import; `c` insists on it and refuses to start without it;
   `python` takes the twins), and tests.
3. Callers read `CORE` at each call (never bind it at import), so `use()` takes effect.
"""

from __future__ import annotations

from itertools import accumulate, repeat
from typing import Final, Literal, Protocol

__all__ = [
    "CORE",
    "MAX_ID_BYTES",
    "PYTHON",
    "RunCore",
    "Scan",
    "compiled",
    "name",
    "plain_ids",
    "use",
]

Scan = tuple[list[bytes], list[str] | None, bool, bool]
"""What `scan_run` finds: each event's `data: ` line, each event's id (None without `id:`
lines), whether every event is an MCP notification, and whether every id is plain
(`plain_ids`; True without ids)."""

DATA_LINE: Final = b"data: "
NOTIFICATION_DATA: Final = b'data: {"jsonrpc":"2.0","method":"notifications/'
"""How the data line of an MCP notification starts, as the SDKs serialize it. A JSON-RPC
message with a method is a request or a notification, never an answer."""
ID_LINE: Final = b"id: "
MAX_ID_BYTES: Final = 2048
"""Longest upstream event id (UTF-8 bytes) the tracker accepts (`tracker.MAX_UPSTREAM_ID_BYTES`):
the longest plain id."""
EVENT_MESSAGE: Final = b"event: message"


class RunCore(Protocol):
    """The two loops; the C module and `PythonCore` both have this shape."""

    def scan_run(self, region: bytes, max_id: int, /) -> Scan | None:
        """The run in `region` (complete blocks, valid UTF-8, the last block's blank line
        implied), or None unless every block has one plain shape: one non-empty `data: `
        line, at most one `id: ` line with a non-empty value and no NUL, at most one
        `event: message` line, in the same order in every block. `max_id` is the longest
        plain id, in bytes."""
        ...

    def format_run(  # noqa: PLR0917 - the C signature: positional, no keyword parsing
        self,
        prefix: bytes,
        seq: int,
        ids: list[str] | None,
        data_lines: list[bytes],
        suffix: bytes,
        total: int,
        /,
    ) -> tuple[list[bytes], list[int]]:
        """Each event's client-facing bytes, `prefix` + its seq (from `seq + 1`) + `.` and
        its upstream id in UTF-8 (or `suffix` when there are no ids) + LF + its data line +
        a blank line; and the running byte total from `total`, `total` first."""
        ...


class PythonCore:
    """The pure-Python twins: each pass is a list or bytes operation that loops in C."""

    @staticmethod
    def scan_run(region: bytes, max_id: int, /) -> Scan | None:  # noqa: C901, PLR0912 - hot path, kept whole
        lines = region.split(b"\n")
        try:
            period = lines.index(b"") + 1  # the first block's lines and its blank line
        except ValueError:
            period = len(lines) + 1  # a single block
        if period > 4:
            return None
        n, rest = divmod(len(lines) + 1, period)
        if rest:
            return None
        lines.append(b"")  # the last block's blank line is implied
        if lines[period - 1 :: period].count(b"") != n:
            return None
        data_lines: list[bytes] | None = None
        notifications = False
        id_column: list[bytes] | None = None
        event_column = False
        for c in range(period - 1):
            column = lines[c::period]
            first = column[0]
            if first.startswith(DATA_LINE) and data_lines is None:
                # The first bytes of each line only (a scan of whole lines costs more), and
                # in one pass when every line is an MCP notification, the common case.
                notifications = sum(map(bytes.startswith, column, repeat(NOTIFICATION_DATA))) == n
                if not notifications and not all(map(bytes.startswith, column, repeat(DATA_LINE))):
                    return None  # another field in this column
                if DATA_LINE in column:
                    return None  # an empty data line: an empty event, the event path's
                data_lines = column
            elif first.startswith(ID_LINE) and id_column is None:
                id_column = column
            elif first == EVENT_MESSAGE and not event_column:
                if column.count(EVENT_MESSAGE) != n:
                    return None
                event_column = True
            else:
                return None
        if data_lines is None:
            return None
        if id_column is None:
            return data_lines, None, notifications, True
        joined = b"\n".join(id_column)
        if joined.count(b"\nid: ") != n - 1 or ID_LINE in id_column or b"\0" in joined:
            return None  # another field here, an empty id (a reset) or a NUL (ignored)
        ids = joined[4:].decode("utf-8").split("\nid: ")
        return data_lines, ids, notifications, plain_ids(ids, max_id)

    @staticmethod
    def format_run(  # noqa: PLR0917 - the same signature as the C function
        prefix: bytes,
        seq: int,
        ids: list[str] | None,
        data_lines: list[bytes],
        suffix: bytes,
        total: int,
        /,
    ) -> tuple[list[bytes], list[int]]:
        seqs = range(seq + 1, seq + len(data_lines) + 1)
        escaped = prefix.replace(b"%", b"%%")
        if ids is not None:
            # Ids never hold a LF: one encode and one split for all of them.
            id_lines = "\n".join(ids).encode().split(b"\n") if ids else []
            fmt = escaped + b"%d.%b\n%b\n\n"
            payloads = list(map(fmt.__mod__, zip(seqs, id_lines, data_lines, strict=True)))
        else:
            fmt = escaped + b"%d" + suffix.replace(b"%", b"%%") + b"\n%b\n\n"
            payloads = list(map(fmt.__mod__, zip(seqs, data_lines, strict=True)))
        return payloads, list(accumulate(map(len, payloads), initial=total))


def plain_ids(ids: list[str], max_id: int) -> bool:
    """Every id goes into our ids as it is (`tracker.encode_cursor` leaves it unchanged and
    `tracker.unusable_upstream_id` takes it): 1 to `max_id` characters of printable ASCII,
    none starting with a space or "~" or ending with a space. Checked in a few C passes."""
    if not ids:
        return True
    joined = "\n".join(ids)
    return (
        "" not in ids
        and joined.isascii()
        and joined.replace("\n", "").isprintable()
        and joined[0] not in (" ", "~")
        and joined[-1] != " "
        and "\n " not in joined
        and " \n" not in joined
        and "\n~" not in joined
        and max(map(len, ids)) <= max_id
    )


PYTHON: Final[RunCore] = PythonCore()


def compiled() -> RunCore | None:
    """The C module, if this installation built it."""
    try:
        from sidecar import _runcore  # absent from a build without a compiler
    except ImportError:
        return None
    return _runcore


def _choose(setting: Literal["auto", "c", "python"]) -> RunCore:
    if setting == "python":
        return PYTHON
    core = compiled()
    if core is not None:
        return core
    if setting == "c":
        raise ImportError(
            "the compiled run core (sidecar._runcore) is not built: "
            "reinstall with a C compiler and Python's headers, or use --run-core python"
        )
    return PYTHON


CORE: RunCore = _choose("auto")
"""The core in use (rule 3)."""


def name(core: RunCore | None = None) -> Literal["c", "python"]:
    """Which core `core` (default: the one in use) is, for logs and metrics."""
    return "python" if (core or CORE) is PYTHON else "c"


def use(which: Literal["auto", "c", "python"] | RunCore) -> RunCore:
    """Switch the core in use, by setting (`tether sidecar --run-core`; ImportError for "c"
    when it is not built) or to a core `use` returned (tests); returns the one used before."""
    global CORE  # noqa: PLW0603 - the one switch, rule 2
    before = CORE
    CORE = _choose(which) if isinstance(which, str) else which
    return before
