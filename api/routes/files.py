"""Files: streamed uploads (size-limited while they arrive), metadata, downloads."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import FileResponse

from api.deps import DbDep, SettingsDep, SubmitDep, TenantDep
from api.errors import ApiError, DatabaseUnavailable, ErrorBody, not_found
from api.routes.jobs import parse_id
from api.schemas import FilePublic
from api.storage import FORM_FIELD, Storage
from db import catalog

log = logging.getLogger("vramq.api.files")

router = APIRouter(prefix="/api/v1/files", tags=["files"])

UPLOAD_PATH = "/api/v1/files"

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody},
    403: {"model": ErrorBody},
    404: {"model": ErrorBody},
    503: {"model": ErrorBody},
}

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {FORM_FIELD: {"type": "string", "format": "binary"}},
                "required": [FORM_FIELD],
            }
        }
    },
}

FileIdPath = Annotated[str, Path(description="the file's id (a UUID)", max_length=64)]


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, "bad_request", "invalid Content-Length") from None


@router.post(
    "",
    status_code=201,
    response_model=FilePublic,
    summary='Upload a file (multipart field \'file\'); refer to it in job inputs as {"file": "<id>"}',
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses={
        400: {"model": ErrorBody},
        413: {"model": ErrorBody},
        415: {"model": ErrorBody},
        422: {"model": ErrorBody},
        **_ERRORS,
    },
)
async def upload_file(request: Request, db: DbDep, settings: SettingsDep, principal: SubmitDep) -> FilePublic:
    storage = Storage(settings.files_dir, max_upload_bytes=settings.max_upload_bytes)
    if not db.connected:  # refuse before reading a byte of a large body
        raise DatabaseUnavailable()
    stored = await storage.receive(
        request.stream(),
        content_type=request.headers.get("content-type"),
        content_length=_content_length(request),
        tenant=principal.tenant,
    )
    try:
        row = await catalog.insert_file(
            db,
            file_id=stored.id,
            tenant=principal.tenant,
            name=stored.name,
            size=stored.size,
            sha256=stored.sha256,
            content_type=stored.content_type,
            path=str(stored.path),
        )
    except BaseException:
        await storage.remove(stored.path)
        raise
    return FilePublic.from_row(row)


@router.get("/{file_id}", response_model=FilePublic, summary="A file's metadata", responses=_ERRORS)
async def get_file(file_id: FileIdPath, db: DbDep, principal: TenantDep) -> FilePublic:
    row = await catalog.get_file(db, parse_id(file_id, "file"), tenant=principal.tenant_filter)
    if row is None:
        raise not_found("file")
    return FilePublic.from_row(row)


@router.get(
    "/{file_id}/content",
    summary="Download a file",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        410: {"model": ErrorBody, "description": "the content is no longer stored"},
        **_ERRORS,
    },
)
async def get_file_content(
    file_id: FileIdPath, db: DbDep, settings: SettingsDep, principal: TenantDep
) -> FileResponse:
    row = await catalog.get_file(db, parse_id(file_id, "file"), tenant=principal.tenant_filter)
    if row is None:
        raise not_found("file")
    path = Storage(settings.files_dir, max_upload_bytes=settings.max_upload_bytes).resolve(row["path"])
    if path is None:
        log.warning("file %s has no stored content at %s", row["id"], row["path"])
        raise ApiError(410, "gone", "the file's content is no longer stored")
    return FileResponse(path, media_type=row["content_type"], filename=row["name"].rsplit("/", 1)[-1])
