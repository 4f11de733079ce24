"""AIVAX: an open-source AI orchestration platform."""

__version__ = "0.1.0"
