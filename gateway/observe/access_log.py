"""The access log: one line per request on stdout, written when its response has ended.

JSON by default, one object per line; ``GATEWAY_LOG_FORMAT=text`` gives one
readable line instead. A line holds only what the request's Record holds: never
a key, a secret, a query string, a header or a body.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import Any

from flask import Flask

from ..errors import ConfigError
from .record import Record

__all__ = ["FORMATS", "fields", "init_app", "text_line"]

FORMATS = ("json", "text")


def _iso(wall: float) -> str:
    return f"{_second(int(wall))}.{int(wall * 1000) % 1000:03d}Z"


@functools.lru_cache(maxsize=1)
def _second(whole: int) -> str:
    # Formatted once per second, not once per line: the lines of one second share it.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def fields(record: Record) -> dict[str, Any]:
    """Return the access log fields of a finished ``record``."""
    line: dict[str, Any] = {
        "time": _iso(record.wall),
        "request_id": record.request_id,
        "remote": record.remote,
    }
    if record.client is not None:
        line["client"] = record.client
    if record.user is not None:
        line["user"] = record.user
    line["target"] = record.target
    line["method"] = record.method
    line["path"] = record.path
    line["status"] = record.status
    line["error"] = record.error
    line["upstream_status"] = record.upstream_status
    line["upstream_request_id"] = record.upstream_request_id
    line["duration_ms"] = _ms(record.duration)
    line["ttfb_ms"] = _ms(record.ttfb)
    line["bytes_in"] = record.bytes_in
    line["bytes_out"] = record.bytes_out
    if record.model is not None:
        line["model"] = record.model
    if record.input_tokens is not None:
        line["input_tokens"] = record.input_tokens
    if record.output_tokens is not None:
        line["output_tokens"] = record.output_tokens
    return line


def _text(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    # Quoted (and escaped) when it could be read as two fields or hide a line break.
    if not text or not text.isprintable() or any(c in text for c in ' "\\'):
        return json.dumps(text)
    return text


def text_line(line: dict[str, Any]) -> str:
    """Return the readable form of an access log line."""
    parts = [
        line["time"],
        _text(line["remote"]),
        _text(line.get("client")),
        _text(line["method"]),
        _text(line["target"]) + ":" + _text(line["path"]),
        _text(line["status"]),
        _text(line["error"]),
        f"{_text(line['duration_ms'])}ms",
        f"ttfb={_text(line['ttfb_ms'])}ms",
        f"in={line['bytes_in']}",
        f"out={line['bytes_out']}",
        f"upstream={_text(line['upstream_status'])}",
        f"upstream_id={_text(line['upstream_request_id'])}",
        f"id={_text(line['request_id'])}",
    ]
    if "user" in line:
        parts.append(f"user={_text(line['user'])}")
    if "model" in line:
        parts.append(f"model={_text(line['model'])}")
    if "input_tokens" in line or "output_tokens" in line:
        parts.append(f"tokens={_text(line.get('input_tokens'))}/{_text(line.get('output_tokens'))}")
    return " ".join(parts)


def _write(line: str) -> None:
    # Straight to stdout, one write per line (whole lines, even with two workers
    # on one file): the logging module would cost as much again as the line.
    # sys.stdout is looked up each time, as test runners swap it.
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass  # stdout gone (a closed pipe): the answer itself must not fail


# One encoder for every line: json.dumps builds a new one for each call with separators.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _write_json(record: Record) -> None:
    _write(_ENCODER.encode(fields(record)))


def _write_text(record: Record) -> None:
    _write(text_line(fields(record)))


def init_app(app: Flask) -> None:
    """Write an access line for every request of ``app`` when its response ends."""
    form = app.config["GATEWAY_LOG_FORMAT"]
    if form not in FORMATS:
        raise ConfigError([f"GATEWAY_LOG_FORMAT: {form!r} is not a log format; use json or text"])
    write = _write_text if form == "text" else _write_json
    app.extensions["gateway.observers"].finished.append(write)
