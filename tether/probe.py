"""Health verdicts from periodic probes, sans-IO: the sidecar's upstream probe and the control
plane's store probe feed outcomes in, and obey the changes that come out.

Rules it keeps:
1. No verdict before the first outcome (`up is None`): a process that has not probed yet does
   not claim to be healthy.
2. The first outcome decides at once; after that, `fall` failures in a row turn an up verdict
   down and `rise` successes in a row turn a down one up (HAProxy's and Envoy's thresholds),
   so one lost probe does not flap a readiness.
3. `observe` returns a `Change` exactly when the verdict changes (the first verdict included),
   so the loop logs one line per transition, not one per probe.
4. `detail` is the last failure's reason while down, bounded to `MAX_DETAIL` characters (it is
   shown in /readyz and in logs; an error text can be long).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_DETAIL = 200


@dataclass(frozen=True, slots=True)
class Change:
    """The verdict changed: now `up`, and why not when down."""

    up: bool
    detail: str


class ProbeState:
    """Consecutive probe outcomes -> an up/down verdict with hysteresis (rules 1-4)."""

    def __init__(self, *, fall: int = 1, rise: int = 1) -> None:
        if fall < 1 or rise < 1:
            raise ValueError("fall and rise must be at least 1")
        self.fall = fall
        self.rise = rise
        self.up: bool | None = None
        self.detail = "not probed yet"
        self._streak = 0
        """Outcomes in a row that disagree with the verdict."""

    def observe(self, ok: bool, detail: str = "") -> Change | None:
        """One probe's outcome (`detail`: why it failed); the change of verdict, if any."""
        detail = detail[:MAX_DETAIL]
        if self.up is None or self.up == ok:
            first = self.up is None
            self.up = ok
            self._streak = 0
            self.detail = "" if ok else detail
            return Change(ok, self.detail) if first else None
        self._streak += 1
        if self._streak < (self.rise if ok else self.fall):
            return None
        self.up = ok
        self._streak = 0
        self.detail = "" if ok else detail
        return Change(ok, self.detail)
