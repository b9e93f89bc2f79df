"""Shared test configuration. Integration fixtures live in tests/integration/conftest.py."""
