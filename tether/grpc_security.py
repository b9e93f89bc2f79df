"""TLS, mutual TLS and bearer tokens on the control plane's gRPC port.

One place for both ends, so the sidecar, the `tether sessions` CLI and the control plane agree:
- TLS: the server presents `cert`/`key`; clients verify it against `ca`.
- Mutual TLS: the server also requires a client certificate signed by `client_ca`; clients
  present `cert`/`key`.
- Bearer token: clients send `authorization: Bearer <token>` on every call, the token read
  from a file so it never appears in a process list. The file is read again whenever it
  changes (size, mtime or inode: kubelet rotates projected ServiceAccount tokens by swapping
  the file), checked as each call starts; an unreadable new file keeps the last token.
  The control plane's side (which tokens it accepts, who the caller is) is in
  `controlplane.identity`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("tether.grpc_security")

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class SecurityConfigError(ValueError):
    """A TLS or token setting is unusable; the message names it."""


def read_file(path: Path | None, what: str) -> bytes | None:
    """The bytes of `path` (None for None); a clear SecurityConfigError naming `what`."""
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc


def read_token(path: Path | None, what: str) -> str | None:
    raw = read_file(path, what)
    if raw is None:
        return None
    token = raw.decode(errors="replace").strip()
    if not token or any(c in token for c in "\r\n"):
        raise SecurityConfigError(f"{what}: {path} must hold one non-empty line")
    return token


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """How a client (sidecar, CLI) talks to the control plane."""

    ca: Path | None = None
    """CA that signed the control plane's certificate; setting it (or `cert`) enables TLS."""
    cert: Path | None = None
    """Client certificate for mutual TLS (with `key`)."""
    key: Path | None = None
    token_file: Path | None = None
    """File holding the bearer token to send."""
    server_name: str | None = None
    """Name to check the server certificate against, if not the host in the address."""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise SecurityConfigError("a client certificate needs both --*-cert and --*-key")

    @property
    def tls(self) -> bool:
        return self.ca is not None or self.cert is not None


@dataclass(frozen=True, slots=True)
class ServerSecurity:
    """What the control plane requires of its callers."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    """Require client certificates signed by this CA (mutual TLS)."""
    token_file: Path | None = None
    """Require `authorization: Bearer <token>` with the token in this file."""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise SecurityConfigError("TLS needs both --tls-cert and --tls-key")
        if self.client_ca is not None and self.cert is None:
            raise SecurityConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")


class TokenFile:
    """A bearer token read from a file, read again when the file changes (module docstring)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self._what = what
        self._state = self._file_state()
        token = read_token(path, what)
        assert token is not None
        self._token = token
        self.reads = 1

    def _file_state(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns, st.st_ino)

    def token(self) -> str:
        state = self._file_state()
        if state is not None and state != self._state:
            self._state = state
            try:
                token = read_token(self.path, self._what)
            except SecurityConfigError as e:
                log.warning("%s; keeping the token read before", e)
            else:
                assert token is not None
                self._token = token
                self.reads += 1
        return self._token


class _WithToken:
    """A multi-callable that adds the bearer token to each call's metadata."""

    def __init__(self, inner: Any, token: TokenFile) -> None:
        self._inner = inner
        self._token = token

    def __call__(self, *args: Any, metadata: Any = None, **kwargs: Any) -> Any:
        header = ("authorization", f"Bearer {self._token.token()}")
        return self._inner(*args, metadata=grpc.aio.Metadata(*(metadata or ()), header), **kwargs)


class _TokenChannel(grpc.aio.Channel):
    """A channel whose calls carry the bearer token.

    Not a client interceptor: grpc.aio feeds an intercepted stream's writes through a task
    of its own, and when the server ends the stream first (a refused token, a restart) that
    task waits for a next write forever, one leaked task per failed report stream."""

    def __init__(self, channel: grpc.aio.Channel, token: TokenFile) -> None:
        self._channel = channel
        self._token = token

    async def __aenter__(self) -> _TokenChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.close(None)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _WithToken(self._channel.unary_unary(*args, **kwargs), self._token)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _WithToken(self._channel.unary_stream(*args, **kwargs), self._token)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _WithToken(self._channel.stream_unary(*args, **kwargs), self._token)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _WithToken(self._channel.stream_stream(*args, **kwargs), self._token)


def open_channel(
    target: str,
    security: ClientSecurity | None,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[Any] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to `target` with the given security (plaintext when None), and the
    given grpc.aio client interceptors (the sidecar's tracing)."""
    security = security or ClientSecurity()
    opts = list(options)
    token = None
    if security.token_file is not None:
        token = TokenFile(security.token_file, "--control-plane-token-file")
        if not security.tls:
            log.warning("sending a bearer token to %s over plaintext gRPC", target)
    chosen = list(interceptors) or None
    channel = _secure_channel(target, security, opts, chosen) if security.tls else None
    channel = channel or grpc.aio.insecure_channel(target, options=opts, interceptors=chosen)
    return channel if token is None else _TokenChannel(channel, token)


def _secure_channel(
    target: str,
    security: ClientSecurity,
    opts: list[tuple[str, Any]],
    interceptors: list[Any] | None = None,
) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=read_file(security.ca, "--control-plane-ca"),
        private_key=read_file(security.key, "--control-plane-key"),
        certificate_chain=read_file(security.cert, "--control-plane-cert"),
    )
    if security.server_name:
        opts.append(("grpc.ssl_target_name_override", security.server_name))
    return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors)


def add_port(server: grpc.aio.Server, listen: str, security: ServerSecurity | None) -> int:
    """Bind `listen` with TLS (and mutual TLS) when configured; returns the bound port."""
    if security is None or security.cert is None:
        return int(server.add_insecure_port(listen))
    key = read_file(security.key, "--tls-key")
    cert = read_file(security.cert, "--tls-cert")
    assert key is not None  # checked in ServerSecurity
    assert cert is not None
    client_ca = read_file(security.client_ca, "--tls-client-ca")
    creds = grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
    return int(server.add_secure_port(listen, creds))


# --- command-line flags of a control-plane client (tether sidecar, tether sessions) ---


def client_security(args: argparse.Namespace) -> ClientSecurity:
    """The `--control-plane-*` TLS and token flags (shared with `tether sidecar`)."""
    return ClientSecurity(
        ca=args.control_plane_ca,
        cert=args.control_plane_cert,
        key=args.control_plane_key,
        token_file=args.control_plane_token_file,
        server_name=args.control_plane_server_name,
    )


def add_client_security_flags(p: argparse.ArgumentParser, *, leaf: bool = False) -> None:
    """TLS, mutual TLS and token flags of a control-plane client."""
    default = argparse.SUPPRESS if leaf else None
    for flag, help_text in (
        ("--control-plane-ca", "verify the control plane's TLS certificate with this CA (PEM)"),
        ("--control-plane-cert", "client certificate for mutual TLS (PEM)"),
        ("--control-plane-key", "private key of --control-plane-cert (PEM)"),
        ("--control-plane-token-file", "send 'authorization: Bearer <token>' (token in FILE)"),
    ):
        p.add_argument(flag, type=Path, default=default, metavar="FILE", help=help_text)
    p.add_argument(
        "--control-plane-server-name",
        default=default,
        metavar="NAME",
        help="name the control plane's certificate must carry, if not its host",
    )
