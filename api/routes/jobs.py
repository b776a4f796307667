"""Jobs: submit, read, list, cancel, follow (SSE) and download outputs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import FileResponse, StreamingResponse

from api.deps import DbDep, ListenerDep, ReadDep, RegistryDep, SettingsDep, SubmitDep
from api.errors import ApiError, DatabaseUnavailable, ErrorBody, not_found
from api.schemas import NAME_PATTERN, JobCreate, JobList, JobPublic
from api.storage import Storage, extension
from core.registry import ModelSpec, Registry
from core.types import InputError, JobStatus
from db import catalog, queue

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

KEEPALIVE_S = 15.0
SSE_RETRY_MS = 2000
_TERMINAL = {s.value for s in JobStatus if s.terminal}

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody},
    403: {"model": ErrorBody},
    404: {"model": ErrorBody},
    422: {"model": ErrorBody},
    503: {"model": ErrorBody},
}

JobIdPath = Annotated[str, Path(description="the job's id (a UUID)", max_length=64)]


def parse_id(raw: str, what: str = "job") -> uuid.UUID:
    """A path id; anything that is not a UUID is simply not found (never a 500)."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise not_found(what) from None


# -- submit --------------------------------------------------------------------------------------------


def _candidates(registry: Registry, body: JobCreate) -> tuple[str | None, str, list[ModelSpec]]:
    """(model to store, feature, models that may run it)."""
    if body.model is not None:
        spec = registry.get(body.model)
        if spec is None:
            raise ApiError(422, "unknown_model", f"no model named {body.model!r}", details={"path": "model"})
        if body.feature is not None and body.feature != spec.feature:
            raise ApiError(
                422,
                "unknown_model",
                f"model {spec.id!r} serves feature {spec.feature!r}, not {body.feature!r}",
                details={"path": "feature"},
            )
        return spec.id, spec.feature, [spec]
    assert body.feature is not None
    specs = registry.by_feature(body.feature)
    if not specs:
        raise ApiError(
            422, "unknown_model", f"no model serves feature {body.feature!r}", details={"path": "feature"}
        )
    return (specs[0].id if len(specs) == 1 else None), body.feature, specs


def _validate(registry: Registry, specs: Sequence[ModelSpec], inputs: Mapping[str, Any]) -> list[ModelSpec]:
    """The candidate models whose input schema accepts ``inputs``; 422 with a path when none does."""
    passing: list[ModelSpec] = []
    first: InputError | None = None
    for spec in specs:
        try:
            registry.validate_inputs(spec.id, inputs)
        except InputError as exc:
            first = first or exc
        else:
            passing.append(spec)
    if not passing:
        assert first is not None
        raise ApiError(422, "invalid_input", str(first), details={"path": first.path})
    return passing


