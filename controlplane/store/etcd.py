"""The clustered session store: etcd through aetcd (`etcd://h1:p1,h2:p2[/prefix]`).

Implements `controlplane.store.protocol.SessionStore`, for any number of control-plane
replicas sharing one etcd cluster.

Key space (under a configurable prefix, `/tether` by default):
    <prefix>/owner-gen/<owner>             put with every session given to the owner
    <prefix>/owners/<owner>/<session_id>   one per session, empty, on the session's lease
    <prefix>/sessions/<session_id>         the record (JSON, `controlplane.store.codec`)
    <prefix>/tombstones/<session_id>       written in the same transaction as a DeleteSession
    <prefix>/graves/<session_id>           the session's `records.Tombstone` (rule 8)
    <prefix>/upstreams/<upstream_id>       the session naming that upstream session (rule 9)

Rules:
  1. Atomic, monotonic writes: read the key, merge with `controlplane.records`, then a
     transaction that puts the result only if the key's mod revision is unchanged; on
     conflict read again and retry. A stale write changes nothing and sends nothing.
  2. Expiry is etcd's: every write attaches the session to a lease. Leases are shared per
     time bucket (`lease_granularity`), so a write costs no extra round trip; a session
     expires between `session_ttl` and `session_ttl + lease_granularity` after its last write
     (etcd may round a lease up to its minimum TTL), and `expires_at` is the lease's deadline.
  3. The owner index mirrors the sessions exactly: every transaction that puts a session
     puts its `owners/` key with the same lease (and deletes the previous owner's key if the
     owner changed); a delete removes both; a lease expiry removes both in one revision.
  4. Sessions per owner: a write that gives an owner a session first reads, in one
     read-only transaction, the count of the owner's index keys and the mod revision of its
     `owner-gen` key; its write transaction compares that mod revision again and puts the
     `owner-gen` key (on the session's lease). Every write that adds to an owner's count
     puts that key, so if the compare holds nobody added a session since the count; etcd
     transactions are serialisable, and deletions and expiries only lower the count, so a
     committed write leaves the owner at most at the limit, whatever the number of
     replicas: the bound is exact. The compare reads one key, not the owner's range, so
     etcd's apply loop pays nothing per session held. (Sessions written before the index
     existed count from their next write; an `owner-gen` key that expires, or is put by
     another writer, only makes the compare fail and the write retry.) Within one store
     such writes of one owner are serialised, so they do not make each other retry.
  5. Watch: the snapshot is read in pages of `SNAPSHOT_PAGE_SIZE` keys, every page at the
     revision of the first (an MVCC read of one point in time); the watch starts at the next
     revision, so nothing is missed or repeated. etcd reports both a delete and a lease
     expiry as DELETE; a delete by request also writes a tombstone in the same revision,
     which is how a watcher tells DELETE from EXPIRE. Tombstones expire on their own lease.
     A page too large for one gRPC message (4 MiB) is read again with half as many keys.
  6. A broken watch (the member it used died, the connection dropped, etcd cancelled it) is
     opened again from the revision after the last event delivered, through the same
     channel, which fails over to another endpoint; it gives up (StoreUnavailableError) only
     after `watch_reconnect_timeout` seconds without success (a failed snapshot likewise).
     If that revision has been compacted, the watch resynchronises: a snapshot at a new
     revision (PUT per live session), DELETE or EXPIRE (as its tombstone says) for every
     session it had shown that is gone, SYNCED, then changes, without ending the stream. For
     this a watch keeps the ids of the sessions it has shown live: memory in the number of
     sessions (about 100 bytes each), not in their records.
  7. All endpoints of a cluster: aetcd's Client takes one host and port, but the pair only
     becomes a gRPC target string, so `ipv4:a:p1,b:p2,c:p3` gives one channel that fails
     over between members (hostnames are resolved to addresses when the store opens).
     Watches use etcd's Watch RPC on that channel directly rather than aetcd's watcher: one
     stream per watch (gRPC flow control bounds what a slow watcher buffers; aetcd's shared
     watcher queues without bound) and every response seen (compaction, cancellation).
     Watches ask etcd to fragment large responses (a catch-up batches up to a thousand
     revisions), so none exceeds a gRPC message; a revision counts as delivered once its
     last fragment is.
  8. Re-creation tombstones (`controlplane.records` rule 9; not the `tombstones/` keys of
     rule 5, which only tell DELETE from EXPIRE): every transaction that puts a session
     also puts its `graves/` key (owner, epoch, fingerprint) on a lease of twice the TTL
     from the same bucket, so it outlives the session's lease by one `session_ttl` whether
     the session is deleted (the delete rewrites it) or its lease expires (no one is there
     to write anything then). A creation reads the grave, and its transaction compares the
     grave's mod revision too: the check and the creation are atomic.
  9. Upstream sessions (`controlplane.records` rule 10): every transaction that puts a
     session with an upstream session id puts `upstreams/<id>` = its session id on the
     session's lease. A write naming an id its session does not have yet reads that key and
     the holder's record (a holder counts if it is live and still names the id), and its
     transaction compares the key's mod revision: check and write are atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import math
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.rtypes
import aetcd.utils
import grpc

from controlplane import records
from controlplane.store.codec import (
    clamp_page_size,
    decode_page_token,
    decode_record,
    encode_page_token,
    encode_record,
)
from controlplane.store.protocol import (
    DEFAULT_MAX_SESSIONS_PER_OWNER,
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    SNAPSHOT_PAGE_SIZE,
    ApplyResult,
    OwnerLimitError,
    OwnerLimitReached,
    SessionNotFoundError,
    StoreUnavailableError,
    WritesRefused,
)
from tether.model import (
    OwnerName,
    SessionEvent,
    SessionEventType,
    SessionId,
    SessionPage,
    SessionRecord,
    SessionWrite,
    write_session_id,
)

FULL_OWNER_MEMO = 0.1
FULL_OWNERS_KEPT = 1024
"""An owner found at its session limit is refused again without counting for this many
seconds (creations of one owner are serialised, so a flood of creations over the limit would
otherwise cost one count round trip each, one after the other); at most this many owners are
remembered. A delete or a claim through this store forgets the owner at once; a place freed
through another replica (or by an expiry) is taken after the memo (the next renewal)."""
log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_TXN_ATTEMPTS = 32
"""Conflicting writers on one session retry this often before giving up (UNAVAILABLE)."""

WATCH_RETRY_MIN = 0.05
WATCH_RETRY_MAX = 2.0
"""Backoff between attempts to open a broken watch again (seconds)."""


@dataclass(frozen=True, slots=True)
class EtcdStoreConfig:
    endpoints: tuple[tuple[str, int], ...]
    prefix: str = "/tether"
    session_ttl: float = 3600.0
    lease_granularity: float | None = None
    """Width of a lease bucket in seconds; default a tenth of the TTL, between 1 and 60 s."""
    tombstone_ttl: int = 60
    timeout: int = 10
    """Seconds before one etcd request fails."""
    max_concurrency: int = 64
    """Sessions of one `apply` batch written in parallel."""
    max_sessions_per_owner: int = DEFAULT_MAX_SESSIONS_PER_OWNER
    """Sessions one owner may hold (rule 4); 0: no limit."""
    page_size: int = SNAPSHOT_PAGE_SIZE
    """Keys a watch snapshot reads at a time (rule 5)."""
    watch_reconnect_timeout: float = 60.0
    """Seconds a broken watch keeps trying to open again before it fails (rule 6)."""
    username: str | None = None
    """etcd user (with `password`) when the cluster has authentication enabled."""
    password: str | None = None
    tls_ca: bytes | None = None
    """PEM of the CA that signed etcd's client certificate: setting it (or a client
    certificate) switches the connection to TLS."""
    tls_cert: bytes | None = None
    """Client certificate (PEM) for etcd's --client-cert-auth, with `tls_key`."""
    tls_key: bytes | None = None
    tls_server_name: str | None = None
    """Name etcd's certificate must carry, if not the address connected to."""

    def effective_granularity(self) -> float:
        if self.lease_granularity is not None:
            return self.lease_granularity
        return min(max(self.session_ttl / 10, 1.0), 60.0)


