"""Request and response models of the v1 API (requests and responses split, as FastAPI suggests)."""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from core.types import JobStatus

MAX_METADATA_BYTES = 16 * 1024
MAX_JSON_DEPTH = 32
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.\-]{0,99}$"
_NAME_RE = re.compile(NAME_PATTERN)


def _check_json(value: Any, depth: int = 0) -> None:
    """Reject what PostgreSQL's jsonb cannot store (NaN, NUL, lone surrogates) and absurd nesting."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("strings must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("strings must be valid Unicode (no lone surrogates)") from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("numbers must be finite")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_json(k, depth + 1)
            _check_json(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json(v, depth + 1)


def _json_safe(value: dict[str, Any]) -> dict[str, Any]:
    _check_json(value)
    return value


def _metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    _check_json(value)
    if len(json.dumps(value, separators=(",", ":"))) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata must serialise to at most {MAX_METADATA_BYTES} bytes")
    return value


def _printable(value: str | None) -> str | None:
    if value is not None and not value.isprintable():
        raise ValueError("must be printable characters")
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_json_safe)]
ModelName = Annotated[str, Field(pattern=NAME_PATTERN, max_length=100)]


class JobCreate(BaseModel):
    """A job to run: a model (or a feature, when any of its models will do) and its inputs."""

    model_config = ConfigDict(extra="forbid")

    model: ModelName | None = Field(default=None, description="a model id from GET /api/v1/models")
    feature: ModelName | None = Field(default=None, description="any model of this feature may run it")
    inputs: JsonObject = Field(default_factory=dict, description="checked against the model's schema")
    priority: int = Field(default=0, ge=-100, le=100, description="higher runs first")
    max_attempts: int | None = Field(default=None, ge=1, le=20, description="default: the model's")
    timeout_s: float | None = Field(
        default=None, gt=0, le=7 * 86400, allow_inf_nan=False, description="default: the model's"
    )
    pool: Annotated[str | None, AfterValidator(_printable)] = Field(
        default=None, min_length=1, max_length=200, description="run only on this GPU pool"
    )
    metadata: Annotated[dict[str, Any] | None, AfterValidator(_metadata)] = Field(
        default=None, description="kept with the job, returned as given (at most 16 KB)"
    )

    @model_validator(mode="after")
    def _model_or_feature(self) -> JobCreate:
        if self.model is None and self.feature is None:
            raise ValueError("give a model or a feature")
        return self


class OutputPublic(BaseModel):
    name: str
    size: int
    sha256: str
    content_type: str
    url: str


class JobPublic(BaseModel):
    id: uuid.UUID
    tenant: str
    status: JobStatus
    model: str | None
    feature: str
    pool: str | None
    priority: int
    inputs: dict[str, Any]
    progress: float
    progress_message: str | None
    attempts: int
    max_attempts: int
    timeout_s: float | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None
    gpu: str | None
    worker: str | None
    result: Any | None
    error: dict[str, Any] | None
    metadata: dict[str, Any] | None
    queue_position: int | None = Field(default=None, description="1 = next in its lane; queued jobs only")
    outputs: list[OutputPublic] = Field(default_factory=list)
    url: str

    @classmethod
    def from_row(cls, row: Any) -> JobPublic:
        job_id = row["id"]
        outputs = [
            OutputPublic(
                name=o["name"],
                size=o["size"],
                sha256=o["sha256"],
                content_type=o["content_type"],
                url=f"/api/v1/jobs/{job_id}/outputs/{quote(o['name'], safe='')}",
            )
            for o in row.get("outputs") or []
        ]
        return cls(
            id=job_id,
            tenant=row["tenant"],
            status=JobStatus(row["status"]),
            model=row["model"],
            feature=row["feature"],
            pool=row["pool"],
            priority=row["priority"],
            inputs=row["inputs"] or {},
            progress=row["progress"],
            progress_message=row["progress_message"],
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            timeout_s=row["timeout_s"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            cancel_requested_at=row["cancel_requested_at"],
            gpu=row["gpu"],
            worker=row["worker"],
            result=row["result"],
            error=row["error"],
            metadata=row["metadata"],
            queue_position=row.get("queue_position"),
            outputs=outputs,
            url=f"/api/v1/jobs/{job_id}",
        )


class JobList(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class FilePublic(BaseModel):
    id: uuid.UUID
    name: str
    size: int
    sha256: str
    content_type: str
    kind: Literal["input", "output"]
    job_id: uuid.UUID | None
    created_at: datetime
    url: str

    @classmethod
    def from_row(cls, row: Any) -> FilePublic:
        return cls(
            id=row["id"],
            name=row["name"],
            size=row["size"],
            sha256=row["sha256"],
            content_type=row["content_type"],
            kind=row["kind"],
            job_id=row["job_id"],
            created_at=row["created_at"],
            url=f"/api/v1/files/{row['id']}/content",
        )


class Instance(BaseModel):
    """A warm worker of a model, as its pool's leader last reported it."""

    pool: str
    worker: str | None = None
    gpu: str | None = None
    state: str | None = None
    vram_mb: float | None = None
    jobs_done: int | None = None


class ModelPublic(BaseModel):
    id: str
    feature: str
    description: str
    vram_mb: int
    max_workers: int
    timeout_s: float
    idle_evict_s: float
    max_attempts: int
    retry_on: list[str]
    inputs: dict[str, Any]
    file_inputs: list[str]
    queued: int
    instances: list[Instance]


class ModelList(BaseModel):
    items: list[ModelPublic]


class Leader(BaseModel):
    pool: str
    term: int
    host: str
    pid: int
    since: datetime
    heartbeat_at: datetime
    heartbeat_age_s: float
    stale: bool
    reservation: Any | None = None


class SystemStatus(BaseModel):
    leaders: list[Leader]
    gpus: list[dict[str, Any]]
    workers: list[dict[str, Any]]
    queue: dict[str, int] = Field(description="queued jobs per model ('<feature>.*' for feature-only jobs)")


class Health(BaseModel):
    status: str
    revision: str | None = None
    listener: bool | None = None


def valid_name(value: str) -> bool:
    return bool(_NAME_RE.match(value))
