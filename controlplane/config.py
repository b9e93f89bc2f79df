"""Control-plane configuration: store URLs and the server's settings, as frozen dataclasses.

Store URLs (the `--store` flag):
    sqlite:///relative/or/absolute/path.db     (sqlite:////abs also accepted)
    etcd://host1:2379,host2:2379[/prefix]      every member of one cluster; prefix /tether
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from controlplane.identity import HOME_NAMESPACE, TokenSettings
from controlplane.limits import DEFAULT_MAX_CALLS_PER_PEER
from controlplane.store.protocol import DEFAULT_MAX_SESSIONS_PER_OWNER, SessionStore
from tether.grpc_security import ServerSecurity

DEFAULT_SQLITE_PATH = "tether-sessions.db"
DEFAULT_STORE_URL = f"sqlite:///{DEFAULT_SQLITE_PATH}"
DEFAULT_ETCD_PREFIX = "/tether"
_PREFIX_PATTERN = re.compile(r"(/[A-Za-z0-9._~-]+)+")


class StoreUrlError(ValueError):
    """A store URL that cannot be used; the message says why and what is expected."""


@dataclass(frozen=True, slots=True)
class SqliteUrl:
    path: Path

    def __str__(self) -> str:
        return f"sqlite:///{self.path}"


@dataclass(frozen=True, slots=True)
class EtcdUrl:
    endpoints: tuple[tuple[str, int], ...]
    prefix: str = DEFAULT_ETCD_PREFIX

    def __str__(self) -> str:
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints)
        return f"etcd://{hosts}{self.prefix}"


StoreUrl = SqliteUrl | EtcdUrl

_EXPECTED = "expected sqlite:///PATH or etcd://HOST:PORT[,HOST:PORT...][/PREFIX]"


def _parse_endpoint(text: str, url: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise StoreUrlError(f"{url!r}: endpoint {text!r} is not HOST:PORT; {_EXPECTED}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise StoreUrlError(f"{url!r}: port {port} out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not re.fullmatch(r"[A-Za-z0-9.:-]+", host):
        raise StoreUrlError(f"{url!r}: bad host {host!r}")
    return host, port


def parse_store_url(url: str) -> StoreUrl:
    """Parse a `--store` URL; raise `StoreUrlError` with a readable reason."""
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://") :]
        if not rest.startswith("/") or rest == "/":
            raise StoreUrlError(f"{url!r}: {_EXPECTED}")
        path = unquote(rest[1:])
        if not path or path.endswith("/"):
            raise StoreUrlError(f"{url!r}: the SQLite path names no file")
        return SqliteUrl(Path(path))
    if url.startswith("etcd://"):
        rest = url[len("etcd://") :]
        hosts, slash, prefix = rest.partition("/")
        if not hosts:
            raise StoreUrlError(f"{url!r}: no endpoints; {_EXPECTED}")
        endpoints = tuple(_parse_endpoint(h, url) for h in hosts.split(","))
        prefix = "/" + prefix.strip("/") if slash and prefix.strip("/") else DEFAULT_ETCD_PREFIX
        if not _PREFIX_PATTERN.fullmatch(prefix) or "/." in prefix:
            raise StoreUrlError(f"{url!r}: bad key prefix {prefix!r}")
        return EtcdUrl(endpoints, prefix)
    raise StoreUrlError(f"{url!r}: unknown scheme; {_EXPECTED}")


async def open_store(
    url: StoreUrl,
    *,
    session_ttl: float,
    etcd_username: str | None = None,
    etcd_password: str | None = None,
    etcd_tls: EtcdTls | None = None,
    max_sessions_per_owner: int = DEFAULT_MAX_SESSIONS_PER_OWNER,
) -> SessionStore:
    """Open the store a URL names (imports only the backend it needs)."""
    if isinstance(url, SqliteUrl):
        from controlplane.store.sqlite import SqliteSessionStore, SqliteStoreConfig

        return await SqliteSessionStore.open(
            SqliteStoreConfig(
                path=url.path,
                session_ttl=session_ttl,
                max_sessions_per_owner=max_sessions_per_owner,
            )
        )
    from controlplane.store.etcd import EtcdSessionStore, EtcdStoreConfig

    return await EtcdSessionStore.open(
        EtcdStoreConfig(
            endpoints=url.endpoints,
            prefix=url.prefix,
            session_ttl=session_ttl,
            username=etcd_username,
            password=etcd_password,
            tls_ca=etcd_tls.ca if etcd_tls else None,
            tls_cert=etcd_tls.cert if etcd_tls else None,
            tls_key=etcd_tls.key if etcd_tls else None,
            tls_server_name=etcd_tls.server_name if etcd_tls else None,
            max_sessions_per_owner=max_sessions_per_owner,
        )
    )


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """Client TLS towards etcd: PEM bytes, read once at start-up."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class ControlPlaneConfig:
    """Everything `serve` needs; `tether control-plane` flags map one to one onto it."""

    listen: str = "127.0.0.1:50051"
    store: StoreUrl = SqliteUrl(Path(DEFAULT_SQLITE_PATH))
    session_ttl: float = 3600.0
    """Seconds without a report after which a session expires."""
    flush_interval: float = 0.05
    """Seconds between store flushes of coalesced reports."""
    shutdown_grace: float = 5.0
    """Seconds in-flight RPCs get to finish on SIGTERM/SIGINT."""
    security: ServerSecurity | None = None
    """TLS, mutual TLS and a bearer token on the gRPC port (plaintext when None)."""
    tokens: TokenSettings | None = None
    """Verify Kubernetes ServiceAccount tokens (`controlplane.identity` rule 3)."""
    home_namespace: str = HOME_NAMESPACE
    """Whose pods act under their bare pod name (`controlplane.identity` rule 6)."""
    policy_file: Path | None = None
    """Roles of principals (`controlplane.policy`); None: authenticated callers are sidecars."""
    etcd_username: str | None = None
    etcd_password: str | None = None
    etcd_tls: EtcdTls | None = None
    max_sessions_per_owner: int = DEFAULT_MAX_SESSIONS_PER_OWNER
    """Sessions one owner (sidecar) may hold; 0: no limit."""
    max_calls_per_peer: int = DEFAULT_MAX_CALLS_PER_PEER
    """Concurrent ReportEvents and WatchSessions calls one peer host may hold (0: no limit)."""
    tracing: bool = False
    """A server span per unary call (`controlplane.tracing`; the `tracing` extra), exported as
    the standard `OTEL_*` variables say."""
    admin_listen: str | None = None
    """HOST:PORT of the admin port (`/metrics`, `/healthz`; port 0 picks one); None: none."""
