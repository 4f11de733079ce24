"""Alembic migrations, shipped inside the package so `aivax migrate` works from any install."""
