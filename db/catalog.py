"""The reads and writes the HTTP API needs beyond the queue protocol (``db/queue.py``).

Each statement is a named constant with a one-line purpose; the functions below run them over anything
with asyncpg's ``fetch``/``fetchrow``/``fetchval``/``execute`` (a pool, a connection). ``$n`` parameters
named "tenant" take NULL for "any tenant" (an admin key). Nothing here trusts a client-supplied path:
file rows are written by the API (uploads) or by a fenced scheduler (outputs), and downloads go through
them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from db.queue import Executor, Record

SCOPES = frozenset({"submit", "read", "admin"})
SECRET_PREFIX = "vq_"  # noqa: S105 - a marker that makes leaked keys recognisable, not a secret

# --------------------------------------------------------------------------------------------------
# Jobs.
# --------------------------------------------------------------------------------------------------

# Output files of one job as a jsonb array (name order); shared by the job reads below.
_OUTPUTS = """coalesce((
    SELECT jsonb_agg(jsonb_build_object('name', f.name, 'size', f.size, 'sha256', f.sha256,
                                        'content_type', f.content_type) ORDER BY f.name)
    FROM files f WHERE f.job_id = j.id AND f.kind = 'output'), '[]'::jsonb)"""

# How many queued jobs the claim order (priority desc, then age) puts ahead of job j in its lane: the
# same model, or feature-only jobs any model of its feature may take. NULL unless j is queued.
_QUEUE_POSITION = """CASE WHEN j.status = 'queued' THEN 1 + (
    SELECT count(*) FROM jobs o
    WHERE o.status = 'queued' AND o.id <> j.id
      AND (o.model = j.model OR (o.model IS NULL AND o.feature = j.feature)
           OR (j.model IS NULL AND o.feature = j.feature))
      AND (o.priority > j.priority OR (o.priority = j.priority AND o.created_at < j.created_at))
)::int END"""

# get_job_detail: one job with its outputs and queue position, in one round trip (the GET hot path).
GET_JOB_DETAIL = f"""
SELECT j.*, {_QUEUE_POSITION} AS queue_position, {_OUTPUTS} AS outputs
FROM jobs j
WHERE j.id = $1 AND ($2::text IS NULL OR j.tenant = $2)
"""

# list_jobs: newest first, keyset-paginated on (created_at, id) so pages stay stable while jobs arrive;
# served by jobs_tenant_created_idx. One row more than the page tells whether another page follows.
LIST_JOBS = f"""
SELECT j.*, NULL::int AS queue_position, {_OUTPUTS} AS outputs
FROM jobs j
WHERE ($1::text IS NULL OR j.tenant = $1)
  AND ($2::text IS NULL OR j.status = $2)
  AND ($3::text IS NULL OR j.model = $3)
  AND ($4::text IS NULL OR j.feature = $4)
  AND ($5::timestamptz IS NULL OR (j.created_at, j.id) < ($5::timestamptz, $6::uuid))
ORDER BY j.created_at DESC, j.id DESC
LIMIT $7
"""

# job_state: what an event stream needs of a job, plus the status transitions (from the audit trail)
# after event $3, so every transition is reported in order even when several land between two reads.
# $3 NULL returns no transitions, only the id of the newest event (the stream's starting point).
JOB_STATE = """
SELECT j.id, j.status, j.model, j.progress, j.progress_message, j.attempts, j.max_attempts, j.result,
       j.error, j.cancel_requested_at, j.started_at, j.finished_at,
       (SELECT max(e.id) FROM job_events e WHERE e.job_id = j.id) AS last_event_id,
       coalesce((SELECT jsonb_agg(jsonb_build_object('id', e.id, 'status', e.to_status,
                                                     'attempt', e.attempt) ORDER BY e.id)
                 FROM job_events e WHERE e.job_id = j.id AND e.id > $3), '[]'::jsonb) AS transitions
