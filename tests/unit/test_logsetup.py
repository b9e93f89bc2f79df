"""`tether.logsetup`: the JSON line's fields, the context bound per request, the text format."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys

import pytest

from tether.logsetup import (
    MCP_METHOD,
    SESSION,
    bind_log_fields,
    log_context,
    make_formatter,
    rfc3339_utc,
)


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("tether.sidecar.proxy", logging.WARNING, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    rec.created = 1796186673.25  # 2026-12-02T04:44:33.250Z
    return rec


def test_a_json_line_has_the_fixed_fields_first() -> None:
    line = make_formatter("json").format(record("refused %s", "x", status=502))
    assert json.loads(line) == {
        "time": "2026-12-02T04:44:33.250Z",
        "level": "WARNING",
        "logger": "tether.sidecar.proxy",
        "message": "refused x",
        "status": 502,
    }
    assert list(json.loads(line))[:4] == ["time", "level", "logger", "message"]


def test_rfc3339_is_utc_with_milliseconds() -> None:
    assert rfc3339_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_utc(1796186673.999) == "2026-12-02T04:44:33.999Z"


async def test_the_context_is_per_task_and_extra_wins() -> None:
    fmt = make_formatter("json")

    async def request(session: str, method: str) -> dict[str, object]:
        with log_context(session=session):
            await asyncio.sleep(0)  # the other request runs meanwhile
            bind_log_fields(mcp_method=method, request_id=None)  # None: left out
            line = json.loads(fmt.format(record("x")))
            assert isinstance(line, dict)
            return line

    a, b = await asyncio.gather(request("s-a", "ping"), request("s-b", "tools/call"))
    assert (a[SESSION], a[MCP_METHOD], b[SESSION], b[MCP_METHOD]) == (
        "s-a",
        "ping",
        "s-b",
        "tools/call",
    )
    assert "request_id" not in a
    outside = json.loads(fmt.format(record("x", session="explicit")))
    assert outside[SESSION] == "explicit"  # nothing bound here; extra= is there
    with log_context(session="bound"):
        assert json.loads(fmt.format(record("x", session="extra")))[SESSION] == "extra"
    assert SESSION not in json.loads(fmt.format(record("x")))


def test_exceptions_are_one_line_of_json() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), None)
        rec.exc_info = sys.exc_info()
    line = make_formatter("json").format(rec)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc_info"]


def test_text_is_the_classic_line_and_unknown_formats_are_refused() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(make_formatter("text"))
    rec = record("refused %s", "x", session="s")
    handler.emit(rec)
    assert out.getvalue().endswith(" WARNING tether.sidecar.proxy: refused x\n")
    with pytest.raises(ValueError, match="text, json"):
        make_formatter("yaml")
