"""Who may do what: roles, the policy file that grants them, and the rule of each call.

The policy file (YAML, `tether control-plane --policy-file`):

    bindings:
      - role: sidecar
        principals: ["system:serviceaccount:tether:tether-mcp"]
      - role: viewer
        principals: ["cn:oncall-*"]
      - role: admin
        principals: ["spiffe://example.org/ns/ops/sa/tether-admin"]

Patterns are shell-style globs (`fnmatch`, case-sensitive; `*` matches `/` too), matched
against every subject of a principal (`controlplane.identity.Principal.subjects`). A
principal has the roles of every binding it matches.

Rules:
  1. The development callers (anonymous when no authentication is configured, the shared
     token) may do everything, unredacted.
  2. Without a policy file every authenticated principal (certificate, ServiceAccount token)
     is a sidecar and nothing else (fail safe: nobody may list or delete).
  3. sidecar (acts as its principal's `name`): ReportEvents, writing only sessions it owns
     under its own name: an upsert naming another owner is rejected INVALID here, a write to
     a session another sidecar owns is rejected FENCED by `controlplane.records` rule 6;
     ClaimSession for itself only; DeleteSession of a session it owns (what an MCP client's
     DELETE does); WatchSessions filtered to its own name; GetSession of any session,
     unredacted (adoption needs the whole record: the fingerprint to check the client's
     credential, the `initialize` body to re-initialize the upstream).
  4. viewer: ListSessions, GetSession and WatchSessions, with `credential_fingerprint`,
     `initialize_request`, `upstream_session_id` and the streams' `upstream_event_id`
     emptied (`redact`): what binds a session and what reaches its upstream session.
  5. admin: what a viewer may, unredacted, and DeleteSession of any session.
  6. A principal without a usable name (identity rule 6) cannot act as a sidecar.
  7. Anything else is PERMISSION_DENIED with a message naming the principal, the call and
     what it would need, and a log line: at most one per principal and call per
     `DENIAL_LOG_INTERVAL` (`tether.logthrottle`, bounded), then a summary with the count
     held back.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controlplane.identity import Principal
from tether.logthrottle import ThrottledLog
from tether.model import (
    OwnerName,
    Rejection,
    RejectionReason,
    ReportBatch,
    SessionRecord,
    SessionUpsert,
)

log = logging.getLogger(__name__)

DENIAL_LOG_INTERVAL = 60.0


class PolicyError(ValueError):
    """The policy file is unusable; the message says where and why."""


class Role(enum.Enum):
    SIDECAR = "sidecar"
    VIEWER = "viewer"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Binding:
    role: Role
    patterns: tuple[str, ...]
    _compiled: tuple[re.Pattern[str], ...] = dataclasses.field(default=(), repr=False)

    def matches(self, principal: Principal) -> bool:
        return any(p.fullmatch(s) for p in self._compiled for s in principal.subjects)


@dataclass(frozen=True, slots=True)
class Policy:
    """Which principals have which roles; `None` where a policy is taken means rule 2."""

    bindings: tuple[Binding, ...]

    @classmethod
    def parse(cls, text: str, *, source: str = "policy") -> Policy:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PolicyError(f"{source}: not YAML: {e}") from e
        if not isinstance(data, dict) or set(data) != {"bindings"}:
            raise PolicyError(f"{source}: expected a mapping with one key, 'bindings'")
        items = data["bindings"]
        if not isinstance(items, list):
            raise PolicyError(f"{source}: 'bindings' must be a list")
        return cls(
            tuple(_binding(item, f"{source}: bindings[{i}]") for i, item in enumerate(items))
        )

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise PolicyError(f"--policy-file: cannot read {path}: {e}") from e
        return cls.parse(text, source=str(path))

    def roles_of(self, principal: Principal) -> frozenset[Role]:
        return frozenset(b.role for b in self.bindings if b.matches(principal))


def _binding(item: Any, where: str) -> Binding:
    if not isinstance(item, dict) or set(item) != {"role", "principals"}:
        raise PolicyError(f"{where}: expected 'role' and 'principals'")
    roles = ", ".join(r.value for r in Role)
    try:
        role = Role(item["role"])
    except ValueError:
        raise PolicyError(f"{where}: role {item['role']!r} is not one of {roles}") from None
    patterns = item["principals"]
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise PolicyError(f"{where}: 'principals' must be a list of non-empty patterns")
    compiled = tuple(re.compile(fnmatch.translate(p)) for p in patterns)
    return Binding(role, tuple(patterns), compiled)


def redact(record: SessionRecord) -> SessionRecord:
    """A viewer's copy of a record (rule 4): no credential fingerprint, no `initialize`, no
    upstream session id nor upstream stream cursors (what reaches the upstream session)."""
    streams = {
        sid: dataclasses.replace(p, upstream_event_id="") for sid, p in record.streams.items()
    }
    return dataclasses.replace(
        record,
        credential_fingerprint="",
        initialize_request=b"",
        upstream_session_id="",
        streams=streams,
    )


@dataclass(frozen=True, slots=True)
class Denied:
    """A refused call; `message` is sent to the caller with PERMISSION_DENIED."""

    message: str


@dataclass(frozen=True, slots=True)
class Read:
    """An allowed read; `redacted`: pass every record through `redact`."""

    redacted: bool


class Access:
    """What one caller may do in one call (rules 1 to 6); no I/O."""

    def __init__(self, principal: Principal, roles: frozenset[Role]) -> None:
        self.principal = principal
        self.roles = roles
        self.sidecar_name: OwnerName | None = (
            principal.name if Role.SIDECAR in roles and not principal.trusted else None
        )

    def _denied(self, call: str, needs: str) -> Denied:
        roles = ", ".join(sorted(r.value for r in self.roles)) or "none"
        return Denied(f"{self.principal.id} (roles: {roles}) may not {call}: {needs}")

    def _is(self, role: Role) -> bool:
        return self.principal.trusted or role in self.roles

    def read(self, call: str) -> Read | Denied:
        """ListSessions, GetSession (rules 3 to 5)."""
        if self._is(Role.ADMIN) or (call == "GetSession" and self.sidecar_name is not None):
            return Read(redacted=False)
        if Role.VIEWER in self.roles:
            return Read(redacted=True)
        return self._denied(call, "needs the viewer or admin role")

    def watch(self, owner: OwnerName | None) -> Read | Denied:
        if self._is(Role.ADMIN):
            return Read(redacted=False)
        if self.sidecar_name is not None and owner == self.sidecar_name:
            return Read(redacted=False)
        if Role.VIEWER in self.roles:
            return Read(redacted=True)
        if self.sidecar_name is not None:
            return self._denied(
                f"WatchSessions(owner={owner or ''!r})",
                f"a sidecar watches only its own sessions (owner={self.sidecar_name!r})",
            )
        return self._denied("WatchSessions", "needs the viewer or admin role")

    def claim(self, owner: OwnerName) -> Denied | None:
        if self.principal.trusted or (self.sidecar_name is not None and owner == self.sidecar_name):
            return None
        if self.sidecar_name is not None:
            return self._denied(
                f"ClaimSession for {owner!r}",
                f"a sidecar claims sessions only for itself ({self.sidecar_name!r})",
            )
        return self._denied("ClaimSession", "needs the sidecar role and a usable name")

    @property
    def deletes_any(self) -> bool:
        return self._is(Role.ADMIN)

    def delete(self, record: SessionRecord) -> Denied | None:
        """DeleteSession of `record` (an admin's needs no record: `deletes_any`)."""
        if self.deletes_any or (
            self.sidecar_name is not None and record.owner == self.sidecar_name
        ):
            return None
        if self.sidecar_name is not None:
            return self._denied(
                f"DeleteSession of {record.session_id!r}",
                f"it is owned by {record.owner!r}; a sidecar deletes only its own sessions",
            )
        return self._denied("DeleteSession", "needs the admin role")

    def report(self) -> Denied | None:
        if self.principal.trusted or self.sidecar_name is not None:
            return None
        return self._denied("ReportEvents", "needs the sidecar role and a usable name")

    def writes(self, batch: ReportBatch) -> tuple[ReportBatch, tuple[Rejection, ...]]:
        """Rule 3 for one report batch of an allowed reporter: every write carries the sidecar
        as its `writer` (records rule 6 does the rest at the store); an upsert naming another
        owner is rejected INVALID here. A trusted caller's batch passes unchanged."""
        name = self.sidecar_name
        if name is None:
            return batch, ()
        upserts: list[SessionUpsert] = []
        rejected: list[Rejection] = []
        for u in batch.upserts:
            if u.session.owner != name:
                rejected.append(
                    Rejection(
                        u.session.session_id,
                        "",
                        RejectionReason.INVALID,
                        f"sidecar {name!r} may write sessions only as their owner {name!r}, "
                        f"not as {u.session.owner!r}",
                    )
                )
            else:
                upserts.append(dataclasses.replace(u, writer=name))
        updates = tuple(dataclasses.replace(u, writer=name) for u in batch.updates)
        return dataclasses.replace(batch, upserts=tuple(upserts), updates=updates), tuple(rejected)


class Authorizer:
    """The policy (None: rule 2) and the limited log of refusals (rule 7)."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy
        self._denials = ThrottledLog(log, burst=1, interval=DENIAL_LOG_INTERVAL)

    def access(self, principal: Principal) -> Access:
        if principal.trusted:
            return Access(principal, frozenset(Role))
        if self.policy is None:
            return Access(principal, frozenset({Role.SIDECAR}))
        return Access(principal, self.policy.roles_of(principal))

    def log_denial(self, access: Access, call: str, denied: Denied, peer: str) -> None:
        self._denials.log(
            ("permission denied", access.principal.id, call),
            f"denials of {call} to {access.principal.id}",
            logging.WARNING,
            "permission denied (%s): %s",
            peer,
            denied.message,
        )
