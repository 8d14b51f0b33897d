"""Prices: what a model's tokens cost, and a call's cost in whole micro-units.

Plain Python with no Flask imports. Prices are written per million tokens in
the billing currency; a micro-unit is a millionth of that currency, so a
token's price in micro-units is the price per million, and a cost is an
integer: the price times the tokens, divided by a million, rounded up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from .limits import MICRO
from .models import ModelPattern

__all__ = ["Price", "PriceTable", "money", "parse_price"]

# A price is written with at most 6 decimals and below this: exact as an integer.
MAX_PRICE = 1_000_000


@dataclass(frozen=True)
class Price:
    """Micro-units per million tokens, in and out (so: micro-units per token, times a million)."""

    input: int
    output: int

    def cost(self, input_tokens: int, output_tokens: int) -> int:
        """Return the cost in micro-units, rounded up to a whole one."""
        return -(-(input_tokens * self.input + output_tokens * self.output) // MICRO)


def parse_price(value: object) -> int:
    """Return a price per million tokens in micro-units, or raise ``ValueError``."""
    why = f"must be a number from 0 to {MAX_PRICE} with at most 6 decimals, e.g. 0.15"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(why)
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(why) from None
    micro = amount * MICRO
    if not amount.is_finite() or not 0 <= amount < MAX_PRICE or micro != int(micro):
        raise ValueError(why)
    return int(micro)


@dataclass(frozen=True)
class PriceTable:
    """Model patterns and their prices, in order: the first pattern matching a model wins."""

    entries: tuple[tuple[ModelPattern, Price], ...] = ()

    @classmethod
    def build(cls, prices: Iterable[tuple[str, Price]]) -> PriceTable:
        return cls(tuple((ModelPattern.compile(text), price) for text, price in prices))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __add__(self, other: PriceTable) -> PriceTable:
        return PriceTable(self.entries + other.entries)

    def price(self, model: str) -> Price | None:
        """Return the price of ``model``, or None if no pattern matches it."""
        return next((price for pattern, price in self.entries if pattern.matches(model)), None)


def money(micro: int) -> str:
    """Return an amount of micro-units in units with six decimals, e.g. ``1.250000``."""
    sign = "-" if micro < 0 else ""
    whole, part = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{part:06d}"
