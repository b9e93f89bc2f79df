"""What build of Tether a process runs, as the `tether_build_info` gauge both processes export.

The version comes from the installed package's metadata, which `pyproject.toml` takes from
`tether.__version__` (the one source); a tree run without being installed reports that
attribute directly.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

import tether


def tether_version() -> str:
    """The installed `tether` distribution's version, else `tether.__version__`."""
    try:
        return version("tether")
    except PackageNotFoundError:
        return tether.__version__


def register_build_info(registry: CollectorRegistry, *, component: str) -> Gauge:
    """`tether_build_info{version, component} 1` on `registry`: joins any series by
    `on(instance) group_left(version)` to tell which version produced it (a rollout shows two)."""
    gauge = Gauge(
        "tether_build_info",
        "Always 1; the labels say which build of Tether this process runs",
        ["version", "component"],
        registry=registry,
    )
    gauge.labels(tether_version(), component).set(1)
    return gauge


def register_process_metrics(registry: CollectorRegistry, *, component: str) -> None:
    """What every Tether process exports besides its own metrics: the default registry's
    process, platform and GC collectors (memory, CPU, open files, collections), on
    `registry`, and `tether_build_info`."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    register_build_info(registry, component=component)
