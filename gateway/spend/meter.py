"""Reading token usage out of OpenAI-, Anthropic-, Gemini- and Bedrock-style answers, as they pass.

Plain Python with no Flask imports. The meter is a stage of the response
pipeline: it passes every chunk on at once and keeps only what it needs (the
current SSE event, or a bounded copy of a JSON body). A usage figure that is not
a whole number from 0 to ``MAX_USAGE`` is distrusted: the call's usage is then
unknown, so its reservation stays charged, and the figure is never stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

__all__ = ["MAX_USAGE", "UsageMeter", "metered"]

_MAX_JSON_COPY = 8 * 1024 * 1024
# The largest token count believed: exact as a double (Redis' Lua, JSON readers),
# far inside SQLite's integers, and more tokens than any call will ever use.
MAX_USAGE = 2**53

# Where each dialect reports input and output tokens: the first name found counts,
# plus the figures that dialect counts apart (Anthropic's and Bedrock's caches,
# Gemini's tool prompts and thinking).
_INPUT = {
    "prompt_tokens": (),
    "input_tokens": ("cache_creation_input_tokens", "cache_read_input_tokens"),
    "promptTokenCount": ("toolUsePromptTokenCount",),
    "inputTokens": ("cacheReadInputTokens", "cacheWriteInputTokens"),
}
_OUTPUT = {
    "completion_tokens": (),
    "output_tokens": (),
    "candidatesTokenCount": ("thoughtsTokenCount",),
    "outputTokens": (),
}


class UsageMeter:
    """Collects the usage an answer reports: input tokens and (cumulative) output tokens."""

    def __init__(self, content_type: str | None) -> None:
        self._sse = (content_type or "").split(";")[0].strip().lower() == "text/event-stream"
        self._buffer = b""
        self._too_big = False
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.complete = False  # the whole answer passed
        self.distrusted: set[str] = set()  # "input", "output": figures not believed

    @property
    def tokens(self) -> int | None:
        """Input plus output tokens, or None unless the final usage was seen in a whole answer."""
        if not self.complete or self.input_tokens is None or self.output_tokens is None:
            return None
        if self.distrusted or self.input_tokens + self.output_tokens > MAX_USAGE:
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
            if line.startswith(b"data:") and b'"usage' in line:  # usage, usageMetadata
                self._read(line[5:])

    def _read(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):
            return
        # Gemini streams without alt=sse as one JSON array of answers.
        for answer in message if isinstance(message, list) else [message]:
            if not isinstance(answer, dict):
                continue
            for holder in (answer, answer.get("message"), answer.get("response")):
                if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
                    self._usage(holder["usage"])
            if isinstance(answer.get("usageMetadata"), dict):
                self._usage(answer["usageMetadata"])

    def _usage(self, usage: dict[str, Any]) -> None:
        def figure(kind: str, names: dict[str, tuple[str, ...]]) -> int | None:
            first = next((name for name in names if usage.get(name) is not None), None)
            if first is None:
                return None
            total = 0
            for name in (first, *names[first]):
                value = usage.get(name)
                if value is None:
                    continue  # Anthropic writes null for a cache it did not use
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int)
                    or not 0 <= value <= MAX_USAGE
                ):
                    self.distrusted.add(kind)
                    return None
                total += value
            if total > MAX_USAGE:
                self.distrusted.add(kind)
                return None
            return total

        # OpenAI: prompt/completion; Anthropic and Responses: input/output, cache apart;
        # Gemini: usageMetadata's counts; Bedrock's Converse: inputTokens/outputTokens.
        prompt = figure("input", _INPUT)
        if prompt is not None:
            self.input_tokens = max(self.input_tokens or 0, prompt)
        output = figure("output", _OUTPUT)
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
