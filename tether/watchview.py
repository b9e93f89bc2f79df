"""What `tether sessions watch` prints, sans-IO: events in, lines out.

Rules:
1. Columns are aligned: each column starts wide enough for its usual values (`MIN_WIDTHS`) and
   is as wide as its longest value so far, so a longer value (a long session id) widens its
   column for the lines after it and never shifts the ones before it.
2. Position updates are coalesced: a PUT is printed when something the table shows other than
   positions changed (a new session, another owner or epoch, streams added or ended); a PUT
   that only moved stream positions is counted and printed with the next line of that session
   (`UPDATES`), not on its own. `show_all` prints every event.
3. The memory is bounded: at most `MAX_TRACKED` sessions are remembered (the least recently
   seen is forgotten first; a forgotten session's next PUT is printed, as if new). DELETE and
   EXPIRE forget the session.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

MAX_TRACKED = 100_000
HEADER = ("EVENT", "SESSION", "OWNER", "EPOCH", "STREAMS", "SEQ", "UPDATES")
MIN_WIDTHS = (6, 36, 16, 5, 7, 6, 7)
"""Widths the columns start at: every event name, a UUID session id, a pod name's usual length,
so that most watches never widen a column (rule 1)."""
SYNCED_LINE = "-- synced: changes follow --"


@dataclass(frozen=True, slots=True)
class Shown:
    """What a session's line shows besides positions (rule 2's comparison)."""

    owner: str
    epoch: int
    streams: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One event as the view needs it: `kind` is PUT, DELETE, EXPIRE or SYNCED; `seq` the sum
    of the session's streams' positions."""

    kind: str
    session_id: str = ""
    owner: str = ""
    epoch: int = 0
    streams: int = 0
    seq: int = 0


class WatchView:
    """Rules 1-3; `feed` returns the lines to print (header first, once)."""

    def __init__(self, *, show_all: bool = False, max_tracked: int = MAX_TRACKED) -> None:
        self.show_all = show_all
        self.max_tracked = max_tracked
        self._widths = [max(len(h), w) for h, w in zip(HEADER, MIN_WIDTHS, strict=True)]
        self._header_done = False
        self._shown: OrderedDict[str, tuple[Shown, int]] = OrderedDict()
        """Session -> what its last line showed, and position updates coalesced since."""

    def _line(self, cells: tuple[str, ...]) -> str:
        self._widths = [max(w, len(c)) for w, c in zip(self._widths, cells, strict=True)]
        return "  ".join(c.ljust(w) for c, w in zip(cells, self._widths, strict=True)).rstrip()

    def feed(self, ev: WatchEvent) -> list[str]:
        lines: list[str] = []
        if not self._header_done:
            self._header_done = True
            lines.append(self._line(HEADER))
        if ev.kind == "SYNCED":
            lines.append(SYNCED_LINE)
            return lines
        coalesced = 0
        if ev.kind == "PUT":
            shown = Shown(ev.owner, ev.epoch, ev.streams)
            before = self._shown.pop(ev.session_id, None)
            if before is not None:
                coalesced = before[1]
            if before is not None and before[0] == shown and not self.show_all:
                self._remember(ev.session_id, shown, coalesced + 1)
                return lines
            self._remember(ev.session_id, shown, 0)
        else:
            before = self._shown.pop(ev.session_id, None)
            coalesced = before[1] if before is not None else 0
        cells = (
            ev.kind,
            ev.session_id,
            ev.owner or "-",
            str(ev.epoch),
            str(ev.streams),
            str(ev.seq),
            str(coalesced) if coalesced else "",
        )
        lines.append(self._line(cells))
        return lines

    def _remember(self, session_id: str, shown: Shown, coalesced: int) -> None:
        self._shown[session_id] = (shown, coalesced)
        while len(self._shown) > self.max_tracked:
            self._shown.popitem(last=False)
