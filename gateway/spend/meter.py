"""Reading token usage out of OpenAI- and Anthropic-style answers, as they pass.

Plain Python with no Flask imports. The meter is a stage of the response
pipeline: it passes every chunk on at once and keeps only what it needs (the
current SSE event, or a bounded copy of a JSON body).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

__all__ = ["UsageMeter", "metered"]

_MAX_JSON_COPY = 8 * 1024 * 1024


class UsageMeter:
    """Collects the usage an answer reports: input tokens and (cumulative) output tokens."""

    def __init__(self, content_type: str | None) -> None:
        self._sse = (content_type or "").split(";")[0].strip().lower() == "text/event-stream"
        self._buffer = b""
        self._too_big = False
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.complete = False  # the whole answer passed

    @property
    def tokens(self) -> int | None:
        """Input plus output tokens, or None unless the final usage was seen in a whole answer."""
        if not self.complete or self.input_tokens is None or self.output_tokens is None:
            return None
        return self.input_tokens + self.output_tokens

    def feed(self, chunk: bytes) -> None:
        if self._sse:
            self._buffer += chunk
            *events, self._buffer = self._buffer.replace(b"\r\n", b"\n").split(b"\n\n")
            for event in events:
                self._event(event)
            if len(self._buffer) > _MAX_JSON_COPY:  # no event ends: nothing to read here
                self._buffer = b""
        elif not self._too_big:
            self._buffer += chunk
            if len(self._buffer) > _MAX_JSON_COPY:
                self._buffer, self._too_big = b"", True

    def end(self) -> None:
        """The answer ended whole: read a JSON body's usage."""
        self.complete = True
        if not self._sse and self._buffer:
            self._read(self._buffer)
        self._buffer = b""

    def _event(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if line.startswith(b"data:") and b'"usage"' in line:
                self._read(line[5:])

    def _read(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):
            return
        if not isinstance(message, dict):
            return
        for holder in (message, message.get("message"), message.get("response")):
            if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
                self._usage(holder["usage"])

    def _usage(self, usage: dict[str, Any]) -> None:
        def whole(name: str) -> int | None:
            value = usage.get(name)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        # OpenAI: prompt/completion; Anthropic and Responses: input/output, cache apart.
        prompt = whole("prompt_tokens")
        if prompt is None and whole("input_tokens") is not None:
            prompt = whole("input_tokens") + sum(
                whole(name) or 0
                for name in ("cache_creation_input_tokens", "cache_read_input_tokens")
            )
        if prompt is not None:
            self.input_tokens = max(self.input_tokens or 0, prompt)
        output = whole("completion_tokens")
        if output is None:
            output = whole("output_tokens")
        if output is not None:  # Anthropic's message_delta counts are cumulative
            self.output_tokens = max(self.output_tokens or 0, output)


def metered(chunks: Iterator[bytes], meter: UsageMeter) -> Iterator[bytes]:
    """Pass ``chunks`` on unchanged, feeding each to ``meter``."""
    try:
        for chunk in chunks:
            meter.feed(chunk)
            yield chunk
        meter.end()
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
