"""Child processes of the harness: start, wait until listening, read CPU and memory, stop.

Children inherit the harness's raised `RLIMIT_NOFILE` soft limit (`raise_fd_limit`). CPU
seconds come from `/proc/<pid>/stat` (utime + stime; `cpu_seconds_fine`: per-thread schedstat,
in nanoseconds), resident memory from
`/proc/<pid>/status` (VmRSS), so any process (nginx, etcd) is measured the same way.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (0.0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds_fine(pid: int) -> float:
    """CPU seconds of a process to the nanosecond: the scheduler's run time of each of its
    threads (`/proc/<pid>/task/*/schedstat`, first field), where `/proc/<pid>/stat` counts
    clock ticks (10 ms here), too coarse for a proxy that spends 10 ms on a thousand
    notifications. Threads that exit between two readings take their time with them; the
    proxies measured keep theirs. Falls back to `cpu_seconds` without schedstat."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just exited
                total += int((task / "schedstat").read_text().split()[0])
    except OSError:
        return cpu_seconds(pid)
    return total / 1e9


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def rss_hwm_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM: the peak RSS so far) of a process, MiB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def python_module(module: str, *args: object) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] = field(init=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, *, stdout_pipe: bool = False) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                cwd=Path(__file__).resolve().parent.parent,
            )

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_port(self, port: int, timeout: float = 30.0) -> None:
        """Poll until something accepts on the port; fail early if the child died."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: nothing listens on {port}") from None
                time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 3.0) -> None:
        """Signal, wait up to `timeout`, then SIGKILL: the harness measures no shutdowns
        (a sidecar with SSE handlers still open may take a minute to stop gracefully)."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/bin/nginx") if Path(p).is_file()), None
    )


NGINX_MISSING = (
    "nginx not found: the harness compares the sidecar with Debian's nginx. Install it with "
    "`apt-get install -y nginx-light` (or `nginx`), or run `python -m bench --no-nginx`."
)


def nginx_config(
    tmp: Path,
    *,
    listen: int,
    upstream: int,
    connections: int,
    buffer_size: str | None = None,
    upstream_keepalive: int = 0,
) -> Path:
    """A minimal reverse proxy for SSE: one process, no buffering, no access log.
    `buffer_size` sets `proxy_buffer_size` (how much nginx reads from upstream at once; one
    memory page by default). `upstream_keepalive` > 0 keeps that many idle upstream
    connections for reuse (nginx's `keepalive` in an `upstream` block; by default nginx opens
    one upstream connection per request, where the sidecar's client pool reuses them) and
    lets a client connection carry any number of requests (`keepalive_requests`)."""
    tuned = (
        f"\n            proxy_buffer_size {buffer_size};"
        f"\n            proxy_buffers 4 {buffer_size};"
        f"\n            proxy_busy_buffers_size {buffer_size};"
        if buffer_size
        else ""
    )
    target = f"127.0.0.1:{upstream}"
    pool = ""
    if upstream_keepalive:
        target = "generator"
        pool = (
            f"\n    keepalive_requests 1000000;"
            f"\n    upstream generator {{ server 127.0.0.1:{upstream}; "
            f"keepalive {upstream_keepalive}; }}"
        )
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""# Written by bench/procs.py; one process (master_process off) like the sidecar.
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;{pool}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://{target};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 1h;{tuned}
        }}
    }}
}}
"""
    )
    return conf
