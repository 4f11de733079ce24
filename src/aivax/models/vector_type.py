"""The chunk-embedding column: pgvector's `vector` on PostgreSQL, float32 bytes on SQLite.

Python values are 1-D float32 numpy arrays either way. The PostgreSQL column has no fixed
dimension (collections use different models); HNSW indexes are partial, one per dimension,
over `embedding::vector(d)` (see aivax.rag.vectors).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pgvector.sqlalchemy import VECTOR
from sqlalchemy import Dialect, LargeBinary
from sqlalchemy.types import TypeDecorator, TypeEngine


class EmbeddingColumn(TypeDecorator[Any]):
    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(VECTOR())
        return dialect.type_descriptor(LargeBinary())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        array = np.asarray(value, dtype=np.float32)
        # On PostgreSQL, VECTOR's own bind processor turns the array into pgvector's text form.
        return array if dialect.name == "postgresql" else array.tobytes()

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "postgresql":  # already parsed by VECTOR's result processor
            return np.asarray(value, dtype=np.float32)
        return np.frombuffer(value, dtype=np.float32)
