"""Listening addresses: a busy port is one clear error line, never a shared port.

gRPC's C core reports a failed bind as a log line of its own plus a bare "failed to add port",
and binds with `SO_REUSEPORT` unless told not to (`controlplane.limits`). So before a server
binds, `check_free` binds the address itself, the way the server will (`SO_REUSEADDR`, no
`SO_REUSEPORT`), and raises `PortInUseError` naming the address and the reason. The check and
the real bind are not atomic; the server's own bind error still stops the process if another
one takes the port in between.
"""

from __future__ import annotations

import socket


class PortInUseError(OSError):
    """The address cannot be bound; the message is one line: which address, and why."""


def split_hostport(listen: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` -> (host, port); ValueError when it is neither."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def check_free(host: str, port: int, *, what: str) -> None:
    """Raise `PortInUseError` ("<what> HOST:PORT: address already in use") if a server could
    not bind `host:port` now. Port 0 (the kernel picks) is always free; an empty host or
    `0.0.0.0` means every IPv4 address, `::` every address."""
    if port == 0:
        return
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise PortInUseError(f"{what} {shown}: cannot resolve {host!r}: {exc.strerror}") from exc
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                raise PortInUseError(f"{what} {shown}: {reason}") from exc


DEFAULT_CONTROL_PLANE_PORT = 50051


def control_plane_target(value: str, *, what: str = "--control-plane") -> str:
    """`HOST[:PORT]` -> the gRPC target `HOST:PORT` (port 50051 when none is given); a URL
    or an empty host is a ValueError whose message says what to write instead."""
    text = value.strip()
    if "://" in text:
        scheme, _, rest = text.partition("://")
        hint = rest.split("/", 1)[0] or "HOST:PORT"
        raise ValueError(
            f"{what}: expected HOST[:PORT], got the URL {value!r} "
            f"(gRPC takes no {scheme}:// scheme; try {what} {hint})"
        )
    if text.startswith("["):  # [v6] or [v6]:port
        close = text.find("]")
        rest = text[close + 1 :] if close > 0 else "?"
        if rest == "":
            return f"{text}:{DEFAULT_CONTROL_PLANE_PORT}"
        if not (rest.startswith(":") and rest[1:].isdigit()):
            raise ValueError(f"{what}: expected HOST[:PORT], got {value!r}")
        return text
    if text.count(":") > 1:  # a bare IPv6 address
        return f"[{text}]:{DEFAULT_CONTROL_PLANE_PORT}"
    host, sep, port = text.partition(":")
    if not host or "/" in text or (sep and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"{what}: expected HOST[:PORT], got {value!r}")
    return text if sep else f"{host}:{DEFAULT_CONTROL_PLANE_PORT}"
