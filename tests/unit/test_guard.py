"""Origin allow-lists and credential fingerprints."""

from __future__ import annotations

import pytest

from sidecar.guard import OriginPolicy, fingerprint


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:3000", True),
        ("http://localhost", True),
        ("https://127.0.0.1:8443", True),
        ("http://[::1]:5173", True),
        ("http://LOCALHOST:1", True),
        ("http://evil.example", False),
        ("http://localhost.evil.example", False),
        ("null", False),
        ("file://", False),
        ("", False),
        ("http://user@localhost:1", False),
    ],
)
def test_default_allows_loopback_origins_only(origin: str, allowed: bool) -> None:
    assert OriginPolicy(()).allows(origin) is allowed


def test_explicit_origins_exact_and_any_port() -> None:
    policy = OriginPolicy(["https://app.example.com", "http://dev.example:*"])
    assert policy.allows("https://app.example.com")
    assert policy.allows("https://app.example.com:443")
    assert not policy.allows("https://app.example.com:8443")
    assert not policy.allows("http://app.example.com")
    assert policy.allows("http://dev.example:9999")
    assert not policy.allows("http://localhost:3000")  # an explicit list replaces the default


def test_star_allows_everything() -> None:
    assert OriginPolicy(["*"]).allows("http://anything.example")


@pytest.mark.parametrize("bad", ["app.example.com", "ftp://x", "https://x/path", "https://x?q"])
def test_bad_patterns_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="allowed-origin"):
        OriginPolicy([bad])


def test_fingerprint_hashes_and_never_echoes_the_credential() -> None:
    fp = fingerprint("Bearer s3cret")
    assert len(fp) == 64
    assert "s3cret" not in fp
    assert fp == fingerprint("Bearer s3cret")
    assert fp != fingerprint("Bearer other")
    assert fingerprint(None) == fingerprint("") == ""
