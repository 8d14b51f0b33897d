"""The forms a secret can be written back in, and the patterns that find it in bytes.

Plain Python with no Flask imports; the egress guard (``egress``) runs these
patterns over each answer.

A secret is found however an upstream writes it back, character by character,
in any mix of these forms (``/`` as the example):

- as it is (``/``);
- URL-encoded, every UTF-8 byte as ``%XX`` in either hex case (``%2F``, ``%2f``),
  and a space as ``+``;
- JSON-escaped: ``\\uXXXX`` in either hex case (``\\u002F``; a surrogate pair past
  U+FFFF), or JSON's short escape where there is one (``\\/``, ``\\"``, ``\\\\``);
- a URL form inside JSON whose ``%`` or ``+`` is escaped (``\\u00252F``, ``\\u002B``).

Not covered: encodings that change more than one character at a time (base64,
hex dumps), and a JSON escape URL-encoded in turn (``%5Cu002F``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MIN_SECRET_LENGTH", "GuardedSecrets", "guarded_variants"]

# Shorter values ("1", "true") would match innocent text; a real key is longer.
MIN_SECRET_LENGTH = 8


# A form is how one character may be written: a sequence of byte classes, each
# class the bytes allowed at that place (b"Ff" for a hex digit in either case).
_Form = tuple[bytes, ...]

_JSON_SHORT = {
    "/": "\\/",
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
# How many characters of a secret the pattern for "could this be its start" spells
# out; past them, whatever follows is held back too (Python's regex parser recurses
# once per character, and 32 characters of a key in view are the key).
_BEGUN_DEPTH = 32


class GuardedSecrets:
    """The secrets the guard looks for, compiled once: every form of each, whole or begun."""

    def __init__(self, values: Iterable[str]) -> None:
        values = sorted(values)
        secrets = [[_forms(char) for char in value] for value in values]
        self._count = len(values)
        self._plain = tuple(value.encode("utf-8") for value in values)
        self._whole = re.compile(b"|".join(b"".join(map(_any, secret)) for secret in secrets))
        # Every escape of a character of a secret, by the byte it starts with (%, \ or +).
        escapes: dict[bytes, set[_Form]] = {}
        for value in values:
            for char in set(value):
                for form in _forms(char):
                    if form != _literal(char.encode("utf-8")):
                        escapes.setdefault(form[0], set()).add(form)
        self._escapes = [(lead, re.compile(_any(forms))) for lead, forms in sorted(escapes.items())]
        begun = (_begun(secret[:_BEGUN_DEPTH], len(secret) > _BEGUN_DEPTH) for secret in secrets)
        self._begun = re.compile(b"(?:" + b"|".join(begun) + b")\\Z")
        # The longest a secret can be when written back, in bytes: the overlap kept
        # between chunks, and the stretch searched around an escape, are this long.
        self.longest = max(sum(max(map(len, forms)) for forms in secret) for secret in secrets)

    def __repr__(self) -> str:
        return f"<GuardedSecrets: {self._count}>"  # never the values

    def found_in(self, data: bytes) -> bool:
        """Return whether ``data`` holds a whole secret, in any mix of its forms."""
        for secret in self._plain:
            if secret in data:
                return True
        for lead, escapes in self._escapes:
            at = data.find(lead)  # memchr: most text holds no % or \ at all
            if at != -1 and self._around(escapes, data, at):
                return True
        return False

    def _around(self, escapes: re.Pattern[bytes], data: bytes, at: int) -> bool:
        """Search for a whole secret around each escape in ``data`` from ``at``.

        A secret not written plainly holds an escape of one of its characters, and
        is at most ``longest`` bytes: each stretch of text is searched once.
        """
        reach = self.longest
        searched = 0
        for escape in escapes.finditer(data, at):
            if escape.end() + reach > searched:
                searched = escape.start() + 2 * reach
                if self._whole.search(data, max(0, escape.start() - reach + 1), searched):
                    return True
        return False

    def begun(self, data: bytes) -> int:
        """Return the length of the longest end of ``data`` that could begin a secret."""
        start = max(0, len(data) - self.longest + 1)
        for lead, _ in self._escapes:
            if data.find(lead, start) != -1:
                found = self._begun.search(data, start)
                return len(data) - found.start() if found else 0
        return _partial_suffix(data, self._plain)  # no escape in reach: written plainly


def guarded_variants(values: Iterable[str]) -> GuardedSecrets | None:
    """Return what the guard looks for: every value at least ``MIN_SECRET_LENGTH`` long.

    A value that holds another one (``Bearer ${KEY}`` holds the key) is left out:
    written back in any form, it holds that one in the same form.
    """
    kept: list[str] = []
    for value in sorted({value for value in values if len(value) >= MIN_SECRET_LENGTH}, key=len):
        if not any(shorter in value for shorter in kept):
            kept.append(value)
    return GuardedSecrets(kept) if kept else None


def _literal(text: bytes) -> _Form:
    return tuple(text[i : i + 1] for i in range(len(text)))


def _hex(value: int, digits: int) -> _Form:
    """Return ``value`` in hex, each letter allowed in either case."""
    return tuple(bytes(sorted({ord(d), ord(d.lower())})) for d in f"{value:0{digits}X}")


def _forms(char: str) -> list[_Form]:
    """Return every way the guard knows of writing ``char`` (see the module docstring)."""
    raw = char.encode("utf-8")
    forms = {_literal(raw)}
    for percent in (b"%", b"\\u0025"):
        forms.add(tuple(cls for byte in raw for cls in (*_literal(percent), *_hex(byte, 2))))
    if char == " ":
        forms |= {(b"+",), (*_literal(b"\\u002"), b"Bb")}
    if char in _JSON_SHORT:
        forms.add(_literal(_JSON_SHORT[char].encode("ascii")))
    utf16 = char.encode("utf-16-be")
    units = [int.from_bytes(utf16[i : i + 2], "big") for i in range(0, len(utf16), 2)]
    forms.add(tuple(cls for unit in units for cls in (*_literal(b"\\u"), *_hex(unit, 4))))
    return sorted(forms)


def _class(allowed: bytes) -> bytes:
    if len(allowed) == 1:
        return re.escape(allowed)
    return b"[" + b"".join(re.escape(allowed[i : i + 1]) for i in range(len(allowed))) + b"]"


def _pattern(form: _Form) -> bytes:
    return b"".join(map(_class, form))


def _any(forms: Iterable[_Form]) -> bytes:
    """A pattern for any one of ``forms``, shaped as a trie so a mismatch fails at once."""
    branches: dict[bytes, list[_Form]] = {}
    for form in forms:
        branches.setdefault(form[0], []).append(form[1:])
    patterns = []
    for first, rests in sorted(branches.items()):
        longer = [rest for rest in rests if rest]
        pattern = _class(first)
        if longer:
            pattern += _any(longer) + (b"?" if len(longer) < len(rests) else b"")
        patterns.append(pattern)
    return b"(?:" + b"|".join(patterns) + b")"


def _started(form: _Form) -> bytes:
    """A pattern for the nonempty beginnings of ``form``, itself included."""
    pattern = _class(form[-1])
    for allowed in reversed(form[:-1]):
        pattern = _class(allowed) + b"(?:" + pattern + b")?"
    return pattern


def _begun(chars: list[list[_Form]], goes_on: bool) -> bytes:
    """A pattern for the nonempty beginnings of ``chars``, each in any of its forms.

    ``goes_on``: the secret is longer than ``chars``, so anything after them may be
    more of it.
    """
    forms = chars[0]
    if len(chars) > 1:
        rest = b"(?:" + _begun(chars[1:], goes_on) + b")?"
    else:
        rest = b"(?s:.*)" if goes_on else b""
    partial = sorted({_started(form[:-1]) for form in forms if len(form) > 1})
    return b"|".join([_any(forms) + rest, *partial])


def _partial_suffix(data: bytes, secrets: tuple[bytes, ...]) -> int:
    """Return the length of the longest end of ``data`` that is a start of a secret."""
    longest = 0
    for secret in secrets:
        first = secret[:1]
        start = max(0, len(data) - len(secret) + 1)  # a whole secret was ruled out already
        position = data.find(first, start)
        while position != -1:
            length = len(data) - position
            if length > longest and secret.startswith(data[position:]):
                longest = length
                break
            position = data.find(first, position + 1)
    return longest
