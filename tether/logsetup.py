"""How every `tether` command logs: plain text or one JSON object per line (`--log-format`).

A JSON line has `time` (UTC, RFC 3339 with `Z`), `level`, `logger` and `message`, then the
structured fields known where the line was written: those bound for the current request or
task (`log_context`, a contextvar) and those passed as `extra=` at the call site. Field names
in use are the constants below (`SESSION`, `STREAM`, ...), so a log pipeline can index them.

Rules:
  1. Call sites stay plain `log.info("...", args)`: the fields of the request being handled
     come from `log_context`, set once where the request or task begins; a task started inside
     it inherits them (contextvars are copied into new tasks).
  2. `extra=` wins over the context for the same name; a field with value None is left out.
  3. The text format is unchanged by fields (a line says in words what it is about); only the
     JSON format carries them as fields.

The JSON encoding is python-json-logger's (a well-kept formatter that already handles
exceptions, stack info and values json cannot encode); this module only fixes the field names
and the timestamp format.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, TextIO

from pythonjsonlogger.core import RESERVED_ATTRS, merge_record_extra
from pythonjsonlogger.json import JsonFormatter

LOG_FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

SESSION = "session"
STREAM = "stream"
OWNER = "owner"
MCP_METHOD = "mcp_method"
REQUEST_ID = "request_id"

_NO_FIELDS: Mapping[str, object] = MappingProxyType({})
_fields: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "tether_log_fields", default=_NO_FIELDS
)


def current_fields() -> Mapping[str, object]:
    """The fields bound for the running request or task (rule 1)."""
    return _fields.get()


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Bind `fields` for every line logged inside the block (and by tasks started in it);
    `bind_log_fields` inside the block adds more, all undone when the block ends."""
    token = _fields.set({**_fields.get(), **_present(fields)})
    try:
        yield
    finally:
        _fields.reset(token)


def bind_log_fields(**fields: object) -> None:
    """Add fields to the current context: learned part-way through a request (its MCP method
    once the body is read). Call it inside a `log_context`, which undoes it."""
    present = _present(fields)
    if present:
        _fields.set({**_fields.get(), **present})


def _present(fields: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in fields.items() if v is not None and v != ""}


def rfc3339_utc(created: float) -> str:
    """`2026-12-02T04:44:33.123Z`: UTC, milliseconds, `Z` (what log stores parse as-is)."""
    whole = int(created)
    millis = int((created - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


class TetherJsonFormatter(JsonFormatter):
    """One JSON object per line: time, level, logger, message, then the fields (rule 2)."""

    def __init__(self) -> None:
        super().__init__(reserved_attrs=[*RESERVED_ATTRS, "taskName"])

    def add_fields(
        self,
        log_data: dict[str, Any],
        record: logging.LogRecord,
        message_dict: dict[str, Any],
    ) -> None:
        log_data["time"] = rfc3339_utc(record.created)
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.message
        log_data.update(_fields.get())
        merge_record_extra(record, log_data, reserved=self._skip_fields)
        for key in [k for k, v in log_data.items() if v is None]:
            del log_data[key]
        log_data.update(message_dict)  # exc_info, stack_info


def make_formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return TetherJsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> None:
    """The root logger writes to `stream` (stderr) at `level` in `log_format` (text or json).
    Like `logging.basicConfig`, it does nothing if the root logger already has a handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])
