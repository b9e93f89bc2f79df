"""What build of Tether a process runs, as the `tether_build_info` gauge both processes export.

The version comes from the installed package's metadata, which `pyproject.toml` takes from
`tether.__version__` (the one source); a tree run without being installed reports that
attribute directly.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Gauge

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
