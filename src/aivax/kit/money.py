"""Money is integers: micro-units, 1 USD = 1,000,000."""

from __future__ import annotations

from decimal import Decimal

MICROS_PER_USD = 1_000_000


def micros_to_usd(micros: int) -> str:
    """Render micro-units as a USD decimal string without float rounding, e.g. '1.250000'."""
    whole, fraction = divmod(abs(micros), MICROS_PER_USD)
    return f"{'-' if micros < 0 else ''}{whole}.{fraction:06d}"


def usd_to_micros(usd: str) -> int:
    """Parse a USD decimal string into micro-units; refuses sub-micro precision."""
    value = Decimal(usd) * MICROS_PER_USD
    if value != value.to_integral_value():
        raise ValueError(f"{usd!r} has more than 6 decimal places")
    return int(value)
