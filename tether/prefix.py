"""`tether sessions get PREFIX`: which session a unique prefix of its id names, sans-IO.

Sessions are listed in id order, so the ids that start with a prefix are consecutive: the scan
stops at the first id past them, and keeps at most `MAX_CANDIDATES` of them (an ambiguous
prefix is shown with that many, and how many more there were).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_CANDIDATES = 10


@dataclass
class PrefixMatch:
    prefix: str
    candidates: list[str] = field(default_factory=list)
    more: int = 0
    done: bool = False
    """No later id can start with the prefix (the ids passed it)."""

    def feed(self, ids: Iterable[str]) -> None:
        """The next ids in order."""
        for sid in ids:
            if sid.startswith(self.prefix):
                if len(self.candidates) < MAX_CANDIDATES:
                    self.candidates.append(sid)
                else:
                    self.more += 1
            elif sid > self.prefix:
                self.done = True
                return

    @property
    def unique(self) -> str | None:
        return self.candidates[0] if len(self.candidates) == 1 and not self.more else None

    def error(self) -> str:
        """Why the prefix names no one session (call when `unique` is None)."""
        if not self.candidates:
            return f"no session id is or starts with {self.prefix!r}"
        shown = ", ".join(self.candidates)
        more = f" and {self.more} more" if self.more else ""
        total = len(self.candidates) + self.more
        return f"{self.prefix!r} is the start of {total} session ids: {shown}{more}"
