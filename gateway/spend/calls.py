"""LLM calls: which model a call asks for, its token ceiling, and its reservation.

Plain Python with no Flask imports. A call is an LLM call when its JSON body has
a top-level ``model``. Every place an upstream could read a model name from (the
body's ``model`` and a ``model`` query parameter) is checked against the client's
``allowedModels``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import PolicyError
from ..policy.models import ModelPattern

# read_call's default: the body has not been read as JSON yet.
NOT_PARSED: Any = object()

__all__ = [
    "CEILING_FIELDS",
    "NOT_PARSED",
    "LLMCall",
    "read_call",
    "with_usage_requested",
]

# The fields OpenAI (chat, legacy), Anthropic and OpenAI's Responses API read a
# call's output ceiling from.
CEILING_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@dataclass(frozen=True)
class LLMCall:
    """What the gateway read from a call's body: its model, ceiling and parsed JSON."""

    model: str | None
    ceiling: int | None
    body: dict[str, Any] | None

    def reservation(self, body_size: int) -> int:
        """Return the tokens to reserve: the ceiling plus a bound on the prompt.

        A token is at least one byte of the text it stands for, and the JSON
        around the text outweighs the few tokens a chat template adds, so the
        body's size in bytes bounds the prompt's tokens (for text prompts).
        """
        return (self.ceiling or 0) + body_size


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        # Two "model" keys: the gateway and the upstream could read different ones.
        raise ValueError("a key written twice")
    return dict(pairs)


def read_call(
    body: bytes | None,
    query: Iterable[tuple[str, str]],
    models: tuple[ModelPattern, ...],
    max_tokens: int | None,
    needs_ceiling: bool,
    parsed: Any = NOT_PARSED,
) -> LLMCall:
    """Read ``body`` and check its model and ceiling; raise ``PolicyError`` if refused.

    ``needs_ceiling`` (a token budget applies) makes a ceiling required even
    without ``max_tokens`` configured. Where any rule applies, the body must be a
    JSON object (or empty); elsewhere a body that is not is simply not an LLM call.
    ``parsed`` is the body already read as JSON (the envelope's), to skip reading it again.
    """
    strict = bool(models) or max_tokens is not None or needs_ceiling
    if parsed is NOT_PARSED:
        parsed = None
    elif parsed is not None:
        body = None  # already read
    if body and (strict or body.lstrip()[:1] == b"{"):
        try:
            parsed = json.loads(body, object_pairs_hook=_refuse_duplicates)
        except (ValueError, RecursionError):
            if strict:
                raise PolicyError("invalid_json", "is not valid JSON") from None
    if strict and parsed is not None and not isinstance(parsed, dict):
        raise PolicyError("invalid_json", "is not a JSON object")
    asked = [value for name, value in query if name == "model"]
    if isinstance(parsed, dict) and "model" in parsed:
        asked.append(parsed["model"])
    if models:
        for model in asked:
            if not isinstance(model, str) or not any(p.matches(model) for p in models):
                raise PolicyError("model_not_allowed", "may not use this model")
    if not isinstance(parsed, dict) or "model" not in parsed:
        return LLMCall(None, None, parsed)
    ceiling = None
    for name in CEILING_FIELDS:
        if name in parsed:
            value = parsed[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PolicyError(
                    "max_tokens_required", f"sets {name} to something not a whole number"
                )
            ceiling = max(ceiling or 0, value)
    if ceiling is None and (max_tokens is not None or needs_ceiling):
        raise PolicyError("max_tokens_required", "must set max_tokens (or max_completion_tokens)")
    if max_tokens is not None and ceiling is not None and ceiling > max_tokens:
        raise PolicyError("max_tokens_not_allowed", f"may ask for at most {max_tokens} tokens")
    model = parsed["model"] if isinstance(parsed["model"], str) else None
    return LLMCall(model, ceiling, parsed)


def with_usage_requested(call: LLMCall, path: str) -> bytes | None:
    """Return the body rewritten to ask for streamed usage, or None if it needs no change.

    OpenAI-style chat streams report usage only when asked
    (``stream_options.include_usage``); Anthropic's streams always do.
    """
    body = call.body
    if not body or body.get("stream") is not True or not path.endswith("/chat/completions"):
        return None
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    rewritten = {**body, "stream_options": {**options, "include_usage": True}}
    return json.dumps(rewritten, separators=(",", ":"), ensure_ascii=False).encode()