async def _resolve_files(
    db: DbDep, specs: Sequence[ModelSpec], inputs: dict[str, Any], tenant: str
) -> dict[str, Any]:
    """Check that every file input names one of the caller's own uploads; returns canonical inputs."""
    wanted: dict[str, tuple[uuid.UUID, set[str]]] = {}
    for spec in specs:
        for name, exts in spec.file_inputs.items():
            if name not in inputs:
                continue
            value = inputs[name]
            raw = value.get("file") if isinstance(value, dict) else None
            try:
                file_id = uuid.UUID(str(raw)) if isinstance(raw, str) else None
            except ValueError:
                file_id = None
            if file_id is None:
                raise ApiError(
                    422,
                    "unknown_file",
                    f'inputs.{name} must be {{"file": "<id>"}} naming one of your uploads',
                    details={"path": f"inputs.{name}"},
                )
            prev = wanted.get(name)
            allowed = set(exts) if prev is None else prev[1] | set(exts)
            if not exts or (prev is not None and not prev[1]):
                allowed = set()  # some candidate accepts any file type
            wanted[name] = (file_id, allowed)
    if not wanted:
        return inputs
    rows = await queue.input_files(db, [fid for fid, _ in wanted.values()], tenant=tenant)
    found = {r["id"]: r for r in rows}
    out = dict(inputs)
    for name, (file_id, allowed) in wanted.items():
        row = found.get(file_id)
        if row is None:
            raise ApiError(
                422, "unknown_file", f"inputs.{name}: no upload {file_id}", details={"path": f"inputs.{name}"}
            )
        if allowed and extension(row["name"]) not in allowed:
            raise ApiError(
                422,
                "invalid_input",
                f"inputs.{name}: {row['name']!r} is not one of {sorted(allowed)}",
                details={"path": f"inputs.{name}"},
            )
        out[name] = {"file": str(file_id)}
    return out


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    summary="Submit a job",
    responses={
        200: {"model": JobPublic, "description": "an earlier job with this Idempotency-Key"},
        400: {"model": ErrorBody, "description": "the body is not valid JSON"},
        413: {"model": ErrorBody, "description": "the body is over the size limit"},
        **_ERRORS,
    },
)
async def submit_job(
    body: JobCreate,
    response: Response,
    db: DbDep,
    registry: RegistryDep,
    principal: SubmitDep,
    idempotency_key: Annotated[
        str | None, Header(max_length=200, description="repeat a submission safely: same key, same job")
    ] = None,
) -> JobPublic:
    if idempotency_key is not None and (not idempotency_key or not idempotency_key.isprintable()):
        raise ApiError(
            422, "invalid_request", "Idempotency-Key must be printable", details={"path": "Idempotency-Key"}
        )
    model, feature, specs = _candidates(registry, body)
    passing = _validate(registry, specs, body.inputs)
    inputs = await _resolve_files(db, passing, body.inputs, principal.tenant)
    max_attempts = body.max_attempts or max(s.max_attempts for s in passing)
    row, created = await queue.enqueue(
        db,
        queue.NewJob(
            feature=feature,
            model=model,
            inputs=inputs,
            tenant=principal.tenant,
            pool=body.pool,
            priority=body.priority,
            max_attempts=max_attempts,
            timeout_s=body.timeout_s,
            metadata=body.metadata,
            idempotency_key=idempotency_key,
        ),
    )
    job = JobPublic.from_row(row)
    response.status_code = 202 if created else 200
    response.headers["Location"] = job.url
    return job


# -- read ----------------------------------------------------------------------------------------------


@router.get("", response_model=JobList, summary="List jobs, newest first", responses=_ERRORS)
async def list_jobs(
    db: DbDep,
    principal: ReadDep,
    status: JobStatus | None = None,
    model: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=100)] = None,
    feature: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=300, description="next_cursor of the page before")] = None,
) -> JobList:
    try:
        page = await catalog.list_jobs(
            db,
            tenant=principal.tenant_filter,
            status=status.value if status else None,
            model=model,
            feature=feature,
            limit=limit,
            cursor=cursor,
        )
    except catalog.CursorError:
        raise ApiError(422, "invalid_cursor", "invalid cursor", details={"path": "cursor"}) from None
    return JobList(items=[JobPublic.from_row(r) for r in page.items], next_cursor=page.next_cursor)


@router.get("/{job_id}", response_model=JobPublic, summary="A job", responses=_ERRORS)
async def get_job(job_id: JobIdPath, db: DbDep, principal: ReadDep) -> JobPublic:
    row = await catalog.get_job_detail(db, parse_id(job_id), tenant=principal.tenant_filter)
    if row is None:
        raise not_found("job")
    return JobPublic.from_row(row)


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    summary="Cancel a job (queued: at once; running: its scheduler stops it)",
    responses={409: {"model": ErrorBody}, **_ERRORS},
)
async def cancel_job(job_id: JobIdPath, db: DbDep, principal: SubmitDep) -> JobPublic:
    row, changed = await queue.cancel(db, parse_id(job_id), tenant=principal.tenant_filter)
    if row is None:
        raise not_found("job")
    if not changed:
        raise ApiError(
            409,
            "already_finished",
            f"the job already finished ({row['status']})",
            details={"status": row["status"]},
        )
    return JobPublic.from_row(row)


