"""Helpers with no business rules: money, crypto, time."""
