"""LLM calls: which model a call asks for, its token ceiling, and its reservation.

Plain Python with no Flask imports. A call is recognised by what its upstream
would read, in every provider dialect (``dialects.EVERY``): a model named in the
path (Gemini, Azure, Bedrock), in the body (``model``, and OpenRouter's
``models`` list) or in a ``model`` query parameter. Every name is checked
against the client's ``allowedModels``, and every name must be a plain one
(``MAX_MODEL_LENGTH`` printable characters) for any client.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from ..errors import PolicyError
from ..policy.models import ModelPattern
from .dialects import DIALECTS, EVERY, Field, fold

# read_call's default: the body has not been read as JSON yet.
NOT_PARSED: Any = object()

__all__ = [
    "MAX_COUNT",
    "MAX_MODEL_LENGTH",
    "NOT_PARSED",
    "LLMCall",
    "read_call",
    "rewritten_body",
]

# Model names go into logs, usage rows and metric labels: short and printable.
MAX_MODEL_LENGTH = 256
# Answers per call (n, best_of, candidateCount): OpenAI's own bound for n.
MAX_COUNT = 128

_MODEL_REQUIRED = "must name its model in the body's model field (or the path)"


@dataclass(frozen=True)
class LLMCall:
    """What the gateway read from a call: its model, ceiling, answer count and parsed JSON."""

    model: str | None
    ceiling: int | None
    body: dict[str, Any] | None
    count: int = 1  # answers the upstream generates (n, best_of, candidateCount)
    ceiling_added: bool = False  # the call named none: the gateway adds defaultMaxTokens
    models: tuple[str, ...] = ()  # every model the call names (fallbacks included)

    def reservation(self, body_size: int) -> int:
        """Return the tokens to reserve: the ceiling for each answer plus a bound on the prompt.

        A token is at least one byte of the text it stands for, and the JSON
        around the text outweighs the few tokens a chat template adds, so the
        body's size in bytes bounds the prompt's tokens (for text prompts).
        """
        return (self.ceiling or 0) * self.count + body_size


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # The dict itself tells: a key written twice leaves it shorter than the pairs.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # Two "model" keys: the gateway and the upstream could read different ones.
        raise ValueError("a key written twice")
    return obj


def _model_name(value: Any) -> str:
    """Return ``value`` if it is a plain model name; raise ``invalid_model`` otherwise."""
    if not (isinstance(value, str) and 0 < len(value) <= MAX_MODEL_LENGTH and value.isprintable()):
        raise PolicyError(
            "invalid_model",
            f"must name models in 1 to {MAX_MODEL_LENGTH} printable characters "
            "(no control characters)",
        )
    return value


Refusal = Callable[[str], PolicyError]


def _no_model(reason: str) -> PolicyError:
    return PolicyError("model_required", reason)


def _bad_ceiling(reason: str) -> PolicyError:
    return PolicyError("max_tokens_required", reason)


def _bad_count(reason: str) -> PolicyError:
    return PolicyError("invalid_choice_count", reason)


def _values(
    body: dict[str, Any], path: Field, refuse: Refusal | None, folds: _Folds | None = None
) -> list[Any]:
    """Return every value at ``path`` in ``body``, in any accepted spelling.

    With ``refuse`` (a rule applies), a key that folds to an accepted spelling
    without being one is refused, since some upstream would read it as the field.
    ``folds`` keeps each object's keys folded once for all the fields read from it.
    """
    found: list[Any] = [body]
    for spellings in path:
        inner = []
        for holder in found:
            if not isinstance(holder, dict):
                continue
            if refuse is not None:
                _refuse_respelled(holder, spellings, refuse, folds if folds is not None else {})
            inner += [holder[name] for name in spellings if name in holder]
        found = inner
    return found


# Each object's keys by their folded form, in order: {id(object): {folded: [keys]}}.
# Valid while the objects live, i.e. within one read_call.
_Folds = dict[int, dict[str, list[str]]]


@functools.cache
def _folded(spellings: tuple[str, ...]) -> frozenset[str]:
    return frozenset(fold(name) for name in spellings)


def _refuse_respelled(
    holder: dict[str, Any], spellings: tuple[str, ...], refuse: Refusal, folds: _Folds
) -> None:
    """Refuse the first key of ``holder`` that folds to ``spellings`` without being one."""
    by_fold = folds.get(id(holder))
    if by_fold is None:
        by_fold = folds[id(holder)] = {}
        for key in holder:
            by_fold.setdefault(fold(key), []).append(key)
    hits = _folded(spellings) & by_fold.keys()
    if hits and any(key not in spellings for hit in hits for key in by_fold[hit]):
        for key in holder:  # the first such key in the body's order, as the message names it
            if key not in spellings and fold(key) in hits:
                raise refuse(f"writes {key!r}; spell it {spellings[0]!r}")


def _whole(values: list[Any], refuse: Refusal, reason: str, top: int | None = None) -> int | None:
    """Return the largest of ``values``, each a whole number from 1 (to ``top``), or None."""
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise refuse(reason)
        if top is not None and value > top:
            raise refuse(reason)
    return max(values, default=None)


def read_call(
    body: bytes | None,
    query: Iterable[tuple[str, str]],
    models: tuple[ModelPattern, ...],
    max_tokens: int | None,
    needs_ceiling: bool,
    parsed: Any = NOT_PARSED,
    path: str = "",
    default_ceiling: int | None = None,
) -> LLMCall:
    """Read a call and check its model and ceiling; raise ``PolicyError`` if refused.

    ``path`` is the path the upstream sees (the target's base path included).
    ``needs_ceiling`` (a token budget applies) makes a ceiling required even
    without ``max_tokens`` configured. Where any rule applies, the body must be a
    JSON object (or empty) that names its model; elsewhere a body that is not
    JSON is simply not an LLM call.
    ``parsed`` is the body already read as JSON (the envelope's), to skip reading it again.
    ``default_ceiling`` (defaultMaxTokens) is the ceiling of a call that names none.
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
    fields = parsed if isinstance(parsed, dict) else None
    folds: _Folds = {}
    named = _Named.read(fields, query, unquote(path), strict, folds)
    if models:
        for model in named.every():
            if not any(p.matches(model) for p in models):
                raise PolicyError("model_not_allowed", "may not use this model")
    model = named.metered()
    if model is None:
        if strict and fields is not None:
            raise PolicyError("model_required", _MODEL_REQUIRED)
        return LLMCall(None, None, parsed)
    ceiling = count = None
    if fields is not None:
        ceiling = _whole(
            _all(fields, EVERY.ceilings, _bad_ceiling if strict else None, folds),
            _bad_ceiling,
            "sets its output ceiling (max_tokens) to something not a whole number",
        )
        if strict:
            count = _whole(
                _all(fields, EVERY.counts, _bad_count, folds),
                _bad_count,
                f"must ask for 1 to {MAX_COUNT} answers (n, best_of, candidateCount)",
                MAX_COUNT,
            )
    added = ceiling is None and default_ceiling is not None and fields is not None
    if added:
        ceiling = default_ceiling
    if ceiling is None and (max_tokens is not None or needs_ceiling):
        raise PolicyError("max_tokens_required", "must set max_tokens (or max_completion_tokens)")
    if max_tokens is not None and ceiling is not None and ceiling > max_tokens:
        raise PolicyError("max_tokens_not_allowed", f"may ask for at most {max_tokens} tokens")
    return LLMCall(model, ceiling, parsed, count or 1, added, tuple(named.every()))


def _all(
    body: dict[str, Any], spots: tuple[Field, ...], refuse: Refusal | None, folds: _Folds
) -> list[Any]:
    return [value for spot in spots for value in _values(body, spot, refuse, folds)]


@dataclass(frozen=True)
class _Named:
    """Every model name a call gives its upstream, by where it is written."""

    path: list[str]
    body: list[str]
    lists: list[str]  # fallbacks (OpenRouter's models)
    query: list[str]

    @classmethod
    def read(
        cls,
        body: dict[str, Any] | None,
        query: Iterable[tuple[str, str]],
        path: str,
        strict: bool,
        folds: _Folds,
    ) -> _Named:
        """Read and bound every name; with ``strict``, refuse a respelled model key."""
        refuse = _no_model if strict else None
        in_path = [_model_name(m["model"]) for p in EVERY.path_models if (m := p.search(path))]
        in_body, in_lists = [], []
        if body is not None:
            in_body = [
                _model_name(v) for v in _all(body, EVERY.models, refuse, folds) if v is not None
            ]
            for value in _all(body, EVERY.model_lists, refuse, folds):
                if not isinstance(value, list):
                    raise PolicyError("invalid_model", "must send models as a list of names")
                in_lists += [_model_name(item) for item in value]
        in_query = []
        for name, value in query:
            if name == "model":
                in_query.append(_model_name(value))
            elif strict and fold(name) == "model":
                raise _no_model(f"writes the query parameter {name!r}; spell it 'model'")
        return cls(in_path, in_body, in_lists, in_query)

    def every(self) -> list[str]:
        return self.path + self.body + self.lists + self.query

    def metered(self) -> str | None:
        """Return the model the call is metered as: the one its upstream reads first."""
        return next(iter(self.path + self.body + self.query), None)


# Where a dialect's upstream reads the output ceiling the gateway adds, by the path's end.
_GEMINI = DIALECTS["gemini"].path_models[0]
_CEILING_SPOTS = (
    (re.compile(r"/converse(?:-stream)?\Z"), ("inferenceConfig", "maxTokens")),
    (_GEMINI, ("generationConfig", "maxOutputTokens")),
    (re.compile(r"/responses\Z"), ("max_output_tokens",)),
)


def rewritten_body(call: LLMCall, path: str, ask_usage: bool) -> bytes | None:
    """Return the body as the upstream gets it, or None if the gateway changes nothing.

    The gateway adds the ceiling of a call that named none (``ceiling_added``),
    in the field its dialect reads (``path`` is the upstream's), and with
    ``ask_usage`` asks an OpenAI-style chat stream to report its usage
    (``stream_options.include_usage``; Anthropic's streams always do).
    """
    body = call.body
    if not body:
        return None
    changed = False
    if call.ceiling_added:
        keys = next((spot for rule, spot in _CEILING_SPOTS if rule.search(path)), ("max_tokens",))
        body = _with(body, keys, call.ceiling)
        changed = True
    options = body.get("stream_options")
    if options is None:
        options = {}
    if (
        ask_usage
        and body.get("stream") is True
        and path.endswith("/chat/completions")
        and isinstance(options, dict)
        and options.get("include_usage") is not True
    ):
        body = {**body, "stream_options": {**options, "include_usage": True}}
        changed = True
    if not changed:
        return None
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _with(body: dict[str, Any], keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    """Return a copy of ``body`` with ``value`` at the path ``keys`` (inner objects copied)."""
    first, *rest = keys
    if not rest:
        return {**body, first: value}
    inner = body.get(first)
    return {**body, first: _with(inner if isinstance(inner, dict) else {}, tuple(rest), value)}