FROM jobs j
WHERE j.id = $1 AND ($2::text IS NULL OR j.tenant = $2)
"""

# get_output: one output file of a job the caller may see.
GET_OUTPUT = """
SELECT f.id, f.tenant, f.job_id, f.name, f.size, f.sha256, f.content_type, f.path, f.created_at
FROM files f JOIN jobs j ON j.id = f.job_id
WHERE f.job_id = $1 AND f.name = $2 AND f.kind = 'output' AND ($3::text IS NULL OR j.tenant = $3)
"""

# --------------------------------------------------------------------------------------------------
# Uploaded files.
# --------------------------------------------------------------------------------------------------

# insert_file: an upload, stored under an id the API chose (the file is already at its final path).
INSERT_FILE = """
INSERT INTO files (id, tenant, kind, name, size, sha256, content_type, path)
VALUES ($1, $2, 'input', $3, $4, $5, $6, $7)
RETURNING id, tenant, job_id, kind, name, size, sha256, content_type, path, created_at
"""

# get_file: a file row the caller may see (uploads and outputs alike).
GET_FILE = """
SELECT id, tenant, job_id, kind, name, size, sha256, content_type, path, created_at
FROM files WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)
"""

# --------------------------------------------------------------------------------------------------
# API keys.
# --------------------------------------------------------------------------------------------------

# create_api_key: only the sha256 of the secret is stored; the secret is shown once.
CREATE_API_KEY = """
INSERT INTO api_keys (tenant, name, secret_sha256, scopes)
VALUES ($1, $2, $3, $4::text[])
RETURNING id, tenant, name, scopes, created_at, revoked_at
"""

# list_api_keys: keys (never their hashes), newest first; $1 NULL lists every tenant's.
LIST_API_KEYS = """
SELECT id, tenant, name, scopes, created_at, revoked_at
FROM api_keys WHERE ($1::text IS NULL OR tenant = $1)
ORDER BY created_at DESC, id
"""

# revoke_api_key: revoked keys stay listed (audit) but authenticate nothing.
REVOKE_API_KEY = """
UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING id
"""

# lookup_api_key: the live key whose secret hashes to $1 (unique index on secret_sha256).
LOOKUP_API_KEY = """
SELECT id, tenant, name, scopes FROM api_keys WHERE secret_sha256 = $1 AND revoked_at IS NULL
"""

# --------------------------------------------------------------------------------------------------
# System status and metrics (every replica reads the same rows, so every replica answers the same).
# --------------------------------------------------------------------------------------------------

# live_terms: per pool, the newest term not ended (its leader), with its snapshot; stale when the
# heartbeat is older than $1 seconds (the leader died without ending its term, and none took over).
LIVE_TERMS = """
SELECT DISTINCT ON (pool) term, pool, host, pid, started_at, heartbeat_at, snapshot,
       heartbeat_at < now() - make_interval(secs => $1::float8) AS stale,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age_s
FROM schedulers
WHERE ended_at IS NULL
ORDER BY pool, term DESC
"""

# queue_depth: queued jobs per model; feature-only jobs (model NULL) are counted under their feature.
QUEUE_DEPTH = """
SELECT model, feature, count(*)::int AS n FROM jobs WHERE status = 'queued' GROUP BY model, feature
"""

# job_counts: jobs per model, feature and status (what the table holds within the retention).
JOB_COUNTS = """
SELECT model, feature, status, count(*)::bigint AS n FROM jobs GROUP BY model, feature, status
"""

# run_durations: finished jobs' run time (finished_at - started_at) bucketed by $1 (ascending upper
# bounds): width_bucket gives 0 below the first bound and len($1) above the last.
RUN_DURATIONS = """
SELECT model, feature, status, width_bucket(d, $1::float8[]) AS bucket, count(*)::bigint AS n,
       sum(d)::float8 AS total
FROM (SELECT model, feature, status, extract(epoch FROM finished_at - started_at)::float8 AS d
      FROM jobs WHERE finished_at IS NOT NULL AND started_at IS NOT NULL) x
GROUP BY model, feature, status, bucket
"""

# wait_durations: how long started jobs waited in the queue (started_at - created_at), bucketed as above.
WAIT_DURATIONS = """
SELECT model, feature, NULL::text AS status, width_bucket(d, $1::float8[]) AS bucket,
       count(*)::bigint AS n, sum(d)::float8 AS total
FROM (SELECT model, feature, extract(epoch FROM started_at - created_at)::float8 AS d
      FROM jobs WHERE started_at IS NOT NULL) x
