"""Scraping a real `/metrics` endpoint over HTTP and reading it as Prometheus does: the text
format parsed by `prometheus_client.parser`, samples looked up by name and labels."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


@dataclass(frozen=True)
class Scrape:
    """One scrape: every family's name and type, every sample."""

    types: dict[str, str]
    samples: tuple[Sample, ...]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        types: dict[str, str] = {}
        samples: list[Sample] = []
        for family in text_string_to_metric_families(text):
            types[family.name] = family.type
            samples.extend(family.samples)
        return cls(types, tuple(samples))

    def names(self) -> set[str]:
        """Every series name a query may use: those with samples, and those each family's
        type implies (a labelled histogram nothing has observed yet has no sample)."""
        out = {s.name for s in self.samples}
        for name, kind in self.types.items():
            out.update(name + suffix for suffix in _SUFFIXES.get(kind, ("",)))
        return out

    def matching(self, name: str, **labels: str) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples `name` with (at least) these labels; LookupError if none."""
        found = self.matching(name, **labels)
        if not found:
            raise LookupError(f"no sample {name} {labels or ''} in this scrape")
        return sum(s.value for s in found)

    def value_or_zero(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.matching(name, **labels))

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}


async def scrape(http: aiohttp.ClientSession, url: str) -> Scrape:
    """GET `url` (a `/metrics` endpoint) and parse it; the answer must be Prometheus text."""
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return Scrape.parse(await resp.text())


def names_of(scrapes: Iterable[Scrape]) -> set[str]:
    out: set[str] = set()
    for s in scrapes:
        out |= s.names()
    return out
