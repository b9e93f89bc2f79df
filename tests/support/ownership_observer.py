"""Watches session records go by and says which ownership invariants they break.

Pure: fed `SessionRecord`s (from `WatchSessions` PUT events and from polling the store), in the
order they were observed; no I/O, no clock. Used by `tests/protocol`. The numbers are those of
docs/ownership.md:

  I4. A stored stream position never goes backwards: per (session, stream), the `order`
      (owner_epoch, seq) of every record seen is at least the greatest seen before, across
      claims, expiries and re-creations.
  I5. A session's owner epoch never goes backwards, across expiries and re-creations too (the
      fencing token of a dead session must not come back lower: a zombie would win again).
  I6. At most one owner writes at an epoch: every record of a session at epoch e names the
      same owner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tether.model import OwnerName, SessionId, SessionRecord, StreamId


@dataclass
class OwnershipObserver:
    violations: list[str] = field(default_factory=list)
    max_epoch: dict[SessionId, int] = field(default_factory=dict)
    owner_at: dict[tuple[SessionId, int], OwnerName] = field(default_factory=dict)
    max_order: dict[tuple[SessionId, StreamId], tuple[int, int]] = field(default_factory=dict)
    records_seen: int = 0

    def observe(self, record: SessionRecord, *, source: str) -> None:
        """Check one record against everything seen before; note what it breaks."""
        self.records_seen += 1
        sid, epoch = record.session_id, record.owner_epoch
        seen_epoch = self.max_epoch.get(sid, 0)
        if epoch < seen_epoch:
            self.violations.append(
                f"I5 ({source}): session {sid} went back from owner epoch {seen_epoch} to "
                f"{epoch} (owner {record.owner})"
            )
        self.max_epoch[sid] = max(seen_epoch, epoch)
        first = self.owner_at.setdefault((sid, epoch), record.owner)
        if first != record.owner:
            self.violations.append(
                f"I6 ({source}): session {sid} at owner epoch {epoch} written by {first} and "
                f"by {record.owner}"
            )
        for stream_id, position in record.streams.items():
            key = (sid, stream_id)
            seen = self.max_order.get(key)
            if seen is not None and position.order < seen:
                self.violations.append(
                    f"I4 ({source}): stream {stream_id} of {sid} went back from (epoch, seq) "
                    f"{seen} to {position.order}"
                )
            self.max_order[key] = max(seen or position.order, position.order)