GROUP BY model, feature, bucket
"""

# ping: a cheap round trip (the listener's liveness check of its connection).
PING = "SELECT 1"

# migration_version: the schema revision this database is at (readiness).
MIGRATION_VERSION = "SELECT version_num FROM alembic_version"


# --------------------------------------------------------------------------------------------------
# Functions.
# --------------------------------------------------------------------------------------------------


class CursorError(ValueError):
    """A pagination cursor that this server did not produce."""


def encode_cursor(created_at: datetime, job_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(job_id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job = json.loads(raw)
        at = datetime.fromisoformat(created)
        if at.tzinfo is None:
            raise ValueError("naive timestamp")
        return at, uuid.UUID(job)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise CursorError("invalid cursor") from exc


async def get_job_detail(db: Executor, job_id: uuid.UUID, *, tenant: str | None) -> Record | None:
    row: Record | None = await db.fetchrow(GET_JOB_DETAIL, job_id, tenant)
    return row


@dataclass(frozen=True)
class JobPage:
    items: list[Record]
    next_cursor: str | None


async def list_jobs(
    db: Executor,
    *,
    tenant: str | None,
    status: str | None = None,
    model: str | None = None,
    feature: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> JobPage:
    """One page of jobs, newest first. Raises CursorError for a cursor this server did not produce."""
    after_at, after_id = decode_cursor(cursor) if cursor else (None, None)
    rows = await db.fetch(LIST_JOBS, tenant, status, model, feature, after_at, after_id, limit + 1)
    items = list(rows[:limit])
    nxt = None
    if len(rows) > limit and items:
        last = items[-1]
        nxt = encode_cursor(last["created_at"], last["id"])
    return JobPage(items, nxt)


async def job_state(
    db: Executor, job_id: uuid.UUID, *, tenant: str | None, after_event: int | None
) -> Record | None:
    row: Record | None = await db.fetchrow(JOB_STATE, job_id, tenant, after_event)
    return row


async def get_output(db: Executor, job_id: uuid.UUID, name: str, *, tenant: str | None) -> Record | None:
    row: Record | None = await db.fetchrow(GET_OUTPUT, job_id, name, tenant)
    return row


async def insert_file(
    db: Executor,
    *,
    file_id: uuid.UUID,
    tenant: str,
    name: str,
    size: int,
    sha256: str,
    content_type: str,
    path: str,
) -> Record:
    row: Record = await db.fetchrow(INSERT_FILE, file_id, tenant, name, size, sha256, content_type, path)
    return row


async def get_file(db: Executor, file_id: uuid.UUID, *, tenant: str | None) -> Record | None:
    row: Record | None = await db.fetchrow(GET_FILE, file_id, tenant)
    return row


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


async def create_api_key(
    db: Executor, *, tenant: str, name: str = "", scopes: Sequence[str]
) -> tuple[Record, str]:
    """Create a key; returns (its row, the secret). Only the secret's sha256 is stored."""
    wanted = sorted(set(scopes))
    unknown = set(wanted) - SCOPES
    if not wanted or unknown:
        raise ValueError(f"scopes must be a non-empty subset of {sorted(SCOPES)}, got {sorted(scopes)}")
    if not tenant or len(tenant) > 200 or any(not c.isprintable() for c in tenant):
        raise ValueError("tenant must be 1..200 printable characters")
    if len(name) > 200 or any(not c.isprintable() for c in name):
        raise ValueError("name must be at most 200 printable characters")
    secret = new_secret()
    row: Record = await db.fetchrow(CREATE_API_KEY, tenant, name, hash_secret(secret), wanted)
    return row, secret


async def list_api_keys(db: Executor, tenant: str | None = None) -> list[Record]:
    return await db.fetch(LIST_API_KEYS, tenant)


async def revoke_api_key(db: Executor, key_id: uuid.UUID | str) -> bool:
    """Revoke a key by id; False when there is no such live key (or the id is not a UUID)."""
    if not isinstance(key_id, uuid.UUID):
        try:
            key_id = uuid.UUID(str(key_id))
        except ValueError:
            return False
    return await db.fetchrow(REVOKE_API_KEY, key_id) is not None


async def lookup_api_key(db: Executor, secret: str) -> Record | None:
    """The live key with this secret, or None."""
    return await lookup_api_key_hash(db, hash_secret(secret))


async def lookup_api_key_hash(db: Executor, secret_sha256: str) -> Record | None:
    """The live key whose secret hashes to ``secret_sha256``, or None."""
    row: Record | None = await db.fetchrow(LOOKUP_API_KEY, secret_sha256)
    return row


async def live_terms(db: Executor, *, stale_after_s: float) -> list[Record]:
    return await db.fetch(LIVE_TERMS, stale_after_s)


def lane(model: str | None, feature: str) -> str:
    """The queue a job waits in: its model, or ``<feature>.*`` when any model of the feature may run it."""
    return model if model is not None else f"{feature}.*"


async def queue_depth(db: Executor) -> dict[str, int]:
    rows = await db.fetch(QUEUE_DEPTH)
    out: dict[str, int] = {}
    for r in rows:
        key = lane(r["model"], r["feature"])
        out[key] = out.get(key, 0) + int(r["n"])
    return out


async def job_counts(db: Executor) -> list[Record]:
    return await db.fetch(JOB_COUNTS)


async def durations(db: Executor, *, buckets: Sequence[float], kind: str) -> list[Record]:
    """Bucketed run (``kind="run"``) or queue-wait (``kind="wait"``) durations per model."""
    query = {"run": RUN_DURATIONS, "wait": WAIT_DURATIONS}[kind]
    return await db.fetch(query, list(buckets))


async def migration_version(db: Executor) -> str | None:
    value: Any = await db.fetchval(MIGRATION_VERSION)
    return None if value is None else str(value)
