"""`tether injector`: the mutating admission webhook that adds Tether to pods as they are created.

An HTTPS server (aiohttp) around the sans-IO `tether.webhook`: `POST /mutate` and
`POST /mutate/namespace` answer AdmissionReview v1 (see `tether.webhook` for which pods and
why two paths), `/healthz` and `/readyz` answer the kubelet on the same TLS port, and an
optional plain-HTTP admin port serves `/metrics` for Prometheus.

The certificate is read from `--tls-cert`/`--tls-key` and read again whenever their contents
change (cert-manager renews it in the Secret; the kubelet swaps the mounted files): new
connections get the new certificate, open ones keep theirs, no restart. A pair that does not
load (a half-written renewal, a key of another certificate) is logged and the previous one
kept; the next change is tried again.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from cryptography import x509
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from tether.buildinfo import register_build_info
from tether.envflags import apply_env_defaults
from tether.inject import InjectConfig
from tether.ports import PortInUseError, check_free, control_plane_target, split_hostport
from tether.tasks import cancel_and_wait, spawn
from tether.webhook import PATHS, MalformedReview, Outcome, Scope, decide, parse_review, response

log = logging.getLogger("tether.injector")

DEFAULT_INJECT: Final = InjectConfig()

MAX_REVIEW_BYTES: Final = 3 * 1024 * 1024
"""A review holds the pod once (CREATE has no oldObject); etcd refuses objects over 1.5 MiB,
so twice that bounds any real review with room for its JSON envelope."""
REVIEW_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
"""Computing a patch is milliseconds; the webhook's timeoutSeconds (a few) is the top."""


class TlsError(ValueError):
    """`--tls-cert`/`--tls-key` cannot be loaded; the message names the files and why."""