@router.get(
    "/{job_id}/outputs/{name:path}",
    summary="Download an output file",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        410: {"model": ErrorBody, "description": "the content is no longer stored"},
        **_ERRORS,
    },
)
async def get_output(
    job_id: JobIdPath,
    name: Annotated[str, Path(max_length=1000)],
    db: DbDep,
    settings: SettingsDep,
    principal: ReadDep,
) -> FileResponse:
    if "\x00" in name:
        raise not_found("output")
    row = await catalog.get_output(db, parse_id(job_id), name, tenant=principal.tenant_filter)
    if row is None:
        raise not_found("output")
    path = Storage(settings.files_dir, max_upload_bytes=settings.max_upload_bytes).resolve(row["path"])
    if path is None:
        raise ApiError(410, "gone", f"output {name!r} is no longer stored")
    return FileResponse(path, media_type=row["content_type"], filename=row["name"].rsplit("/", 1)[-1])


# -- events (SSE) --------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _frame(event: str, data: Mapping[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=_json_default, separators=(',', ':'))}\n\n"


def _state_data(row: Mapping[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": row["id"],
        "status": row["status"],
        "progress": row["progress"],
        "progress_message": row["progress_message"],
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "model": row["model"],
        "cancel_requested": row["cancel_requested_at"] is not None,
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
    }
    if row["status"] in _TERMINAL:
        data["result"] = row["result"]
        data["error"] = row["error"]
    return data


async def _follow(
    db: DbDep,
    sub: Any,
    job_id: uuid.UUID,
    tenant: str | None,
    first: Mapping[str, Any],
    poll_s: float,
) -> AsyncIterator[str]:
    """The event stream of one job: its state now, then one event per change, until it is terminal.

    Status changes come from the job's audit trail (every transition, in order, even when several
    happen between two reads); progress from the row. A NOTIFY wakes the stream at once; without one it
    re-reads every ``poll_s`` anyway.
    """
    try:
        yield f"retry: {SSE_RETRY_MS}\n" + _frame("status", _state_data(first))
        status = first["status"]
        if status in _TERMINAL:
            return
        last_event = first["last_event_id"] or 0
        progress = (first["progress"], first["progress_message"])
        last_sent = time.monotonic()
        while True:
            idle = time.monotonic() - last_sent
            await sub.wait(max(0.01, min(poll_s, KEEPALIVE_S - idle)))
            frames: list[str] = []
            try:
                row = await catalog.job_state(db, job_id, tenant=tenant, after_event=last_event)
            except DatabaseUnavailable:
                row = {}  # keep the stream open; the next read may succeed
            if row is None:
                return  # the job is gone (retention)
            if row:
                transitions = row["transitions"] or []
                for i, t in enumerate(transitions):
                    last_event = max(last_event, int(t["id"]))
                    status = t["status"]
                    if i == len(transitions) - 1 and status == row["status"]:
                        frames.append(_frame("status", _state_data(row)))
                    else:
                        frames.append(
                            _frame(
                                "status",
                                {
                                    "id": job_id,
                                    "status": status,
                                    "progress": 0.0 if status in ("queued", "leased") else progress[0],
                                    "attempts": t["attempt"],
                                },
                            )
                        )
                now_progress = (row["progress"], row["progress_message"])
                if not transitions and now_progress != progress and row["status"] == status:
                    frames.append(_frame("progress", _state_data(row)))
                progress = now_progress
            if frames:
                yield "".join(frames)
                last_sent = time.monotonic()
            if status in _TERMINAL:
                return
            if time.monotonic() - last_sent >= KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
    finally:
        sub.close()


@router.get(
    "/{job_id}/events",
    summary="Follow a job (Server-Sent Events): its state now, then every change until it finishes",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS},
)
async def job_events(
    job_id: JobIdPath,
    db: DbDep,
    settings: SettingsDep,
    listener: ListenerDep,
    principal: ReadDep,
) -> StreamingResponse:
    jid = parse_id(job_id)
    tenant = principal.tenant_filter
    sub = listener.subscribe(jid)  # before the first read: no change can slip between the two
    try:
        first = await catalog.job_state(db, jid, tenant=tenant, after_event=None)
    except BaseException:
        sub.close()
        raise
    if first is None:
        sub.close()
        raise not_found("job")
    return StreamingResponse(
        _follow(db, sub, jid, tenant, first, settings.sse_poll_interval_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
