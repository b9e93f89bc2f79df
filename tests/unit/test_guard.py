"""Origin allow-lists and credential fingerprints."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from sidecar.guard import OriginPolicy, fingerprint, parse_fingerprint_key


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


KEY = b"k" * 32


@pytest.mark.parametrize("key", [None, KEY])
def test_fingerprint_hashes_and_never_echoes_the_credential(key: bytes | None) -> None:
    fp = fingerprint("Bearer s3cret", key=key)
    assert len(fp) == 64
    assert "s3cret" not in fp
    assert fp == fingerprint("Bearer s3cret", key=key)
    assert fp != fingerprint("Bearer other", key=key)
    assert fingerprint(None, key=key) == fingerprint("", key=key) == ""


def test_keyed_fingerprint_is_hmac_sha256_and_differs_by_key() -> None:
    """A leaked record's fingerprint is no SHA-256 of the header, so a dictionary of headers
    hashed without the sidecars' key tests nothing; another key gives another fingerprint."""
    header = "Bearer alice-secret"
    keyed = fingerprint(header, key=KEY)
    assert keyed != hashlib.sha256(header.encode()).hexdigest()
    assert keyed == hmac.new(KEY, header.encode(), hashlib.sha256).hexdigest()
    assert keyed != fingerprint(header, key=b"another key of 32 bytes, at least")


def test_fingerprint_key_is_stripped_and_must_be_long_enough() -> None:
    assert parse_fingerprint_key(b"  0123456789abcdef\n") == b"0123456789abcdef"
    with pytest.raises(ValueError, match="at least 16 bytes"):
        parse_fingerprint_key(b"short\n")