def grpc_target(endpoints: Sequence[tuple[str, int]]) -> tuple[str, int]:
    """The (host, port) pair for aetcd's Client whose `host:port` is a gRPC target naming
    every endpoint. Endpoints must be IP literals (see `resolve_endpoints`)."""
    if not endpoints:
        raise ValueError("no etcd endpoints")
    if len(endpoints) == 1:
        host, port = endpoints[0]
        return (f"[{host}]" if ":" in host else host), port
    versions = {ipaddress.ip_address(h).version for h, _ in endpoints}
    if len(versions) != 1:
        raise ValueError("etcd endpoints mix IPv4 and IPv6 addresses")
    scheme = "ipv4" if versions == {4} else "ipv6"

    def fmt(host: str) -> str:
        return f"[{host}]" if scheme == "ipv6" else host

    head = ",".join(f"{fmt(h)}:{p}" for h, p in endpoints[:-1])
    last_host, last_port = endpoints[-1]
    return f"{scheme}:{head},{fmt(last_host)}", last_port


def resolve_endpoints(endpoints: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Replace hostnames by their addresses (blocking DNS: call it in a thread)."""
    if len(endpoints) <= 1:
        return list(endpoints)
    out: list[tuple[str, int]] = []
    for host, port in endpoints:
        try:
            ipaddress.ip_address(host)
            out.append((host, port))
            continue
        except ValueError:
            pass
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
        out.extend((str(info[4][0]), port) for info in infos)
    return list(dict.fromkeys(out))


class _Leases:
    """Shared leases per time bucket: every write in bucket b gets a lease that ends at
    (b + 1) * width + ttl."""

    def __init__(self, client: aetcd.Client, *, ttl: float, width: float) -> None:
        self._client = client
        self._ttl = ttl
        self._width = width
        self._by_bucket: dict[int, tuple[int, float]] = {}
        self._lock = asyncio.Lock()

    async def get(self, now: float) -> tuple[int, float]:
        """(lease id, deadline) for a write at `now`."""
        bucket = math.floor(now / self._width)
        found = self._by_bucket.get(bucket)
        if found is not None:
            return found
        async with self._lock:
            found = self._by_bucket.get(bucket)
            if found is not None:
                return found
            deadline = (bucket + 1) * self._width + self._ttl
            lease = await self._client.lease(max(1, math.ceil(deadline - now)))
            for old in [b for b in self._by_bucket if b < bucket]:
                del self._by_bucket[old]
            self._by_bucket[bucket] = (int(lease.id), deadline)
            return self._by_bucket[bucket]

    def forget(self) -> None:
        """Drop cached leases (etcd lost one, e.g. after a restore)."""
        self._by_bucket.clear()


def _is_lease_missing(error: BaseException) -> bool:
    return "lease not found" in str(error)


def _decode(kv: Any) -> SessionRecord | None:
    """The record a session key holds, or None (logged) if someone wrote something else
    there: one bad key must not break listings and watches of every other session."""
    try:
        return decode_record(kv.value)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        log.warning("etcd key %r holds no session record (%s): skipped", bytes(kv.key)[:300], e)
        return None


def _encode_grave(t: records.Tombstone) -> bytes:
    return json.dumps(
        {
            "owner": t.owner,
            "owner_epoch": t.owner_epoch,
            "credential_fingerprint": t.credential_fingerprint,
            "expires_at": t.expires_at,
        },
        separators=(",", ":"),
    ).encode()


def _decode_grave(sid: SessionId, data: bytes) -> records.Tombstone | None:
    """A `graves/` key's tombstone; None (logged) if it holds something else."""
    try:
        d = json.loads(data)
        return records.Tombstone(
            sid,
            OwnerName(str(d["owner"])),
            int(d["owner_epoch"]),
            str(d["credential_fingerprint"]),
            float(d["expires_at"]),
        )
    except (ValueError, KeyError, TypeError) as e:
        log.warning("etcd grave of session %s unreadable (%s): ignored", sid, e)
        return None


class _Compacted(Exception):
    """The revision a watch or a snapshot read needs has been compacted away."""


class _WatchBroken(Exception):
    """etcd ended or cancelled a watch stream (not a compaction)."""


class _OwnerLocks:
    """One lock per owner with writes in progress, dropped when its last user leaves."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, owner: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(owner, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[owner] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[owner]
            if users == 1:
                del self._locks[owner]
            else:
                self._locks[owner] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


@dataclass
class _WatchState:
    """Where one watch has got to (rule 6)."""

    revision: int = 0
    """Every change up to this revision has been delivered."""
    known: set[bytes] = field(default_factory=set)
    """Ids of the sessions the watch has shown live."""
    tombstones: dict[bytes, int] = field(default_factory=dict)
    """Tombstones seen and not yet matched with their delete: id -> revision."""


class EtcdSessionStore:
    """`SessionStore` on etcd; create with `await EtcdSessionStore.open(config)`."""

    def __init__(
        self,
        config: EtcdStoreConfig,
        client: aetcd.Client,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._client = client
        self._clock = clock
        prefix = "/" + config.prefix.strip("/") if config.prefix.strip("/") else ""
        self._sessions = f"{prefix}/sessions/".encode()
        self._tombstones = f"{prefix}/tombstones/".encode()
        self._owners = f"{prefix}/owners/".encode()
        self._owner_gen = f"{prefix}/owner-gen/".encode()
        self._graves = f"{prefix}/graves/".encode()  # outside the watched range
        self._upstreams = f"{prefix}/upstreams/".encode()  # likewise
        # Sessions and tombstones, not the owner index ("owners/" < "sessions/" < "tombstones/").
        self._watch_end = aetcd.utils.prefix_range_end(self._tombstones)
        self._owner_locks = _OwnerLocks()
        self._full_owners: dict[str, float] = {}
        """Owners found at their limit, and when (monotonic): see `FULL_OWNER_MEMO`."""
        self._leases = _Leases(client, ttl=config.session_ttl, width=config.effective_granularity())
        self._tombstone_leases = _Leases(client, ttl=config.tombstone_ttl, width=10.0)
        self._grave_leases = _Leases(
            client, ttl=2 * config.session_ttl, width=config.effective_granularity()
        )
        self._limit = asyncio.Semaphore(config.max_concurrency)
        self._closed = False
        self._closing = asyncio.Event()

    @classmethod
    async def open(
        cls, config: EtcdStoreConfig, *, clock: Callable[[], float] = time.time
    ) -> EtcdSessionStore:
        endpoints = await asyncio.to_thread(resolve_endpoints, config.endpoints)
        host, port = grpc_target(endpoints)
        # Reconnect soon after a member comes back or another answers (rule 6); gRPC's own
        # default backoff grows to two minutes.
        options: dict[str, Any] = {
            "grpc.initial_reconnect_backoff_ms": 100,
            "grpc.min_reconnect_backoff_ms": 100,
            "grpc.max_reconnect_backoff_ms": 2000,
        }
        kwargs: dict[str, Any] = {
            "host": host,
            "port": port,
            "timeout": config.timeout,
            "username": config.username,
            "password": config.password,
            "options": options,
        }
        client: aetcd.Client
        if config.tls_ca is not None or config.tls_cert is not None:
            from controlplane.store.etcd_tls import TlsEtcdClient

            if config.tls_server_name:
                options["grpc.ssl_target_name_override"] = config.tls_server_name
            credentials = grpc.ssl_channel_credentials(
                root_certificates=config.tls_ca,
                private_key=config.tls_key,
                certificate_chain=config.tls_cert,
            )
            client = TlsEtcdClient(credentials=credentials, **kwargs)
        else:
            client = aetcd.Client(**kwargs)
        store = cls(config, client, clock=clock)
        try:
            await store._call(client.connect)
        except BaseException:
            await client.close()
            raise
        return store

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise StoreUnavailableError("store is closed")
        try:
            return await fn(*args, **kwargs)
        except (aetcd.exceptions.ClientError, grpc.aio.AioRpcError) as e:
            raise StoreUnavailableError(f"etcd: {e}") from e

    def _key(self, sid: SessionId) -> bytes:
        return self._sessions + sid.encode()

    def _owner_range(self, owner: str) -> tuple[bytes, bytes]:
        start = self._owners + owner.encode() + b"/"
        return start, aetcd.utils.prefix_range_end(start)

    def _owner_key(self, owner: str, sid: SessionId) -> bytes:
        return self._owners + owner.encode() + b"/" + sid.encode()

    async def _range(self, request: Any) -> Any:
        """A raw Range call: `_Compacted` if its revision is gone, else as `_call`.

        An answer too large for one gRPC message (4 MiB: large `initialize` bodies) is asked
        for again with half the `limit`, down to one key (etcd values are at most 1.5 MiB);
        the caller reads the `limit` that worked back from `request` (rule 5)."""
        await self._call(self._client.connect)
        while True:
            try:
                return await self._call(
                    self._client.kvstub.Range,
                    request,
                    timeout=self.config.timeout,
                    metadata=self._client.metadata,
                )
            except StoreUnavailableError as e:
                cause = e.__cause__
                if not isinstance(cause, grpc.aio.AioRpcError):
                    raise
                if cause.code() is grpc.StatusCode.OUT_OF_RANGE:
                    raise _Compacted(str(cause.details())) from cause
                if cause.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or request.limit <= 1:
                    raise
                request.limit = max(1, request.limit // 2)

    async def _read(self, sid: SessionId) -> tuple[SessionRecord | None, int]:
        kv = await self._call(self._client.get, self._key(sid))
        if kv is None:
            return None, 0
        return decode_record(kv.value), int(kv.mod_revision)

    async def _read_at_once(self, ranges: Sequence[Any]) -> list[Any]:
        """The answers of `ranges` (RangeRequests), read at one revision in one round trip
        (a transaction of reads only)."""
        request = aetcd.rpc.TxnRequest(
            success=[aetcd.rpc.RequestOp(request_range=r) for r in ranges]
        )
        await self._call(self._client.connect)
        resp = await self._call(
            self._client.kvstub.Txn,
            request,
            timeout=self.config.timeout,
            metadata=self._client.metadata,
        )
        return [r.response_range for r in resp.responses]

    async def _get_many(self, keys: Sequence[bytes]) -> list[Any]:
        """The key-values of `keys` (None where absent), read at one revision, one round trip."""
        answers = await self._read_at_once([aetcd.rpc.RangeRequest(key=key) for key in keys])
        return [a.kvs[0] if a.kvs else None for a in answers]

    async def _guards(
        self, sid: SessionId, current: SessionRecord | None, writes: Sequence[SessionWrite]
    ) -> tuple[records.Tombstone | None, dict[str, SessionId], list[tuple[bytes, int]]]:
        """What rules 8 and 9 need to write `sid`: its tombstone (if it is missing), the live
        holders of the upstream ids its upserts would give it, and the keys read with their
        mod revisions, for the write to compare. One read (two if some id has a holder)."""
        upstream_ids = sorted(records.new_upstream_ids(current, writes))
        keys = [self._upstreams + u.encode() for u in upstream_ids]
        if current is None:
            keys.append(self._graves + sid.encode())
        if not keys:
            return None, {}, []
        kvs = await self._get_many(keys)
        guards = [
            (k, int(kv.mod_revision) if kv is not None else 0)
            for k, kv in zip(keys, kvs, strict=True)
        ]
        grave = None
        if current is None and (kv := kvs.pop()) is not None:
            grave = _decode_grave(sid, bytes(kv.value))
            if grave is not None and grave.expires_at <= self._clock():
                grave = None
        holders: dict[str, SessionId] = {}
        for upstream, kv in zip(upstream_ids, kvs, strict=True):
            if kv is None:
                continue
            holder = SessionId(bytes(kv.value).decode(errors="replace"))
            rec, _ = await self._read(holder)
            if rec is not None and rec.upstream_session_id == upstream:
                holders[upstream] = holder
        return grave, holders, guards

    async def _grave_put(self, record: SessionRecord, ended_at: float) -> Any:
        """The transaction op that leaves `record`'s tombstone, should it end at `ended_at`."""
        lease_id, deadline = await self._call(self._grave_leases.get, self._clock())
        grave = records.tombstone_of(record, ended_at=ended_at, ttl=self.config.session_ttl)
        grave = dataclasses.replace(grave, expires_at=max(grave.expires_at, deadline))
        return self._client.transactions.put(
            self._graves + record.session_id.encode(), _encode_grave(grave), lease=lease_id
        )

    async def _write(
        self,
        sid: SessionId,
        record: SessionRecord,
        mod_revision: int,
        previous: SessionRecord | None,
        guards: Sequence[tuple[bytes, int]] = (),
    ) -> SessionRecord | OwnerLimitReached | None:
        """Put `record` if the key is still at `mod_revision` (rules 1, 3, 4); return the
        record as written, `OwnerLimitReached`, or None if another writer got there first."""
        limit = self.config.max_sessions_per_owner
        if limit <= 0 or (previous is not None and previous.owner == record.owner):
            return await self._put_if_unchanged(
                sid, record, mod_revision, previous, None, guards=guards
            )
        async with self._owner_locks.hold(record.owner):
            now = time.monotonic()
            if now - self._full_owners.get(record.owner, -math.inf) < FULL_OWNER_MEMO:
                return OwnerLimitReached(record.owner, limit, previous)
            count, generation = await self._owned(record.owner)
            if count >= limit:
                self._full_owners.pop(record.owner, None)
                self._full_owners[record.owner] = now
                while len(self._full_owners) > FULL_OWNERS_KEPT:
                    del self._full_owners[next(iter(self._full_owners))]
                return OwnerLimitReached(record.owner, limit, previous)
            return await self._put_if_unchanged(
                sid, record, mod_revision, previous, generation, guards=guards
            )

    async def _owned(self, owner: str) -> tuple[int, int]:
        """(sessions `owner` holds, mod revision of its `owner-gen` key), read at one
        revision (rule 4)."""
        start, end = self._owner_range(owner)
        held, gen_key = await self._read_at_once(
            [
                aetcd.rpc.RangeRequest(key=start, range_end=end, count_only=True),
                aetcd.rpc.RangeRequest(key=self._owner_gen + owner.encode()),
            ]
        )
        count = int(held.count)
        gen = gen_key.kvs
        return count, int(gen[0].mod_revision) if gen else 0

    async def _put_if_unchanged(
        self,
        sid: SessionId,
        record: SessionRecord,
        mod_revision: int,
        previous: SessionRecord | None,
        generation: int | None,
        *,
        guards: Sequence[tuple[bytes, int]] = (),
    ) -> SessionRecord | None:
        """Put `record` and its owner index key (with the lease of now) if the key is still
        at `mod_revision` and, given `generation`, the owner's `owner-gen` key is still at
        that mod revision (rule 4); return the record as written, or None if the transaction
        lost."""
        tx = self._client.transactions
        now = self._clock()
        lease_id, deadline = await self._call(self._leases.get, now)
        record = dataclasses.replace(record, expires_at=deadline)
        compare = [tx.mod(self._key(sid)) == mod_revision]
        success = [
            tx.put(self._key(sid), encode_record(record), lease=lease_id),
            tx.put(self._owner_key(record.owner, sid), b"", lease=lease_id),
            await self._grave_put(record, deadline),
        ]
        if record.upstream_session_id:
            upstream_key = self._upstreams + record.upstream_session_id.encode()
            success.append(tx.put(upstream_key, sid.encode(), lease=lease_id))
        # Rules 8 and 9: the tombstone and the upstream holders read are still as read.
        compare.extend(tx.mod(key) == revision for key, revision in guards)
        if generation is not None:
            gen_key = self._owner_gen + record.owner.encode()
            compare.append(tx.mod(gen_key) == generation)
            success.append(tx.put(gen_key, b"", lease=lease_id))
        if previous is not None and previous.owner != record.owner:
            success.append(tx.delete(self._owner_key(previous.owner, sid)))
        try:
            ok, _ = await self._call(
                self._client.transaction, compare=compare, success=success, failure=[]
            )
        except StoreUnavailableError as e:
            if _is_lease_missing(e):
                self._leases.forget()
                self._grave_leases.forget()
                return None
            raise
        return record if ok else None

    async def _apply_one(
        self, sid: SessionId, writes: list[SessionWrite]
    ) -> tuple[SessionId, ApplyResult]:
        async with self._limit:
            for _ in range(MAX_TXN_ATTEMPTS):
                current, mod = await self._read(sid)
                grave, holders, guards = await self._guards(sid, current, writes)
                merged = records.apply_writes(
                    current,
                    writes,
                    now=self._clock(),
                    ttl=self.config.session_ttl,
                    tombstone=grave,
                    upstream_holders=holders,
                )
                if merged.refused and not merged.changed:
                    return sid, WritesRefused(merged.refused)
                if not merged.changed or merged.record is None:
                    return sid, merged.record
                written = await self._write(sid, merged.record, mod, current, guards)
                if written is not None:
                    return sid, written
        raise StoreUnavailableError(f"session {sid}: too many conflicting writers")

    async def apply(self, *, writes: Sequence[SessionWrite]) -> Mapping[SessionId, ApplyResult]:
        by_session: dict[SessionId, list[SessionWrite]] = {}
        for w in writes:
            by_session.setdefault(write_session_id(w), []).append(w)
        results = await asyncio.gather(*(self._apply_one(s, ws) for s, ws in by_session.items()))
        return dict(results)

    async def get(self, *, session_id: SessionId) -> SessionRecord | None:
        return (await self._read(session_id))[0]

    async def list_page(
        self,
        *,
        owner: OwnerName | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> SessionPage:
        after = decode_page_token(page_token)
        size = clamp_page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        start = self._key(after) + b"\0" if after is not None else self._sessions
        end = aetcd.utils.prefix_range_end(self._sessions)
        found: list[SessionRecord] = []
        # Owner filtering happens here, so read in chunks until the page (plus one, to know
        # whether there is a next page) is full or the range is exhausted.
        limit = size + 1
        while len(found) <= size:
            request = aetcd.rpc.RangeRequest(key=start, range_end=end, limit=limit)
            resp = await self._range(request)
            limit = request.limit
            for kv in resp.kvs:
                rec = _decode(kv)
                if rec is not None and (owner is None or rec.owner == owner):
                    found.append(rec)
            if not resp.more or not resp.kvs:
                break
            start = bytes(resp.kvs[-1].key) + b"\0"
        if len(found) > size:
            found = found[:size]
            return SessionPage(tuple(found), encode_page_token(found[-1].session_id))
        return SessionPage(tuple(found))

    async def count(self) -> int:
        """A count-only range over the session keys: etcd counts, no record is sent. A session
        counts until its lease ends (rule 2)."""
        end = aetcd.utils.prefix_range_end(self._sessions)
        resp = await self._range(
            aetcd.rpc.RangeRequest(key=self._sessions, range_end=end, count_only=True)
        )
        return int(resp.count)

    async def delete(self, *, session_id: SessionId) -> SessionRecord | None:
        tx = self._client.transactions
        key = self._key(session_id)
        for _ in range(MAX_TXN_ATTEMPTS):
            current, mod = await self._read(session_id)
            if current is None:
                return None
            lease_id, _ = await self._call(self._tombstone_leases.get, self._clock())
            grave = await self._grave_put(current, self._clock())
            ok, _ = await self._call(
                self._client.transaction,
                compare=[tx.mod(key) == mod],
                success=[
                    # The tombstone comes first, so watchers see it before the delete.
                    tx.put(self._tombstones + session_id.encode(), b"", lease=lease_id),
                    tx.delete(key),
                    tx.delete(self._owner_key(current.owner, session_id)),
                    grave,
                ],
                failure=[],
            )
            if ok:
                self._full_owners.pop(current.owner, None)  # a place is free now
                return current
        raise StoreUnavailableError(f"session {session_id}: too many conflicting writers")

    async def claim(
        self,
        *,
        session_id: SessionId,
        owner: OwnerName,
        expected_owner_epoch: int | None = None,
    ) -> SessionRecord:
        for _ in range(MAX_TXN_ATTEMPTS):
            current, mod = await self._read(session_id)
            if current is None:
                raise SessionNotFoundError(session_id)
            new = records.claim(
                current,
                owner=owner,
                expected_owner_epoch=expected_owner_epoch,
                now=self._clock(),
                ttl=self.config.session_ttl,
            )
            written = await self._write(session_id, new, mod, current)
            if isinstance(written, OwnerLimitReached):
                raise OwnerLimitError(written.owner, written.limit)
            if written is not None:
                self._full_owners.pop(current.owner, None)  # a place is free now
                return written
        raise StoreUnavailableError(f"session {session_id}: too many conflicting writers")

    async def watch(self) -> AsyncGenerator[SessionEvent, None]:
        state = _WatchState()
        while True:
            async with contextlib.aclosing(self._sync(state)) as snapshot:
                async for event in snapshot:
                    yield event
            try:
                async with contextlib.aclosing(self._follow(state)) as changes:
                    async for event in changes:
                        yield event
                return
            except _Compacted as e:
                log.warning(
                    "etcd watch: revision %d is compacted (%s); resynchronising",
                    state.revision + 1,
                    e,
                )

    async def _sync(self, state: _WatchState) -> AsyncGenerator[SessionEvent, None]:
        """A snapshot in pages at one revision, the sessions gone since `state` was last in
        sync, and SYNCED (rules 5, 6). Retries if its revision is compacted mid-way or etcd
        is unreachable, within `watch_reconnect_timeout`."""
        end = aetcd.utils.prefix_range_end(self._sessions)
        failing_since: float | None = None
        while True:
            fresh: set[bytes] = set()
            revision = 0
            start = self._sessions
            limit = self.config.page_size
            try:
                while True:
                    request = aetcd.rpc.RangeRequest(
                        key=start, range_end=end, limit=limit, revision=revision
                    )
                    resp = await self._range(request)
                    limit = request.limit
                    revision = revision or int(resp.header.revision)
                    for kv in resp.kvs:
                        rec = _decode(kv)
                        if rec is None:
                            continue
                        name = bytes(kv.key)[len(self._sessions) :]
                        fresh.add(name)
                        state.known.add(name)
                        yield SessionEvent(SessionEventType.PUT, rec.session_id, rec)
                    if not resp.more or not resp.kvs:
                        break
                    start = bytes(resp.kvs[-1].key) + b"\0"
                    del resp
                gone = state.known - fresh
                deleted = await self._tombstoned(gone, revision) if gone else set()
            except (_Compacted, StoreUnavailableError) as e:
                if self.closed():
                    return  # the watch ends with the store
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("etcd watch snapshot failed (%s); reading it again", e)
                elif now - failing_since > self.config.watch_reconnect_timeout:
                    raise StoreUnavailableError(f"etcd watch snapshot: {e}") from e
                await self._pause(WATCH_RETRY_MAX)
                continue
            for name in sorted(gone):
                kind = SessionEventType.DELETE if name in deleted else SessionEventType.EXPIRE
                yield SessionEvent(kind, SessionId(name.decode()), None)
            state.known = fresh
            state.revision = revision
            state.tombstones.clear()
            yield SessionEvent(SessionEventType.SYNCED)
            return

    async def _tombstoned(self, names: set[bytes], revision: int) -> set[bytes]:
        """Which of `names` have a tombstone at `revision` (deleted, not expired)."""
        found: set[bytes] = set()
        start = self._tombstones
        end = aetcd.utils.prefix_range_end(self._tombstones)
        while True:
            resp = await self._range(
                aetcd.rpc.RangeRequest(
                    key=start,
                    range_end=end,
                    limit=self.config.page_size,
                    revision=revision,
                    keys_only=True,
                )
            )
            for kv in resp.kvs:
                name = bytes(kv.key)[len(self._tombstones) :]
                if name in names:
                    found.add(name)
            if not resp.more or not resp.kvs:
                return found
            start = bytes(resp.kvs[-1].key) + b"\0"

    def closed(self) -> bool:
        """A method, not an attribute: it changes while a watch awaits."""
        return self._closed

    async def _pause(self, seconds: float) -> None:
        """Backoff that ends early when the store closes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _follow(self, state: _WatchState) -> AsyncGenerator[SessionEvent, None]:
        """Changes after `state.revision`, across broken streams (rule 6). Returns when the
        store closes; raises `_Compacted`, or `StoreUnavailableError` when giving up."""
        broken_since: float | None = None
        delay = WATCH_RETRY_MIN
        while not self._closed:
            reason = "the stream ended"
            try:
                async with contextlib.aclosing(self._stream(state)) as stream:
                    async for event in stream:
                        if event is not None:
                            yield event
                            continue
                        if broken_since is not None:
                            log.info("etcd watch open again from revision %d", state.revision + 1)
                        broken_since = None
                        delay = WATCH_RETRY_MIN
            except grpc.aio.AioRpcError as e:
                reason = f"{e.code().name}: {e.details()}"
            except (StoreUnavailableError, _WatchBroken) as e:
                reason = str(e)
            if self.closed():
                return
            now = time.monotonic()
            if broken_since is None:
                broken_since = now
                log.warning(
                    "etcd watch broken (%s); watching again from revision %d",
                    reason,
                    state.revision + 1,
                )
            elif now - broken_since > self.config.watch_reconnect_timeout:
                raise StoreUnavailableError(
                    f"etcd watch: broken for {now - broken_since:.0f} s: {reason}"
                )
            await self._pause(delay)
            delay = min(delay * 2, WATCH_RETRY_MAX)

    async def _stream(self, state: _WatchState) -> AsyncGenerator[SessionEvent | None, None]:
        """One Watch stream from `state.revision + 1`: None once etcd has created the watch,
        then the session events; ends or raises when the stream does."""
        await self._call(self._client.connect)
        stub = aetcd.rpc.WatchStub(self._client.channel)
        call = stub.Watch(metadata=self._client.metadata)
        seen = state.revision
        try:
            await call.write(
                aetcd.rpc.WatchRequest(
                    create_request=aetcd.rpc.WatchCreateRequest(
                        key=self._sessions,
                        range_end=self._watch_end,
                        start_revision=state.revision + 1,
                        prev_kv=True,
                        fragment=True,
                    )
                )
            )
            async for resp in call:
                if resp.compact_revision:
                    raise _Compacted(f"compacted up to {resp.compact_revision}")
                if resp.canceled:
                    raise _WatchBroken(resp.cancel_reason or "cancelled by etcd")
                if resp.created:
                    yield None
                for ev in resp.events:
                    seen = max(seen, int(ev.kv.mod_revision))
                    event = self._event_of(ev, state)
                    if event is not None:
                        yield event
                if not resp.fragment:
                    # A revision split over fragments counts once whole: a stream broken
                    # half-way through one resumes at its start (a repeat is not a regression).
                    state.revision = max(state.revision, seen)
        finally:
            call.cancel()

    def _event_of(self, ev: Any, state: _WatchState) -> SessionEvent | None:
        """The session event of one etcd event, or None (a tombstone)."""
        key = bytes(ev.kv.key)
        if key.startswith(self._tombstones):
            if ev.type == aetcd.rpc.Event.PUT:
                state.tombstones[key[len(self._tombstones) :]] = int(ev.kv.mod_revision)
            return None
        if not key.startswith(self._sessions):
            return None
        name = key[len(self._sessions) :]
        if ev.type == aetcd.rpc.Event.PUT:
            rec = _decode(ev.kv)
            if rec is None:
                return None
            state.tombstones.pop(name, None)
            state.known.add(name)
            return SessionEvent(SessionEventType.PUT, rec.session_id, rec)
        if name not in state.known:
            return None  # never shown (a key that held no record)
        state.known.discard(name)
        sid = SessionId(name.decode(errors="replace"))
        last = _decode(ev.prev_kv) if ev.HasField("prev_kv") else None
        deleted = state.tombstones.pop(name, None) == int(ev.kv.mod_revision)
        kind = SessionEventType.DELETE if deleted else SessionEventType.EXPIRE
        return SessionEvent(kind, sid, last)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        await self._client.close()
