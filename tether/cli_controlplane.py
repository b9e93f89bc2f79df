"""`tether control-plane` (run the control plane) and `tether sessions` (inspect it).

    tether control-plane --listen HOST:PORT --store sqlite:///PATH | etcd://HOST:PORT[,...]
    tether sessions list|get ID|watch|delete ID --control-plane HOST:PORT [-o table|json]

`-o json` prints the protobuf JSON mapping of the response, as grpcurl prints it: `list` one
ListSessionsResponse (all pages merged unless `--page-token` asks for one page), `get` a
Session, `delete` a DeleteSessionResponse, `watch` one SessionEvent object per line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane.limits import DEFAULT_MAX_CALLS_PER_PEER
from controlplane.store.protocol import DEFAULT_MAX_SESSIONS_PER_OWNER
from tether.api.v1 import sessions_pb2 as pb
from tether.api.v1 import sessions_pb2_grpc as pb_grpc
from tether.envflags import apply_env_defaults
from tether.grpc_security import (
    SecurityConfigError,
    ServerSecurity,
    add_client_security_flags,
    client_security,
    open_channel,
    read_file,
)

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_CONTROL_PLANE = os.environ.get("TETHER_CONTROL_PLANE", DEFAULT_LISTEN)
RPC_TIMEOUT = 10.0


# --- tether control-plane -------------------------------------------------------------------


def _etcd_tls(args: argparse.Namespace) -> Any:
    """The --etcd-ca/-cert/-key flags as an `EtcdTls`, or None for plaintext."""
    from controlplane.config import EtcdTls

    if (args.etcd_cert is None) != (args.etcd_key is None):
        raise SecurityConfigError("--etcd-cert needs --etcd-key (and the other way round)")
    if args.etcd_ca is None and args.etcd_cert is None:
        return None
    return EtcdTls(
        ca=read_file(args.etcd_ca, "--etcd-ca"),
        cert=read_file(args.etcd_cert, "--etcd-cert"),
        key=read_file(args.etcd_key, "--etcd-key"),
        server_name=args.etcd_server_name,
    )


def _read_secret(path: Path | None, what: str) -> str | None:
    raw = read_file(path, what)
    return None if raw is None else raw.decode().strip()


def _run_control_plane(args: argparse.Namespace) -> int:
    from controlplane.config import (
        DEFAULT_STORE_URL,
        ControlPlaneConfig,
        StoreUrlError,
        parse_store_url,
    )
    from controlplane.identity import HOME_NAMESPACE, TokenSettings
    from controlplane.policy import PolicyError
    from controlplane.server import serve
    from controlplane.store.protocol import StoreError

    try:
        store = parse_store_url(args.store or DEFAULT_STORE_URL)
    except StoreUrlError as e:
        print(f"tether control-plane: --store: {e}", file=sys.stderr)
        return 2
    if args.session_ttl <= 0 or args.flush_interval < 0 or args.shutdown_grace < 0:
        print("tether control-plane: durations must not be negative", file=sys.stderr)
        return 2
    if args.max_sessions_per_owner < 0:
        print("tether control-plane: --max-sessions-per-owner is negative", file=sys.stderr)
        return 2
    if args.admin_listen:
        from controlplane.admin import parse_listen

        try:
            parse_listen(args.admin_listen)
        except ValueError as e:
            print(f"tether control-plane: {e}", file=sys.stderr)
            return 2
    try:
        security = ServerSecurity(
            cert=args.tls_cert,
            key=args.tls_key,
            client_ca=args.tls_client_ca,
            token_file=args.auth_token_file,
        )
        etcd_password = _read_secret(args.etcd_password_file, "--etcd-password-file")
        etcd_tls = _etcd_tls(args)
    except SecurityConfigError as e:
        print(f"tether control-plane: {e}", file=sys.stderr)
        return 2
    jwt_flags = (args.jwt_jwks_file, args.jwt_audience, args.jwt_issuer)
    if any(f is not None for f in jwt_flags) and not all(f for f in jwt_flags):
        print(
            "tether control-plane: --jwt-jwks-file, --jwt-audience and --jwt-issuer go together",
            file=sys.stderr,
        )
        return 2
    tokens = (
        TokenSettings(args.jwt_jwks_file, args.jwt_audience, args.jwt_issuer)
        if args.jwt_jwks_file
        else None
    )
    if (args.etcd_user is None) != (etcd_password is None):
        print("tether control-plane: --etcd-user needs --etcd-password-file", file=sys.stderr)
        return 2
    config = ControlPlaneConfig(
        listen=args.listen,
        store=store,
        session_ttl=args.session_ttl,
        flush_interval=args.flush_interval,
        shutdown_grace=args.shutdown_grace,
        security=security,
        tokens=tokens,
        home_namespace=args.home_namespace or HOME_NAMESPACE,
        policy_file=args.policy_file,
        etcd_username=args.etcd_user,
        etcd_password=etcd_password,
        etcd_tls=etcd_tls,
        max_sessions_per_owner=args.max_sessions_per_owner,
        max_calls_per_peer=args.max_calls_per_peer,
        tracing=args.tracing,
        admin_listen=args.admin_listen or None,
    )
    if config.tracing and (missing := _tracing_missing()):
        print(f"tether control-plane: {missing}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except (OSError, StoreError, SecurityConfigError, PolicyError) as e:
        print(f"tether control-plane: {e}", file=sys.stderr)
        return 1
    return 0


def add_control_plane_parser(sub: Any) -> None:
    p = sub.add_parser(
        "control-plane",
        help="run the control plane (gRPC)",
        description="Persist session records reported by sidecars and serve them over gRPC "
        "(tether.v1.SessionService, health checking and reflection).",
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"gRPC address to listen on; port 0 picks a free one (default {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--admin-listen",
        default=None,
        metavar="HOST:PORT",
        help="serve /metrics (Prometheus) and /healthz over plain HTTP here; port 0 picks a "
        "free one (default: no admin port)",
    )
    p.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="sqlite:///PATH or etcd://HOST:PORT[,HOST:PORT...][/PREFIX] "
        "(default: sqlite:///tether-sessions.db in the working directory)",
    )
    p.add_argument(
        "--session-ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="expire sessions not reported for this long (default 3600)",
    )
    p.add_argument(
        "--max-sessions-per-owner",
        type=int,
        default=DEFAULT_MAX_SESSIONS_PER_OWNER,
        metavar="N",
        help="refuse to create sessions for (or move sessions to) an owner that holds N "
        f"already; 0: no limit (default {DEFAULT_MAX_SESSIONS_PER_OWNER})",
    )
    p.add_argument(
        "--flush-interval",
        type=float,
        default=0.05,
        metavar="SECONDS",
        help="coalesce reports for this long between store writes (default 0.05)",
    )
    p.add_argument(
        "--tracing",
        action="store_true",
        help="a server span per unary call, continuing the sidecars' traces, exported as the "
        "standard OTEL_* variables say (needs pip install 'tether[tracing]'; see the README)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="time in-flight calls get on SIGTERM/SIGINT (default 5)",
    )
    p.add_argument(
        "--max-calls-per-peer",
        type=int,
        default=DEFAULT_MAX_CALLS_PER_PEER,
        metavar="N",
        help="concurrent ReportEvents and WatchSessions calls one client host may hold; "
        f"more are refused with RESOURCE_EXHAUSTED; 0 = no limit (default "
        f"{DEFAULT_MAX_CALLS_PER_PEER}; raise it when a proxy hides the callers' addresses)",
    )
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve TLS with this certificate")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        metavar="PEM",
        help="require client certificates signed by this CA (mutual TLS)",
    )
    p.add_argument(
        "--auth-token-file",
        type=Path,
        metavar="FILE",
        help="require 'authorization: Bearer <token>' (token in FILE) on every call but "
        "health; development only: its holders may do everything",
    )
    p.add_argument(
        "--jwt-jwks-file",
        type=Path,
        metavar="FILE",
        help="accept Kubernetes ServiceAccount tokens signed by a key of this JWKS (JSON; "
        "read again when it changes); the caller is the pod the token names",
    )
    p.add_argument("--jwt-audience", metavar="AUD", help="audience the tokens must carry")
    p.add_argument("--jwt-issuer", metavar="ISS", help="issuer the tokens must name")
    p.add_argument(
        "--home-namespace",
        metavar="NS",
        help="namespace whose pods act as sidecars under their bare pod name (default tether, "
        "the manifests' namespace); a pod of another namespace is <pod>@<namespace>",
    )
    p.add_argument(
        "--policy-file",
        type=Path,
        metavar="FILE",
        help="roles of callers (YAML; see the README's security section); without one, "
        "authenticated callers are sidecars and nothing else",
    )
    p.add_argument("--etcd-user", help="etcd user, when the cluster has authentication on")
    p.add_argument("--etcd-password-file", type=Path, metavar="FILE", help="its password")
    p.add_argument(
        "--etcd-ca", type=Path, metavar="PEM", help="talk TLS to etcd; verify with this CA"
    )
    p.add_argument("--etcd-cert", type=Path, metavar="PEM", help="client certificate for etcd")
    p.add_argument("--etcd-key", type=Path, metavar="PEM", help="private key of --etcd-cert")
    p.add_argument("--etcd-server-name", metavar="NAME", help="name etcd's certificate carries")
    apply_env_defaults(p)  # every flag above can also be set as TETHER_<FLAG>
    p.set_defaults(run=_run_control_plane)


# --- tether sessions ------------------------------------------------------------------------


def _when(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    moment = datetime.fromtimestamp(ts.seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


_SESSION_HEADER = ["SESSION", "OWNER", "EPOCH", "STREAMS", "UPSTREAM", "UPDATED", "EXPIRES"]


def _session_row(s: pb.Session) -> list[str]:
    return [
        s.session_id,
        s.owner,
        str(s.owner_epoch),
        str(len(s.streams)),
        s.upstream_address,
        _when(s.updated_at),
        _when(s.expires_at),
    ]


def _print_session(s: pb.Session, out: TextIO) -> None:
    fields = [
        ("Session", s.session_id),
        ("Upstream session", s.upstream_session_id),
        ("Upstream address", s.upstream_address),
        ("Owner", f"{s.owner} (epoch {s.owner_epoch})"),
        ("Protocol version", s.protocol_version or "-"),
        ("Initialize request", f"{len(s.initialize_request)} bytes"),
        ("Created", _when(s.created_at)),
        ("Updated", _when(s.updated_at)),
        ("Expires", _when(s.expires_at)),
    ]
    for name, value in fields:
        out.write(f"{name + ':':<20} {value}\n")
    if s.streams:
        out.write("\n")
        rows = [["STREAM", "SEQ", "EPOCH", "LAST EVENT ID", "UPSTREAM EVENT ID"]]
        rows += [
            [p.stream_id, str(p.seq), str(p.owner_epoch), p.last_event_id, p.upstream_event_id]
            for p in s.streams
        ]
        _table(rows, out)


def _json(msg: Message, *, one_line: bool = False) -> str:
    return json_format.MessageToJson(msg, indent=None if one_line else 2)


_EVENT_NAMES = {
    pb.SESSION_EVENT_TYPE_PUT: "PUT",
    pb.SESSION_EVENT_TYPE_DELETE: "DELETE",
    pb.SESSION_EVENT_TYPE_EXPIRE: "EXPIRE",
    pb.SESSION_EVENT_TYPE_SYNCED: "SYNCED",
}


async def _list(stub: Any, args: argparse.Namespace, out: TextIO) -> None:
    request = pb.ListSessionsRequest(
        page_size=args.page_size, page_token=args.page_token or "", owner=args.owner or ""
    )
    merged = pb.ListSessionsResponse()
    while True:
        page = await stub.ListSessions(request, timeout=RPC_TIMEOUT)
        merged.sessions.extend(page.sessions)
        if args.page_token or not page.next_page_token:
            merged.next_page_token = page.next_page_token if args.page_token else ""
            break
        request.page_token = page.next_page_token
    if args.output == "json":
        out.write(_json(merged) + "\n")
        return
    if not merged.sessions:
        out.write("no sessions\n")
        return
    _table([_SESSION_HEADER, *(_session_row(s) for s in merged.sessions)], out)
    if merged.next_page_token:
        out.write(f"next page: --page-token {merged.next_page_token}\n")


async def _get(stub: Any, args: argparse.Namespace, out: TextIO) -> None:
    s = await stub.GetSession(pb.GetSessionRequest(session_id=args.id), timeout=RPC_TIMEOUT)
    if args.output == "json":
        out.write(_json(s) + "\n")
    else:
        _print_session(s, out)


async def _delete(stub: Any, args: argparse.Namespace, out: TextIO) -> None:
    reply = await stub.DeleteSession(
        pb.DeleteSessionRequest(session_id=args.id), timeout=RPC_TIMEOUT
    )
    if args.output == "json":
        out.write(_json(reply) + "\n")
    else:
        out.write(f"deleted session {reply.session.session_id}\n")


async def _watch(stub: Any, args: argparse.Namespace, out: TextIO) -> None:
    call = stub.WatchSessions(pb.WatchSessionsRequest(owner=args.owner or ""))
    header_done = False
    async for ev in call:
        if args.output == "json":
            out.write(_json(ev, one_line=True) + "\n")
        else:
            if not header_done:
                out.write("EVENT   SESSION  OWNER  EPOCH  STREAMS\n")
                header_done = True
            kind = _EVENT_NAMES.get(ev.type, str(ev.type))
            if ev.type == pb.SESSION_EVENT_TYPE_SYNCED:
                out.write("-- synced: changes follow --\n")
            else:
                s = ev.session
                out.write(
                    f"{kind:<7} {ev.session_id}  {s.owner or '-'}  {s.owner_epoch}"
                    f"  {len(s.streams)}\n"
                )
        out.flush()


Command = Callable[[Any, argparse.Namespace, TextIO], Coroutine[Any, Any, None]]


async def _call_control_plane(command: Command, args: argparse.Namespace) -> int:
    try:
        channel = open_channel(args.control_plane, client_security(args))
    except SecurityConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    async with channel:
        stub = pb_grpc.SessionServiceStub(channel)
        try:
            await command(stub, args, sys.stdout)
        except grpc.aio.AioRpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def _sessions_runner(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return asyncio.run(_call_control_plane(command, args))

    return run


def _add_connection_flags(p: argparse.ArgumentParser, *, leaf: bool) -> None:
    # On `sessions` and on each subcommand, so both `tether sessions -o json list` and
    # `tether sessions list -o json` work; a subcommand's flag only counts if given.
    p.add_argument(
        "--control-plane",
        metavar="HOST:PORT",
        default=argparse.SUPPRESS if leaf else DEFAULT_CONTROL_PLANE,
        help=f"control plane address (default $TETHER_CONTROL_PLANE or {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default=argparse.SUPPRESS if leaf else "table",
        help="table (default) or json: the protobuf JSON mapping, as grpcurl prints it",
    )
    add_client_security_flags(p, leaf=leaf)


def add_sessions_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sessions",
        help="list, get, watch or delete sessions",
        description="Inspect the sessions a control plane holds.",
    )
    _add_connection_flags(p, leaf=False)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    ls = actions.add_parser("list", help="list sessions (all pages)")
    ls.add_argument("--owner", help="only sessions owned by this sidecar")
    ls.add_argument("--page-size", type=int, default=0, help="sessions per request")
    ls.add_argument("--page-token", help="print only the page this token starts")
    ls.set_defaults(run=_sessions_runner(_list))

    get = actions.add_parser("get", help="show one session")
    get.add_argument("id", metavar="ID")
    get.set_defaults(run=_sessions_runner(_get))

    watch = actions.add_parser("watch", help="print every session, then every change")
    watch.add_argument("--owner", help="only sessions owned by this sidecar")
    watch.set_defaults(run=_sessions_runner(_watch))

    delete = actions.add_parser("delete", help="delete one session")
    delete.add_argument("id", metavar="ID")
    delete.set_defaults(run=_sessions_runner(_delete))

    for leaf in (ls, get, watch, delete):
        _add_connection_flags(leaf, leaf=True)


def _tracing_missing() -> str | None:
    """Why `--tracing` cannot work here (the `tracing` extra is not installed, an `OTEL_*`
    variable names an exporter it does not have), or None."""
    try:
        import controlplane.tracing  # noqa: F401 - the check is the import
        from tether.otel import check_env
    except ImportError as exc:
        return f"--tracing needs OpenTelemetry's SDK: pip install 'tether[tracing]' ({exc})"
    try:
        check_env()
    except ValueError as exc:
        return str(exc)
    return None
