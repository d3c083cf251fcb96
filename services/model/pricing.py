"""What a model's tokens cost, by the price table (`model_prices_usd_per_million`: a model name to its USD prices
per million input and output tokens)."""

from __future__ import annotations

from collections.abc import Mapping

Prices = Mapping[str, tuple[float, float]]


def price_family(prices: Prices, model: str) -> str | None:
    """The price table's entry for `model`: the longest name it starts with, so that a dated snapshot
    ("gpt-4o-mini-2024-07-18") takes its family's price ("gpt-4o-mini"); None when there is none."""
    matches = [name for name in prices if model.startswith(name)]
    return max(matches, key=len) if matches else None


def cost_usd(prices: Prices, model: str, input_tokens: int, output_tokens: int) -> float:
    """What the tokens of a call to `model` cost in USD by the price table; 0 for a model it does not list."""
    family = price_family(prices, model)
    if family is None:
        return 0.0
    return priced_usd(prices[family], input_tokens, output_tokens)


def priced_usd(price_usd_per_million: tuple[float, float], input_tokens: int, output_tokens: int) -> float:
    """What the tokens cost at this price (USD per million input tokens, per million output tokens)."""
    input_price, output_price = price_usd_per_million
    return (input_tokens * input_price + output_tokens * output_price) / 1_000_000
