"""JSONL import and export.

Import: the body (`{"id"?, "text", "metadata"?, "title"?, "content_type"?}` per line) is
streamed to a temporary file while its size is checked against the plan's
`jsonl_import_max_bytes` — over it, 413 and nothing is written. Lines are then read one at a
time (never the whole body in memory): a bad line is reported with its number and reason and
does not stop the others. Every accepted line is written in one transaction, so an import is
never half-applied; re-importing the same ids is idempotent (unchanged documents are not
re-indexed). Indexing runs as one background job whose progress the response links to.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from aivax.errors import BadRequest, PayloadTooLarge
from aivax.keys.service import Principal
from aivax.kit.jsonlimits import MAX_JSON_DEPTH, JsonTooDeep, loads_limited, nul_path
from aivax.models import Collection, Document
from aivax.rag import documents, service
from aivax.rag.deps import ImportServices
from aivax.rag.schemas import DocumentCreate

SPOOL_MEMORY_BYTES = 1024 * 1024
MAX_REPORTED_REJECTIONS = 1000
EXPORT_PAGE = 200


class ImportTooLarge(PayloadTooLarge):
    code = "import_too_large"


async def _spool(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ImportTooLarge(
            f"The import is {declared} bytes; the plan allows {limit} bytes per JSONL import."
        )
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115 - returned
    received = 0
    try:
        async for part in request.stream():
            received += len(part)
            if received > limit:
                raise ImportTooLarge(
                    f"The import is larger than the plan's {limit}-byte JSONL import limit; "
                    "nothing was written. Split it into smaller files."
                )
            spool.write(part)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


def _parse_line(raw: bytes) -> tuple[DocumentCreate | None, str | None]:
    try:
        value = loads_limited(raw)
    except JsonTooDeep:
        return None, f"nested more than {MAX_JSON_DEPTH} levels deep"
    except ValueError as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(value, dict):
        return None, "each line must be a JSON object"
    if (where := nul_path(value)) is not None:
        return None, f"{where}: contains a NUL character (\\u0000), which is not stored"
    if "id" in value and not isinstance(value["id"], str):
        value["id"] = str(value["id"]) if isinstance(value["id"], int) else value["id"]
    try:
        return DocumentCreate.model_validate(value), None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "line"
        return None, f"{where}: {first['msg']}"


async def import_jsonl(
    services: ImportServices,
    session: AsyncSession,
    principal: Principal,
    collection: Collection,
    request: Request,
) -> dict[str, Any]:
    limits = await service.plan_limits(session, principal.plan_id)
    await service.hit_rate(services.limiter, "insert", principal.account_id, limits.insert_rpm)
    spool = await _spool(request, limits.jsonl_import_max_bytes)
    with spool:
        items, rejected_count, rejected = _read(spool, services.settings)
    if not items:
        return _report(0, 0, rejected_count, rejected, None)
    await service.check_storage(
        session, principal.account_id, limits, sum(documents.text_bytes(i.text) for i in items)
    )
    to_index: list[str] = []
    for item in items:
        document, changed = await documents.upsert_document(session, collection, item)
        await session.flush()
        if changed:
            to_index.append(str(document.id))
    job = None
    if to_index:
        job = await service.enqueue(
            session,
            principal.account_id,
            service.INDEX_JOB,
            {"document_ids": to_index},
            len(to_index),
        )
    await session.flush()  # the request commits (and wakes the runner for the job) when it ends
    return _report(len(items), len(items) - len(to_index), rejected_count, rejected, job)


def _read(
    spool: Any, settings: Any
) -> tuple[list[documents.DocumentInput], int, list[dict[str, Any]]]:
    """(accepted documents, rejected count, first rejections) of the spooled JSONL."""
    accepted: dict[str, documents.DocumentInput] = {}
    anonymous: list[documents.DocumentInput] = []
    rejected: list[dict[str, Any]] = []
    rejected_count = lines = number = 0
    max_line = settings.rag_import_max_line_bytes
    while raw := spool.readline(max_line + 1):
        number += 1
        reason: str | None = None
        if len(raw) > max_line and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of the long line
                raw = spool.readline(SPOOL_MEMORY_BYTES)
            reason = f"line is longer than {max_line} bytes"
        elif not raw.strip():
            continue
        lines += 1
        if lines > settings.rag_import_max_lines:
            raise ImportTooLarge(
                f"The import has more than {settings.rag_import_max_lines} lines; nothing was "
                "written. Split it into smaller files."
            )
        item = None if reason is not None else _item(raw)
        if isinstance(item, str) or item is None:
            rejected_count += 1
            if len(rejected) < MAX_REPORTED_REJECTIONS:
                rejected.append({"line": number, "reason": reason or item})
        elif item.external_id is None:
            anonymous.append(item)
        else:
            accepted[item.external_id] = item  # a later line with the same id wins
    return [*accepted.values(), *anonymous], rejected_count, rejected


def _item(raw: bytes) -> documents.DocumentInput | str:
    """The document of one line, or why it was rejected."""
    data, reason = _parse_line(raw)
    if data is None:
        return reason or "invalid line"
    try:
        return documents.input_of(data)
    except BadRequest as exc:
        return exc.message


def _report(
    accepted: int,
    unchanged: int,
    rejected_count: int,
    rejected: list[dict[str, Any]],
    job: Any,
) -> dict[str, Any]:
    return {
        "object": "collection.import",
        "accepted": accepted,
        "unchanged": unchanged,
        "rejected_count": rejected_count,
        "rejected": rejected,
        "job": service.job_read(job).model_dump(mode="json") if job is not None else None,
    }


async def export_lines(services: ImportServices, collection_id: uuid.UUID) -> AsyncIterator[bytes]:
    """Every document as one JSONL line that `import` accepts back (same ids)."""
    after: tuple[Any, uuid.UUID] | None = None
    while True:
        async with services.database.sessions() as session:
            statement = select(Document).where(Document.collection_id == collection_id)
            if after is not None:
                statement = statement.where(
                    (Document.created_at > after[0])
                    | ((Document.created_at == after[0]) & (Document.id > after[1]))
                )
            page = (
                await session.scalars(
                    statement.order_by(Document.created_at, Document.id).limit(EXPORT_PAGE)
                )
            ).all()
        for document in page:
            line = {
                "id": document.external_id or str(document.id),
                "text": document.text,
                "title": document.title,
                "content_type": document.content_type,
                "metadata": document.metadata_,
            }
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode()
        if len(page) < EXPORT_PAGE:
            return
        after = (page[-1].created_at, page[-1].id)
