"""`/v1/collections`: collections, documents, search, JSONL import/export and jobs. Private keys
only: a public key (in a browser) never manages or reads an account's collections."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from aivax.auth.dependencies import PrivateKey, Services
from aivax.db import SessionDep
from aivax.errors import BadRequest
from aivax.kit.jsonlimits import NulCharacter, check_nul, loads_limited
from aivax.kit.pagination import ListPage, PageLimit, page_of, whole
from aivax.models import Document
from aivax.openapi import EXPORT_RESPONSES
from aivax.rag import chunking, documents, importer, retrieval, service
from aivax.rag.schemas import (
    CollectionCreate,
    CollectionRead,
    CollectionUpdate,
    DocumentCreate,
    DocumentRead,
    DocumentUpdate,
    JobRead,
    MultiSearchRequest,
    SearchRequest,
    SearchResponse,
)
from aivax.services import AppServices

router = APIRouter(prefix="/v1/collections", tags=["collections"])
jobs_router = APIRouter(prefix="/v1/jobs", tags=["collections"])

WAIT_SECONDS_MAX = 120.0
Wait = Annotated[
    bool,
    Query(description="Wait (up to 120 s) until the document is indexed before answering."),
]


async def _wait_for(services: AppServices, document: Document, wait: bool) -> None:
    if wait:
        await documents.wait_until_indexed(services, document.id, WAIT_SECONDS_MAX)


async def _fresh(services: AppServices, document: Document) -> DocumentRead:
    async with services.database.sessions() as session:
        current = await session.get(Document, document.id)
        return documents.document_read(current or document)


# --- collections ---------------------------------------------------------------------------


@router.post("", response_model=CollectionRead, status_code=201)
async def create_collection(
    data: CollectionCreate, auth: PrivateKey, session: SessionDep, services: Services
) -> CollectionRead:
    collection = await service.create_collection(services, session, auth.principal, data)
    return await service.collection_read(session, collection)


@router.get("", response_model=ListPage[CollectionRead])
async def list_collections(auth: PrivateKey, session: SessionDep) -> ListPage[CollectionRead]:
    data = await service.list_collections(session, auth.account.id)
    return whole(data, [str(c.id) for c in data])


@router.post("/search", response_model=SearchResponse)
async def search_many(
    data: MultiSearchRequest,
    auth: PrivateKey,
    session: SessionDep,
    services: Services,
    request: Request,
) -> SearchResponse:
    collections = await retrieval.owned_collections(session, auth.account.id, data.collection_ids)
    return await retrieval.run(
        services, session, auth.principal, collections, data, request_id=request.state.request_id
    )


@router.get("/{collection_id}", response_model=CollectionRead)
async def get_collection(
    collection_id: str, auth: PrivateKey, session: SessionDep
) -> CollectionRead:
    collection = await service.get_collection(session, auth.account.id, collection_id)
    return await service.collection_read(session, collection)


@router.patch("/{collection_id}", response_model=CollectionRead)
async def update_collection(
    collection_id: str,
    data: CollectionUpdate,
    auth: PrivateKey,
    session: SessionDep,
    services: Services,
) -> CollectionRead:
    collection = await service.get_collection(session, auth.account.id, collection_id)
    await service.update_collection(services, session, auth.principal, collection, data)
    return await service.collection_read(session, collection)


@router.delete("/{collection_id}", status_code=204)
async def delete_collection(
    collection_id: str, auth: PrivateKey, session: SessionDep, services: Services
) -> Response:
    collection = await service.get_collection(session, auth.account.id, collection_id)
    await service.delete_collection(session, collection)
    services.vectors.forget(collection.id)
    return Response(status_code=204)


@router.post("/{collection_id}/search", response_model=SearchResponse)
async def search_one(
    collection_id: str,
    data: SearchRequest,
    auth: PrivateKey,
    session: SessionDep,
    services: Services,
    request: Request,
) -> SearchResponse:
    collection = await service.get_collection(session, auth.account.id, collection_id)
    return await retrieval.run(
        services, session, auth.principal, [collection], data, request_id=request.state.request_id
    )


# --- documents -----------------------------------------------------------------------------


@router.post("/{collection_id}/documents", response_model=DocumentRead, status_code=201)
async def create_document(
    collection_id: str,
    data: DocumentCreate,
    auth: PrivateKey,
    session: SessionDep,
    services: Services,
    wait: Wait = False,
) -> DocumentRead:
    collection = await service.get_collection(session, auth.account.id, collection_id)
    document, _ = await documents.create_document(
        services, session, auth.principal, collection, documents.input_of(data)
    )
    await session.commit()
    await _wait_for(services, document, wait)
    return await _fresh(services, document)


UPLOAD_TYPES = {
    "application/pdf": "pdf",
    "text/html": "html",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "text/plain": "text",
}
UPLOAD_SUFFIXES = {
    ".pdf": "pdf",
    ".html": "html",
    ".htm": "html",
    ".md": "markdown",
    ".txt": "text",
}


def _upload_kind(file: UploadFile) -> str:
    name = (file.filename or "").lower()
    for suffix, kind in UPLOAD_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    by_type = UPLOAD_TYPES.get((file.content_type or "").split(";")[0].strip())
    if by_type is None:
        raise BadRequest(
            "Upload plain text (.txt), Markdown (.md), HTML (.html) or PDF (.pdf).",
            param="file",
            code="unsupported_file_type",
        )
    return by_type


def _check_upload(external_id: str | None, title: str, meta: dict[str, Any], text: str) -> None:
    """The form fields and the extracted text meet the rules of a JSON document body."""
    check_nul({"id": external_id, "title": title, "metadata": meta})
    if "\x00" in text:
        raise NulCharacter(
            "The file's text contains a NUL character, which AIVAX does not store; remove it "
            "(a binary file sent as text has them).",
            param="file",
        )
    try:
        DocumentCreate(text=text[:1] or " ", metadata=meta)  # the metadata's size
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BadRequest(f"Invalid 'metadata': {first['msg']}.", param="metadata") from None


@router.post("/{collection_id}/documents/upload", response_model=DocumentRead, status_code=201)
async def upload_document(
    collection_id: str,
    auth: PrivateKey,
    session: SessionDep,
    services: Services,
    file: Annotated[UploadFile, File(description="A .txt, .md, .html or .pdf file.")],
    id: Annotated[str | None, Form(max_length=256)] = None,
    title: Annotated[str, Form(max_length=500)] = "",
    metadata: Annotated[str, Form(description="JSON object")] = "{}",
    wait: Wait = False,
) -> DocumentRead:
    collection = await service.get_collection(session, auth.account.id, collection_id)
    kind = _upload_kind(file)
    raw = await file.read()
    try:
        meta = loads_limited(metadata, param="metadata")
    except ValueError as exc:
        raise BadRequest(f"'metadata' is not JSON: {exc}", param="metadata") from exc
    if not isinstance(meta, dict):
        raise BadRequest("'metadata' must be a JSON object.", param="metadata")
    try:
        extracted_title, text = chunking.extract(kind, raw)
    except chunking.ExtractionError as exc:
        raise BadRequest(str(exc), param="file", code="unreadable_file") from exc
    except UnicodeDecodeError as exc:
        raise BadRequest(
            "The file is not UTF-8 text.", param="file", code="unreadable_file"
        ) from exc
    if not text.strip():
        raise BadRequest("The file has no text.", param="file")
    _check_upload(id, title, meta, text)
    item = documents.DocumentInput(
        text,
        "text" if kind == "text" else "markdown",
        title or extracted_title or (file.filename or ""),
        id,
        meta,
    )
    document, _ = await documents.create_document(
        services, session, auth.principal, collection, item
    )
    await session.commit()
    await _wait_for(services, document, wait)
    return await _fresh(services, document)


@router.get("/{collection_id}/documents", response_model=ListPage[DocumentRead])
async def list_documents(
    collection_id: str,
    auth: PrivateKey,
    session: SessionDep,
    limit: PageLimit = 20,
    after: Annotated[str | None, Query(description="A document id from the previous page.")] = None,
    status: Literal["queued", "indexing", "ready", "failed"] | None = None,
) -> ListPage[DocumentRead]:
    collection = await service.get_collection(session, auth.account.id, collection_id)
    rows = await documents.list_documents(
        session, collection, status=status, after=after, limit=limit
    )
    data = [documents.document_read(d) for d in rows]
    return page_of(data, [str(d.id) for d in data], limit=limit)


@router.get("/{collection_id}/documents/{document_id}", response_model=DocumentRead)
async def get_document(
    collection_id: str,
    document_id: str,
    auth: PrivateKey,
    session: SessionDep,
    include_text: Annotated[bool, Query(description="Include the stored text.")] = False,
) -> DocumentRead:
    collection = await service.get_collection(session, auth.account.id, collection_id)
    document = await documents.get_document(session, collection, document_id)
    chunks = await documents.document_chunks(session, document)
    return documents.document_read(document, chunks, with_text=include_text)


@router.patch("/{collection_id}/documents/{document_id}", response_model=DocumentRead)
async def update_document(
    collection_id: str,
    document_id: str,
    data: DocumentUpdate,
    auth: PrivateKey,
    session: SessionDep,
    services: Services,
    wait: Wait = False,
) -> DocumentRead:
    collection = await service.get_collection(session, auth.account.id, collection_id)
    document = await documents.get_document(session, collection, document_id)
    await documents.update_document(services, session, auth.principal, collection, document, data)
    await session.commit()
    await _wait_for(services, document, wait)
    return await _fresh(services, document)


@router.delete("/{collection_id}/documents/{document_id}", status_code=204)
async def delete_document(
    collection_id: str, document_id: str, auth: PrivateKey, session: SessionDep
) -> Response:
    collection = await service.get_collection(session, auth.account.id, collection_id)
    document = await documents.get_document(session, collection, document_id)
    await documents.delete_document(session, collection, document)
    return Response(status_code=204)


# --- JSONL import / export -----------------------------------------------------------------


@router.post("/{collection_id}/import", status_code=202)
async def import_jsonl(
    collection_id: str,
    auth: PrivateKey,
    session: SessionDep,
    services: Services,
    request: Request,
) -> dict[str, Any]:
    collection = await service.get_collection(session, auth.account.id, collection_id)
    report = await importer.import_jsonl(services, session, auth.principal, collection, request)
    return report


@router.get("/{collection_id}/export", responses=EXPORT_RESPONSES)
async def export_jsonl(
    collection_id: str, auth: PrivateKey, session: SessionDep, services: Services
) -> StreamingResponse:
    collection = await service.get_collection(session, auth.account.id, collection_id)

    async def lines() -> AsyncIterator[bytes]:
        async for line in importer.export_lines(services, collection.id):
            yield line

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"content-disposition": f'attachment; filename="{collection.id}.jsonl"'},
    )


# --- jobs ----------------------------------------------------------------------------------


@jobs_router.get("/{job_id}", response_model=JobRead)
async def get_job(job_id: str, auth: PrivateKey, session: SessionDep) -> JobRead:
    return service.job_read(await service.get_job(session, auth.account.id, job_id))
