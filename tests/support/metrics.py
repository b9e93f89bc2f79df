"""Reading a sidecar's Prometheus metrics the way a scrape does: through its registry.

Tests read counters with `counter_value(metrics, "upstream_reconnects")`, which asks the
sidecar's own `CollectorRegistry` (`sidecar.metrics.Metrics.registry`) for the sample
`tether_sidecar_upstream_reconnects_total`: the public API, and the name an operator sees on
`/metrics`. A name (or label) that has no sample raises instead of reading as 0.
"""

from __future__ import annotations

from sidecar.metrics import Metrics


def counter_value(metrics: Metrics, name: str, **labels: str) -> float:
    """The current value of counter `tether_sidecar_<name>` (with these labels)."""
    sample = f"tether_sidecar_{name}_total"
    value = metrics.registry.get_sample_value(sample, labels)
    if value is None:
        raise LookupError(f"no sample {sample} {labels or ''} in this sidecar's registry")
    return value
