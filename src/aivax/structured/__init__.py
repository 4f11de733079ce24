"""Structured output: schema checks on arrival and JSON Healing."""
