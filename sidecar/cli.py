"""`tether sidecar`: flags map one to one onto `SidecarConfig`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from sidecar.config import ConfigError, SidecarConfig, parse_hostport
from sidecar.eventloop import CHOICES as EVENT_LOOPS
from sidecar.guard import parse_fingerprint_key
from sidecar.reconnect import ReconnectConfig
from sidecar.tracker import TrackerLimits
from tether.envflags import apply_env_defaults
from tether.grpc_security import add_client_security_flags, client_security
from tether.ports import control_plane_target

log = logging.getLogger("tether.sidecar")


def config_from_args(args: argparse.Namespace) -> SidecarConfig:
    host, port = parse_hostport(args.listen, what="--listen")
    admin_host, admin_port = (
        parse_hostport(args.admin_listen, what="--admin-listen")
        if args.admin_listen
        else (None, None)
    )
    control_plane = None
    if args.control_plane:
        try:
            control_plane = control_plane_target(args.control_plane)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    if args.owner:
        from tether.model import InvalidIdError, parse_owner

        try:
            parse_owner(args.owner)
        except InvalidIdError as exc:
            raise ConfigError(f"--owner: {exc}") from exc
    try:
        return SidecarConfig(
            listen_host=host,
            listen_port=port,
            upstream=args.upstream,
            admin_host=admin_host,
            admin_port=admin_port,
            control_plane=control_plane,
            owner=args.owner,
            report_interval=args.report_interval,
            renew_interval=args.renew_interval,
            control_plane_security=client_security(args),
            allowed_origins=tuple(args.allowed_origin),
            allowed_hosts=tuple(args.allowed_host),
            trusted_proxies=tuple(args.trusted_proxy),
            max_streams=args.max_streams,
            max_upstream_requests=args.max_upstream_requests,
            linger_max_bytes=args.linger_max_bytes,
            upstream_response_timeout=args.upstream_response_timeout,
            drain_timeout=args.drain_timeout,
            upstream_probe_interval=args.upstream_probe_interval,
            ready_requires_control_plane=args.ready_requires_control_plane,
            tracing=args.tracing,
            upstream_dead_after=args.upstream_dead_after,
            client_retry_ms=args.client_retry_ms,
            session_binding=args.session_binding,
            access_log=args.access_log,
            max_event_bytes=args.max_event_bytes,
            max_request_body_bytes=args.max_body_bytes,
            tracker=TrackerLimits(
                dedup_window=args.dedup_window,
                replay_max_events=args.replay_events,
                replay_max_bytes=args.replay_bytes,
                index_max_events=max(args.replay_events, 65536),
            ),
            reconnect=ReconnectConfig(
                max_attempts=args.reconnect_attempts, max_elapsed=args.reconnect_max_seconds
            ),
        )
    except ValueError as exc:  # includes SecurityConfigError
        raise ConfigError(str(exc)) from exc


def read_fingerprint_key(path: Path | None) -> bytes | None:
    """The key in `--fingerprint-key-file` (read when the sidecar starts, not when its flags
    are parsed: parsing reads no file)."""
    if path is None:
        return None
    try:
        return parse_fingerprint_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"--fingerprint-key-file: cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _run(args: argparse.Namespace) -> int:
    from sidecar import heap, runcore
    from sidecar.app import run_until_signalled
    from sidecar.eventloop import loop_factory, run
    from sidecar.tracing import TracingUnavailableError, require_sdk

    try:
        config = config_from_args(args)
        key = read_fingerprint_key(args.fingerprint_key_file)
        config = dataclasses.replace(config, fingerprint_key=key)
        factory = loop_factory(args.event_loop)
        if config.tracing:
            require_sdk()
        try:
            runcore.use(args.run_core)
        except ImportError as exc:
            raise ConfigError(f"--run-core c: {exc}") from exc
    except (ConfigError, TracingUnavailableError) as exc:
        print(f"tether sidecar: {exc}", file=sys.stderr)
        return 2
    kept = heap.keep_large_buffers()  # before the first large buffer
    log.info("event loop: %s, run core: %s, heap: %s", args.event_loop, runcore.name(), kept)
    try:
        run(run_until_signalled(config), factory)
    except OSError as exc:  # a busy or unusable address (`tether.ports`)
        log.debug("sidecar failed to start", exc_info=True)
        print(f"tether sidecar: {exc}", file=sys.stderr)
        return 1
    return 0


def add_sidecar_parser(sub: Any) -> None:
    p = sub.add_parser("sidecar", help="run the sidecar proxy in front of an MCP server")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="proxied port")
    p.add_argument("--upstream", required=True, metavar="URL", help="MCP server base URL")
    p.add_argument(
        "--admin-listen", metavar="HOST:PORT", help="/healthz, /readyz, /metrics, /drain"
    )
    p.add_argument(
        "--control-plane",
        metavar="HOST[:PORT]",
        help="control plane gRPC address (port 50051 if none is given)",
    )
    add_client_security_flags(p)
    p.add_argument("--owner", help="this sidecar's name in the control plane ($POD_NAME)")
    p.add_argument(
        "--fingerprint-key-file",
        type=Path,
        metavar="FILE",
        help="key of the credential fingerprints sent to the control plane (HMAC-SHA256), "
        "the same file on every sidecar; without one they are unkeyed (development only)",
    )
    p.add_argument(
        "--report-interval", type=float, default=0.05, help="seconds between position reports"
    )
    p.add_argument(
        "--renew-interval",
        type=float,
        default=30.0,
        help="at most this many seconds between renewals of served sessions' ownership "
        "(a third of the control plane's session TTL when that is less)",
    )
    p.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="browser origin allowed to call (repeatable; https://host[:port], http://host:*, "
        "or *); default: loopback origins only",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        help="Host header the proxied port answers (repeatable; name, name:port, *.domain, or "
        "*); loopback names and the listen address are always allowed; others get 421",
    )
    p.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR",
        help="peer whose X-Forwarded-* headers are passed on (repeatable); anyone else's are "
        "replaced by what the sidecar saw",
    )
    p.add_argument("--max-streams", type=int, default=10_000, help="concurrent SSE responses")
    p.add_argument(
        "--max-upstream-requests",
        type=int,
        default=1000,
        help="requests waiting for the upstream's response headers at once; more get 503",
    )
    p.add_argument(
        "--upstream-response-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="longest wait for the upstream's response headers, then 504 (a JSON answer to a "
        "tool call comes whole, so this also bounds a tool call in JSON mode; default 300)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="longest drain (GET /drain on the admin port, the preStop hook): how long the "
        "requests in flight may take to finish (default 30); terminationGracePeriodSeconds "
        "should exceed it (see the README)",
    )
    p.add_argument(
        "--upstream-probe-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between TCP connects to the upstream; /readyz fails while they fail "
        "(0: no probe)",
    )
    p.add_argument(
        "--ready-requires-control-plane",
        action="store_true",
        help="/readyz fails while no report stream to the control plane is open (off: a "
        "control plane outage is shown in /readyz's body and a metric, and does not take "
        "every pod out of its Service)",
    )
    p.add_argument(
        "--no-session-binding",
        dest="session_binding",
        action="store_false",
        help="do not tie a session to the credential (Authorization) that created it",
    )
    p.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="do not log a line per request on the proxied port (logger tether.sidecar.access, "
        "INFO)",
    )
    p.add_argument(
        "--client-retry-ms",
        type=int,
        default=None,
        metavar="MS",
        help="retry: sent to clients with each stream's first event, how long they wait before "
        "reconnecting (default: the client's own, 1 s for the official SDK, which tries twice)",
    )
    p.add_argument(
        "--upstream-dead-after",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="declare a silent upstream connection dead after this long, if its peer does not "
        "answer TCP keepalive probes (default 10)",
    )
    p.add_argument("--max-event-bytes", type=int, default=1 << 20, help="largest SSE event")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body")
    p.add_argument("--dedup-window", type=int, default=1024, help="upstream ids remembered")
    p.add_argument("--replay-events", type=int, default=1024, help="replay buffer, events")
    p.add_argument("--replay-bytes", type=int, default=4 << 20, help="replay buffer, bytes")
    p.add_argument(
        "--linger-max-bytes",
        type=int,
        default=64 << 20,
        help="replay buffers of finished streams kept in all (for late resumes); the "
        "longest-finished are forgotten first",
    )
    p.add_argument("--reconnect-attempts", type=int, default=10, help="failures before giving up")
    p.add_argument(
        "--reconnect-max-seconds", type=float, default=60.0, help="longest upstream outage"
    )
    p.add_argument(
        "--tracing",
        action="store_true",
        help="export OpenTelemetry traces, configured by the standard OTEL_* variables "
        "(exporter, endpoint, sampler; needs pip install 'tether[tracing]'; see the README)",
    )
    p.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="asyncio",
        help="the standard asyncio loop, or uvloop if installed (measured: no faster here)",
    )
    p.add_argument(
        "--run-core",
        choices=("auto", "c", "python"),
        default="auto",
        help="the bulk path's per-event loops: compiled (auto: when the install built it) or "
        "pure Python, the same results either way",
    )
    apply_env_defaults(p)  # every flag above can also be set as TETHER_<FLAG>
    p.set_defaults(run=_run)
