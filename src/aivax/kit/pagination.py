"""The OpenAI list shape: `{"object": "list", "data": [...], "has_more", "first_id", "last_id"}`."""

from __future__ import annotations

from typing import Annotated, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel

T = TypeVar("T")

MAX_PAGE_SIZE = 100
# Row ids are 64-bit signed integers on both databases; a cursor outside that range would
# overflow the database driver's parameter instead of simply matching no row.
MAX_ROW_ID = 2**63 - 1

PageLimit = Annotated[
    int, Query(ge=1, le=MAX_PAGE_SIZE, description="How many items to return (1-100).")
]
IdCursor = Annotated[
    int | None,
    Query(
        ge=0,
        le=MAX_ROW_ID,
        description="The `last_id` of the previous page (0 to 9223372036854775807).",
    ),
]


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


def page_of(items: list[T], ids: list[str], *, limit: int) -> ListPage[T]:
    """`items` was fetched with limit + 1 rows; the extra row only says there is more."""
    has_more = len(items) > limit
    items, ids = items[:limit], ids[:limit]
    return ListPage[T](
        data=items,
        has_more=has_more,
        first_id=ids[0] if ids else None,
        last_id=ids[-1] if ids else None,
    )


def whole(items: list[T], ids: list[str]) -> ListPage[T]:
    """A list that is never paginated (it is small by construction: an account's keys, the
    plans, a gateway's versions)."""
    return ListPage[T](
        data=items, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None
    )