class InjectorMetrics:
    """`tether_injector_*` on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        register_build_info(self.registry, component="injector")
        self.reviews = Counter(
            "tether_injector_reviews",
            "AdmissionReviews answered, by outcome (injected, unchanged, skipped, failed)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in Outcome:
            self.reviews.labels(outcome.value)
        self.malformed = Counter(
            "tether_injector_malformed_reviews",
            "Bodies that were not an AdmissionReview v1 request (answered 400)",
            registry=self.registry,
        )
        self.seconds = Histogram(
            "tether_injector_review_seconds",
            "Time to decide one review and build its patch",
            buckets=REVIEW_BUCKETS,
            registry=self.registry,
        )
        self.reloads = Counter(
            "tether_injector_certificate_reloads",
            "Changes of --tls-cert/--tls-key seen, by result (loaded, failed)",
            ["result"],
            registry=self.registry,
        )
        for result in ("loaded", "failed"):
            self.reloads.labels(result)
        self.not_after = Gauge(
            "tether_injector_certificate_expiry_timestamp_seconds",
            "When the certificate being served expires (Unix time): alert before it does",
            registry=self.registry,
        )


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read {flag} {path}: {exc.strerror}") from exc


def _read_pair(cert: Path, key: Path) -> tuple[bytes, bytes]:
    return _read(cert, "--tls-cert"), _read(key, "--tls-key")


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load --tls-cert {cert} with --tls-key {key}: {exc}") from exc
    return context


class ReloadingTls:
    """The server's SSL context, whose certificate follows the files.

    The listener's context never changes; its SNI callback (which OpenSSL calls on every
    handshake, with or without a server name) hands each new connection the context of the
    latest pair that loaded. Swapping a whole context is atomic, where loading a new chain
    into the live one could leave a certificate beside the wrong key if the load fails halfway.
    """

    def __init__(self, cert: Path, key: Path, metrics: InjectorMetrics) -> None:
        self.cert, self.key = cert, key
        self._metrics = metrics
        self._unreadable = False
        self._digest = self._fingerprint(*_read_pair(cert, key))
        self.current = _server_context(cert, key)
        self._expiry()
        self.listener = _server_context(cert, key)
        self.listener.sni_callback = self._choose

    def _choose(self, conn: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        conn.context = self.current

    @staticmethod
    def _fingerprint(cert: bytes, key: bytes) -> bytes:
        return hashlib.sha256(cert + b"\0" + key).digest()

    def _expiry(self) -> None:
        try:
            leaf = x509.load_pem_x509_certificate(self.cert.read_bytes())
        except (OSError, ValueError):
            return
        self._metrics.not_after.set(leaf.not_valid_after_utc.timestamp())

    def check(self) -> bool:
        """Load the files again if their contents changed; True when a new pair was loaded.
        A pair that does not load is logged (once per change) and the old one kept."""
        try:
            digest = self._fingerprint(*_read_pair(self.cert, self.key))
        except TlsError as exc:
            if not self._unreadable:  # once, not every interval while it lasts
                log.warning("certificate not reloaded: %s; serving the previous one", exc)
            self._unreadable = True
            return False
        self._unreadable = False
        if digest == self._digest:
            return False
        self._digest = digest
        try:
            context = _server_context(self.cert, self.key)
        except TlsError as exc:
            self._metrics.reloads.labels("failed").inc()
            log.warning("certificate not reloaded: %s; serving the previous one", exc)
            return False
        self.current = context
        self._metrics.reloads.labels("loaded").inc()
        self._expiry()
        log.info("certificate reloaded from %s", self.cert)
        return True

    async def watch(self, interval: float) -> None:
        """Poll the files every `interval` seconds, until cancelled. Polling, because the
        kubelet updates a Secret volume by swapping a symlink, which file watches miss."""
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.check)


@dataclass(frozen=True)
class InjectorConfig:
    listen_host: str
    listen_port: int
    tls_cert: Path
    tls_key: Path
    inject: InjectConfig
    admin_host: str | None = None
    admin_port: int | None = None
    tls_reload_interval: float = 10.0
    shutdown_delay: float = 0.0
    """After SIGTERM, /readyz fails this long before the listener closes, so the Service stops
    sending reviews to this pod before it stops answering them."""


@dataclass
class RunningInjector:
    port: int
    admin_port: int | None
    tls: ReloadingTls
    metrics: InjectorMetrics
    ready: asyncio.Event
    _runners: list[web.AppRunner]
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self) -> None:
        self.ready.clear()
        await cancel_and_wait(*self._tasks)
        for runner in reversed(self._runners):
            await runner.cleanup()


def _handle_review(
    config: InjectConfig, metrics: InjectorMetrics, scope: Scope
) -> Any:  # the aiohttp handler
    async def mutate(request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            metrics.malformed.inc()
            log.warning(
                "review from %s refused: body over %d bytes", request.remote, MAX_REVIEW_BYTES
            )
            raise
        try:
            review = parse_review(body)
        except MalformedReview as exc:
            metrics.malformed.inc()
            log.warning("malformed review from %s: %s", request.remote, exc)
            return web.Response(status=400, text=f"malformed AdmissionReview: {exc}\n")
        decision = decide(review, config, scope=scope)
        metrics.seconds.observe(time.perf_counter() - started)
        metrics.reviews.labels(decision.outcome.value).inc()
        level = logging.WARNING if decision.outcome is Outcome.FAILED else logging.INFO
        log.log(
            level,
            "review %s (%s): pod %s %s: %s",
            decision.uid,
            scope.value,
            decision.subject,
            decision.outcome.value,
            decision.reason,
        )
        return web.json_response(response(decision))

    return mutate


def _health_routes(app: web.Application, ready: asyncio.Event) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if ready.is_set():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="stopping\n")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def build_app(
    config: InjectConfig, metrics: InjectorMetrics, ready: asyncio.Event
) -> web.Application:
    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    for scope, path in PATHS.items():
        app.router.add_post(path, _handle_review(config, metrics, scope))
    _health_routes(app, ready)
    return app


def build_admin_app(metrics: InjectorMetrics, ready: asyncio.Event) -> web.Application:
    async def serve_metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(metrics.registry))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    app = web.Application()
    app.router.add_get("/metrics", serve_metrics)
    _health_routes(app, ready)
    return app


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    raise RuntimeError("listener has no TCP address")


async def start_injector(config: InjectorConfig) -> RunningInjector:
    """Listen; returns once the HTTPS port (and the admin port, if any) accept connections.
    A busy address raises `PortInUseError` and an unusable certificate `TlsError`, each one
    line, before anything listens."""
    check_free(config.listen_host, config.listen_port, what="--listen")
    if config.admin_host is not None and config.admin_port is not None:
        check_free(config.admin_host, config.admin_port, what="--admin-listen")
    metrics = InjectorMetrics()
    tls = ReloadingTls(config.tls_cert, config.tls_key, metrics)
    ready = asyncio.Event()
    runners: list[web.AppRunner] = []
    admin_port: int | None = None
    try:
        runner = web.AppRunner(build_app(config.inject, metrics, ready), access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(
            runner, config.listen_host, config.listen_port, ssl_context=tls.listener
        ).start()
        port = _bound_port(runner)
        if config.admin_host is not None and config.admin_port is not None:
            admin = web.AppRunner(build_admin_app(metrics, ready), access_log=None)
            await admin.setup()
            runners.append(admin)
            await web.TCPSite(admin, config.admin_host, config.admin_port).start()
            admin_port = _bound_port(admin)
    except BaseException:
        for r in runners:
            await r.cleanup()
        raise
    watcher = spawn(tls.watch(config.tls_reload_interval), name="injector-tls-reload")
    ready.set()
    log.info(
        "injector listening on https://%s:%d (POST /mutate, /mutate/namespace)%s; sidecar image %s",
        config.listen_host,
        port,
        f", admin on {config.admin_host}:{admin_port}" if admin_port else "",
        config.inject.image,
    )
    return RunningInjector(port, admin_port, tls, metrics, ready, runners, [watcher])


async def run_until_signalled(config: InjectorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    injector = await start_injector(config)
    try:
        await stop.wait()
        injector.ready.clear()
        log.info("stopping: not ready; closing in %.1fs", config.shutdown_delay)
        await asyncio.sleep(config.shutdown_delay)
    finally:
        await injector.stop()


def config_from_args(args: argparse.Namespace) -> InjectorConfig:
    host, port = split_hostport(args.listen)
    admin_host, admin_port = (
        split_hostport(args.admin_listen) if args.admin_listen else (None, None)
    )
    return InjectorConfig(
        listen_host=host,
        listen_port=port,
        tls_cert=Path(args.tls_cert),
        tls_key=Path(args.tls_key),
        inject=InjectConfig(
            image=args.sidecar_image,
            control_plane=control_plane_target(
                args.sidecar_control_plane, what="--sidecar-control-plane"
            ),
            home_namespace=args.home_namespace,
            drain_timeout_s=args.sidecar_drain_timeout,
            allowed_hosts=(*DEFAULT_INJECT.allowed_hosts, *(args.sidecar_allowed_host or [])),
            token_audience=args.sidecar_token_audience or None,
            fingerprint_key_secret=args.sidecar_fingerprint_key_secret or None,
        ),
        admin_host=admin_host,
        admin_port=admin_port,
        tls_reload_interval=args.tls_reload_interval,
        shutdown_delay=args.shutdown_delay,
    )


def _run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"tether injector: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_until_signalled(config))
    except (PortInUseError, TlsError) as exc:
        print(f"tether injector: {exc}", file=sys.stderr)
        return 1
    return 0


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def add_injector_parser(sub: Any) -> None:
    p = sub.add_parser(
        "injector",
        help="the admission webhook that injects Tether into pods (deploy/components/injector)",
        description="Answers the API server's AdmissionReviews with a patch that adds Tether "
        "to each pod created in a namespace labelled tether.dev/inject=enabled "
        '(POST /mutate/namespace) or annotated tether.dev/inject: "true" (POST /mutate).',
    )
    p.add_argument("--listen", default="0.0.0.0:8443", metavar="HOST:PORT", help="HTTPS address")
    p.add_argument("--tls-cert", required=True, metavar="PEM", help="serving certificate (chain)")
    p.add_argument("--tls-key", required=True, metavar="PEM", help="private key of --tls-cert")
    p.add_argument(
        "--tls-reload-interval",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="how often the certificate files are checked for a renewal",
    )
    p.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="plain-HTTP address for /metrics, /healthz, /readyz (default: none)",
    )
    p.add_argument(
        "--sidecar-image", required=True, metavar="IMAGE", help="the Tether image to inject"
    )
    p.add_argument(
        "--sidecar-control-plane",
        default=DEFAULT_INJECT.control_plane,
        metavar="HOST:PORT",
        help="the control plane the injected sidecars report to",
    )
    p.add_argument(
        "--home-namespace",
        default=DEFAULT_INJECT.home_namespace,
        metavar="NS",
        help="the control plane's --home-namespace (pods elsewhere act as <pod>@<namespace>)",
    )
    p.add_argument(
        "--sidecar-drain-timeout",
        type=int,
        default=DEFAULT_INJECT.drain_timeout_s,
        metavar="SECONDS",
        help="how long a pod's drain waits for calls in flight (its grace period grows by it)",
    )
    p.add_argument(
        "--sidecar-allowed-host",
        action="append",
        metavar="HOST",
        help="a Host name clients use besides in-cluster Service names (repeatable)",
    )
    p.add_argument(
        "--sidecar-token-audience",
        default="",
        metavar="AUD",
        help="sidecars prove their pod with a projected token of this audience (default: none)",
    )
    p.add_argument(
        "--sidecar-fingerprint-key-secret",
        default="",
        metavar="SECRET",
        help="Secret (key `key`, in the pod's namespace) keying credential fingerprints "
        "(default: none)",
    )
    p.add_argument(
        "--shutdown-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after SIGTERM, fail /readyz this long before closing the listener",
    )
    apply_env_defaults(p)
    p.set_defaults(run=_run)
