"""Which API's error shape a transparent call's refusals take. No Flask imports.

Transparent mode's promise is that an official SDK works by changing only its
base URL, so a refusal of the gateway's own should read in that SDK as its
API's own errors do (the shapes are ``errors.error_body``'s). The target's
``dialect`` decides when the operator wrote one; otherwise the call's own signs:
the Anthropic SDK sends ``anthropic-version`` on every call, and an OpenAI-style
call's path ends in one of OpenAI's endpoints. An envelope call is always flat.
"""

from __future__ import annotations

import re

__all__ = ["call_dialect"]

# OpenAI's endpoints, at the end of a path: OpenAI's own ``/v1/...``,
# OpenRouter's ``/api/v1/...`` and Azure's ``/openai/deployments/{id}/...`` alike.
_OPENAI_ENDPOINT = re.compile(
    r"/(?:chat/completions|completions|embeddings|responses|models|moderations"
    r"|images/[^/]+|audio/[^/]+)/?\Z"
)


def call_dialect(target_dialect: str | None, path: str, anthropic_version: str | None) -> str:
    """Return the dialect (``errors.DIALECTS``) of a transparent call's refusals.

    ``target_dialect`` is the target's ``dialect`` (None before the client is
    known, or where the config leaves it out); ``path`` is the request's path;
    ``anthropic_version`` the call's ``anthropic-version`` header, if any.
    """
    if target_dialect is not None:
        return target_dialect
    if anthropic_version is not None:
        return "anthropic"
    if _OPENAI_ENDPOINT.search(path):
        return "openai"
    return "none"
