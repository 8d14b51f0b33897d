"""Provider dialects: where each one names a call's model, its output ceiling and its count.

Plain Python with no Flask imports. One entry per dialect, so the next provider
is one more entry. Every call is read in every dialect at once (``EVERY``): a
target may speak any of them, a field that its upstream never reads costs
nothing to check, and a field that the gateway does not know is a way past the
rules.

A field is a path of keys into the JSON body. Each key lists every spelling its
upstream reads: Google's JSON mapping reads both ``generationConfig`` and
``generation_config``. Any other spelling that folds to the same name
(``Model``, ``MAX_TOKENS``, a Kelvin sign for ``k``) is refused: servers that
match keys without regard to case, like Go's ``encoding/json``, would read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DIALECTS", "EVERY", "Dialect", "Field", "field", "fold"]

Field = tuple[tuple[str, ...], ...]  # a path of keys, each with its accepted spellings


def field(*keys: str) -> Field:
    """Return a field from keys written ``"generationConfig|generation_config"``."""
    return tuple(tuple(key.split("|")) for key in keys)


def fold(key: str) -> str:
    """Return ``key`` as a server matching without case (or with either case style) reads it."""
    return key.casefold().replace("_", "")


@dataclass(frozen=True)
class Dialect:
    """How one provider's API names a call's model, its ceiling and its number of answers."""

    name: str
    path_models: tuple[re.Pattern[str], ...] = ()  # group "model", searched in the upstream path
    models: tuple[Field, ...] = ()  # one model name each
    model_lists: tuple[Field, ...] = ()  # a list of model names (fallbacks)
    ceilings: tuple[Field, ...] = ()  # output tokens, per answer
    counts: tuple[Field, ...] = ()  # answers generated per call (each up to the ceiling)


DIALECTS: dict[str, Dialect] = {
    # Chat completions, legacy completions (best_of), Responses (max_output_tokens).
    "openai": Dialect(
        "openai",
        models=(field("model"),),
        ceilings=(field("max_tokens"), field("max_completion_tokens"), field("max_output_tokens")),
        counts=(field("n"), field("best_of")),
    ),
    # OpenAI's shape plus a fallback list, tried in turn.
    "openrouter": Dialect("openrouter", model_lists=(field("models"),)),
    "anthropic": Dialect("anthropic", models=(field("model"),), ceilings=(field("max_tokens"),)),
    # POST /v1beta/models/{model}:generateContent (and :streamGenerateContent, ...);
    # Vertex AI's .../publishers/{publisher}/models/{model}:rawPredict is the same shape.
    "gemini": Dialect(
        "gemini",
        path_models=(re.compile(r"/(?:models|tunedModels)/(?P<model>[^/]*):[A-Za-z]+\Z"),),
        ceilings=(
            field("generationConfig|generation_config", "maxOutputTokens|max_output_tokens"),
        ),
        counts=(field("generationConfig|generation_config", "candidateCount|candidate_count"),),
    ),
    # POST /openai/deployments/{deployment}/chat/completions: the body is OpenAI's.
    "azure": Dialect("azure", path_models=(re.compile(r"/deployments/(?P<model>[^/]+)/"),)),
    # POST /model/{modelId}/converse (and /invoke, and their streams).
    "bedrock": Dialect(
        "bedrock",
        path_models=(
            re.compile(
                r"/model/(?P<model>[^/]+)/"
                r"(?:invoke|invoke-with-response-stream|converse|converse-stream)\Z"
            ),
        ),
        ceilings=(field("inferenceConfig", "maxTokens"),),
    ),
}


def _every(dialects: list[Dialect]) -> Dialect:
    def union(name: str) -> tuple:
        seen: dict = {}
        for dialect in dialects:
            seen.update(dict.fromkeys(getattr(dialect, name)))
        return tuple(seen)

    names = ("path_models", "models", "model_lists", "ceilings", "counts")
    return Dialect("every", **{name: union(name) for name in names})


# What the gateway reads from any call, whatever its target.
EVERY = _every(list(DIALECTS.values()))
