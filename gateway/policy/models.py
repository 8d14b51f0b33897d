"""Model patterns: the ``allowedModels`` entries a call's model is matched against.

Plain Python with no Flask imports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ModelPattern"]


@dataclass(frozen=True)
class ModelPattern:
    """An allowedModels entry: ``*`` matches any run of characters."""

    text: str
    regex: re.Pattern[str]

    @classmethod
    def compile(cls, text: str) -> ModelPattern:
        parts = (re.escape(part) for part in text.split("*"))
        return cls(text, re.compile(".*".join(parts), re.DOTALL))

    def matches(self, model: str) -> bool:
        return self.regex.fullmatch(model) is not None
