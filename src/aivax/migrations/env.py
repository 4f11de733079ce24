"""Alembic environment: async engines, SQLite batch mode, and a PostgreSQL advisory lock so that
replicas starting together do not migrate twice."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from aivax.config import load_settings
from aivax.db import create_engine
from aivax.models import Base
from aivax.models.base import UTCDateTime

MIGRATION_LOCK_ID = 7_240_001  # arbitrary, fixed: pg_advisory_lock key for migrations


def _render_item(type_: str, obj: object, autogen_context: Any) -> str | Literal[False]:
    """Autogenerate writes portable types, never references to application classes."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _run(connection: Connection) -> None:
    is_postgres = connection.dialect.name == "postgresql"
    if is_postgres:
        connection.execute(text(f"SELECT pg_advisory_lock({MIGRATION_LOCK_ID})"))
        connection.commit()
    try:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
            render_item=_render_item,
        )
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if is_postgres:
            connection.execute(text(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_ID})"))
            connection.commit()


async def _migrate() -> None:
    url = context.config.attributes.get("database_url")
    settings = load_settings(database_url=url) if url else load_settings()
    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


asyncio.run(_migrate())
