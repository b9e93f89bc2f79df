"""The clustered session store: etcd through aetcd (`etcd://h1:p1,h2:p2[/prefix]`).

Implements `controlplane.store.protocol.SessionStore`, for any number of control-plane
replicas sharing one etcd cluster.

Key space (under a configurable prefix, `/tether` by default):
    <prefix>/sessions/<session_id>     the record (JSON, `controlplane.store.codec`)
    <prefix>/tombstones/<session_id>   written in the same transaction as a DeleteSession

  * Atomic, monotonic writes: read the key, merge with `controlplane.records`, then a
    transaction that puts the result only if the key's mod revision is unchanged; on conflict
    read again and retry. A stale write changes nothing and sends nothing.
  * Expiry is etcd's: every write attaches the session to a lease. Leases are shared per time
    bucket (`lease_granularity`), so a write costs no extra round trip; a session expires
    between `session_ttl` and `session_ttl + lease_granularity` after its last write (etcd
    may round a lease up to its minimum TTL), and `expires_at` is the lease's deadline.
  * Watch: a range read gives the snapshot and its revision; the watch starts at the next
    revision, so nothing is missed or repeated. etcd reports both a delete and a lease expiry
    as DELETE; a delete by request also writes a tombstone in the same revision, which is how
    a watcher tells DELETE from EXPIRE. Tombstones expire on their own lease.
  * All endpoints of a cluster: aetcd's Client takes one host and port, but the pair only
    becomes a gRPC target string, so `ipv4:a:p1,b:p2,c:p3` gives one channel that fails over
    between members (hostnames are resolved to addresses when the store opens).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import math
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
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
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    SessionNotFoundError,
    StoreUnavailableError,
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

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_TXN_ATTEMPTS = 32
"""Conflicting writers on one session retry this often before giving up (UNAVAILABLE)."""


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
        self._root = f"{prefix}/".encode()
        self._sessions = f"{prefix}/sessions/".encode()
        self._tombstones = f"{prefix}/tombstones/".encode()
        self._leases = _Leases(client, ttl=config.session_ttl, width=config.effective_granularity())
        self._tombstone_leases = _Leases(client, ttl=config.tombstone_ttl, width=10.0)
        self._limit = asyncio.Semaphore(config.max_concurrency)
        self._closed = False

    @classmethod
    async def open(
        cls, config: EtcdStoreConfig, *, clock: Callable[[], float] = time.time
    ) -> EtcdSessionStore:
        endpoints = await asyncio.to_thread(resolve_endpoints, config.endpoints)
        host, port = grpc_target(endpoints)
        kwargs: dict[str, Any] = {
            "host": host,
            "port": port,
            "timeout": config.timeout,
            "username": config.username,
            "password": config.password,
        }
        client: aetcd.Client
        if config.tls_ca is not None or config.tls_cert is not None:
            from controlplane.store.etcd_tls import TlsEtcdClient

            if config.tls_server_name:
                kwargs["options"] = {"grpc.ssl_target_name_override": config.tls_server_name}
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

    async def _read(self, sid: SessionId) -> tuple[SessionRecord | None, int]:
        kv = await self._call(self._client.get, self._key(sid))
        if kv is None:
            return None, 0
        return decode_record(kv.value), int(kv.mod_revision)

    async def _put_if_unchanged(
        self, sid: SessionId, record: SessionRecord, mod_revision: int
    ) -> SessionRecord | None:
        """Put `record` (with the lease of now) if the key is still at `mod_revision`;
        return the record as written, or None if another writer got there first."""
        tx = self._client.transactions
        now = self._clock()
        lease_id, deadline = await self._call(self._leases.get, now)
        record = dataclasses.replace(record, expires_at=deadline)
        try:
            ok, _ = await self._call(
                self._client.transaction,
                compare=[tx.mod(self._key(sid)) == mod_revision],
                success=[tx.put(self._key(sid), encode_record(record), lease=lease_id)],
                failure=[],
            )
        except StoreUnavailableError as e:
            if _is_lease_missing(e):
                self._leases.forget()
                return None
            raise
        return record if ok else None

    async def _apply_one(
        self, sid: SessionId, writes: list[SessionWrite]
    ) -> tuple[SessionId, SessionRecord | None]:
        async with self._limit:
            for _ in range(MAX_TXN_ATTEMPTS):
                current, mod = await self._read(sid)
                merged = records.apply_writes(
                    current, writes, now=self._clock(), ttl=self.config.session_ttl
                )
                if not merged.changed or merged.record is None:
                    return sid, merged.record
                written = await self._put_if_unchanged(sid, merged.record, mod)
                if written is not None:
                    return sid, written
        raise StoreUnavailableError(f"session {sid}: too many conflicting writers")

    async def apply(
        self, *, writes: Sequence[SessionWrite]
    ) -> Mapping[SessionId, SessionRecord | None]:
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
        while len(found) <= size:
            await self._call(self._client.connect)
            resp = await self._call(
                self._client.kvstub.Range,
                aetcd.rpc.RangeRequest(key=start, range_end=end, limit=size + 1),
                timeout=self.config.timeout,
                metadata=self._client.metadata,
            )
            for kv in resp.kvs:
                rec = decode_record(kv.value)
                if owner is None or rec.owner == owner:
                    found.append(rec)
            if not resp.more or not resp.kvs:
                break
            start = bytes(resp.kvs[-1].key) + b"\0"
        if len(found) > size:
            found = found[:size]
            return SessionPage(tuple(found), encode_page_token(found[-1].session_id))
        return SessionPage(tuple(found))

    async def delete(self, *, session_id: SessionId) -> SessionRecord | None:
        tx = self._client.transactions
        key = self._key(session_id)
        for _ in range(MAX_TXN_ATTEMPTS):
            current, mod = await self._read(session_id)
            if current is None:
                return None
            lease_id, _ = await self._call(self._tombstone_leases.get, self._clock())
            ok, _ = await self._call(
                self._client.transaction,
                compare=[tx.mod(key) == mod],
                success=[
                    # The tombstone comes first, so watchers see it before the delete.
                    tx.put(self._tombstones + session_id.encode(), b"", lease=lease_id),
                    tx.delete(key),
                ],
                failure=[],
            )
            if ok:
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
            written = await self._put_if_unchanged(session_id, new, mod)
            if written is not None:
                return written
        raise StoreUnavailableError(f"session {session_id}: too many conflicting writers")

    async def watch(self) -> AsyncGenerator[SessionEvent, None]:
        snapshot = await self._call(self._client.get_prefix, self._sessions)
        revision = int(snapshot.header.revision)
        for kv in snapshot:
            rec = decode_record(kv.value)
            yield SessionEvent(SessionEventType.PUT, rec.session_id, rec)
        yield SessionEvent(SessionEventType.SYNCED)

        watch = await self._call(
            self._client.watch_prefix, self._root, start_revision=revision + 1, prev_kv=True
        )
        tombstones: dict[bytes, int] = {}
        try:
            events = aiter(watch)
            while True:
                try:
                    ev = await anext(events)
                except StopAsyncIteration:
                    return
                except aetcd.exceptions.ClientError as e:
                    raise StoreUnavailableError(f"etcd watch: {e}") from e
                key = bytes(ev.kv.key)
                if key.startswith(self._tombstones):
                    name = key[len(self._tombstones) :]
                    if ev.kind == aetcd.rtypes.EventKind.PUT:
                        tombstones[name] = int(ev.kv.mod_revision)
                    continue
                if not key.startswith(self._sessions):
                    continue
                name = key[len(self._sessions) :]
                sid = SessionId(name.decode())
                if ev.kind == aetcd.rtypes.EventKind.PUT:
                    tombstones.pop(name, None)
                    yield SessionEvent(SessionEventType.PUT, sid, decode_record(ev.kv.value))
                    continue
                last = decode_record(ev.prev_kv.value) if ev.prev_kv is not None else None
                deleted = tombstones.pop(name, None) == int(ev.kv.mod_revision)
                kind = SessionEventType.DELETE if deleted else SessionEventType.EXPIRE
                yield SessionEvent(kind, sid, last)
        finally:
            if not self._closed:
                try:
                    await watch.cancel()
                except aetcd.exceptions.ClientError:
                    log.debug("cancelling an etcd watch failed", exc_info=True)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._client.close()
