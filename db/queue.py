"""The queue protocol: functions over asyncpg, one statement (one round trip) each where possible.

Callers pass a connection or a pool (anything with ``fetch``/``fetchrow``/``fetchval``/``execute``).
Time-dependent functions take ``now`` (None: the database's ``now()``), so tests need no sleeping.
Scheduler writes take the leader's ``term`` and change nothing unless the job is still leased to that
term (fencing). The SQL, with the reason for each locking clause, is in ``db/sql.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from db import sql

Record = Mapping[str, Any]


class Executor(Protocol):
    async def fetch(self, query: str, *args: Any) -> list[Any]: ...
    async def fetchrow(self, query: str, *args: Any) -> Any: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def execute(self, query: str, *args: Any) -> str: ...


@dataclass(frozen=True)
class NewJob:
    """A job to enqueue. ``feature`` is required; ``model`` None lets any model of the feature run it."""

    feature: str
    model: str | None = None
    inputs: Mapping[str, Any] = field(default_factory=dict)
    tenant: str = "default"
    pool: str | None = None
    priority: int = 0
    max_attempts: int = 3
    timeout_s: float | None = None
    metadata: Mapping[str, Any] | None = None
    idempotency_key: str | None = None
    run_after: datetime | None = None


@dataclass(frozen=True)
class Want:
    """The leader's demand for one model: claim up to ``n`` jobs of it (or of its feature)."""

    model: str
    feature: str
    n: int


@dataclass(frozen=True)
class Failure:
    job_id: uuid.UUID
    kind: str
    message: str
    retry: bool


@dataclass(frozen=True)
class Output:
    job_id: uuid.UUID
    name: str
    size: int
    sha256: str
    content_type: str
    path: str


@dataclass(frozen=True)
class Backoff:
    base_s: float = 1.0
    max_s: float = 300.0


# -- enqueue -----------------------------------------------------------------------------------------


async def enqueue(db: Executor, job: NewJob, *, now: datetime | None = None) -> tuple[Record, bool]:
    """Insert one job; returns (job, created). A repeated idempotency key returns the earlier job."""
    row = await db.fetchrow(
        sql.ENQUEUE,
        job.tenant,
        job.model,
        job.feature,
        job.pool,
        dict(job.inputs),
        dict(job.metadata) if job.metadata is not None else None,
        job.priority,
        job.max_attempts,
        job.timeout_s,
        job.idempotency_key,
        job.run_after,
        now,
    )
    if row is not None:
        return row, True
    existing = await db.fetchrow(sql.GET_BY_IDEMPOTENCY_KEY, job.tenant, job.idempotency_key)
    if existing is None:  # the conflicting insert rolled back between our two statements: try again
        return await enqueue(db, job, now=now)
    return existing, False


async def enqueue_many(
    db: Executor, jobs: Sequence[NewJob], *, now: datetime | None = None
) -> list[uuid.UUID]:
    """Insert a batch in one statement (no idempotency keys); returns the new ids in order."""
    if not jobs:
        return []
    if any(j.idempotency_key is not None for j in jobs):
        raise ValueError("enqueue_many does not take idempotency keys; use enqueue")
    rows = await db.fetch(
        sql.ENQUEUE_MANY,
        [j.tenant for j in jobs],
        [j.model for j in jobs],
        [j.feature for j in jobs],
        [j.pool for j in jobs],
        [dict(j.inputs) for j in jobs],
        [j.priority for j in jobs],
        [j.max_attempts for j in jobs],
        [j.timeout_s for j in jobs],
        now,
        [dict(j.metadata) if j.metadata is not None else None for j in jobs],
        [j.run_after for j in jobs],
    )
    return [r["id"] for r in rows]


# -- leader ------------------------------------------------------------------------------------------


async def peek(
    db: Executor,
    wants: Sequence[Want],
    *,
    pool: str,
    now: datetime | None = None,
) -> list[Record]:
    """Per model: runnable queued jobs (up to ``want.n``), their top priority and the oldest wait."""
    if not wants:
        return []
    return await db.fetch(
        sql.PEEK,
        [w.model for w in wants],
        [w.feature for w in wants],
        [max(w.n, 1) for w in wants],
        pool,
        now,
    )


async def claim(
    db: Executor,
    *,
    term: int,
    wants: Sequence[Want],
    pool: str,
    lease_ttl_s: float,
    slots: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    now: datetime | None = None,
) -> list[Record]:
    """Lease up to ``n`` runnable jobs per wanted model to ``term``; never blocks on others' claims.

    ``slots[model]`` lists (worker, gpu) for that model's jobs in claim order: the k-th job claimed
    for the model starts running on the k-th slot's worker at once (``status`` running, ``worker``
    set in the returned row); jobs beyond the slots are leased. The caller must then run them there.
    """
    wants = [w for w in wants if w.n > 0]
    if not wants:
        return []
    s_model: list[str] = []
    s_rn: list[int] = []
    s_worker: list[str] = []
    s_gpu: list[str] = []
    for model, lst in (slots or {}).items():
        for k, (worker, gpu) in enumerate(lst, start=1):
            s_model.append(model)
            s_rn.append(k)
            s_worker.append(worker)
            s_gpu.append(gpu)
    return await db.fetch(
        sql.CLAIM,
        term,
        [w.model for w in wants],
        [w.feature for w in wants],
        [w.n for w in wants],
        pool,
        now,
        lease_ttl_s,
        s_model,
        s_rn,
        s_worker,
        s_gpu,
    )


async def extend_leases(
    db: Executor, *, term: int, lease_ttl_s: float, now: datetime | None = None
) -> set[uuid.UUID]:
    """Extend every lease of ``term``; returns the ids still leased to it."""
    rows = await db.fetch(sql.EXTEND_LEASES, term, now, lease_ttl_s)
    return {r["id"] for r in rows}


async def start_many(
    db: Executor,
    *,
    term: int,
    started: Sequence[tuple[uuid.UUID, str, str]],
    now: datetime | None = None,
) -> set[uuid.UUID]:
    """leased -> running for (job id, worker, gpu) triples; returns the ids that were still ours."""
    if not started:
        return set()
    rows = await db.fetch(
        sql.START_MANY,
        term,
        [s[0] for s in started],
        [s[1] for s in started],
        [s[2] for s in started],
        now,
    )
    return {r["id"] for r in rows}


async def start(
    db: Executor, *, term: int, job_id: uuid.UUID, worker: str, gpu: str, now: datetime | None = None
) -> bool:
    return job_id in await start_many(db, term=term, started=[(job_id, worker, gpu)], now=now)


async def progress(
    db: Executor,
    *,
    term: int,
    job_id: uuid.UUID,
    fraction: float,
    message: str | None = None,
    min_interval_s: float = 0.25,
    now: datetime | None = None,
) -> bool:
    """Record progress (clamped to 0..1); skipped when the last write is younger than min_interval_s."""
    fraction = min(max(float(fraction), 0.0), 1.0)
    row = await db.fetchrow(sql.PROGRESS, job_id, term, fraction, message, min_interval_s, now)
    return row is not None


async def complete_many(
    db: Executor,
    *,
    term: int,
    results: Sequence[tuple[uuid.UUID, Mapping[str, Any]]],
    outputs: Sequence[Output] = (),
    now: datetime | None = None,
) -> set[uuid.UUID]:
    """Mark jobs succeeded with their results (and record their output files); fenced on ``term``.

    Returns the ids that were still ours. Pass a connection inside a transaction when outputs are given,
    so the job and its files land together.
    """
    if not results:
        return set()
    rows = await db.fetch(
        sql.COMPLETE_MANY, term, [r[0] for r in results], [dict(r[1]) for r in results], now
    )
    done = {r["id"] for r in rows}
    mine = [o for o in outputs if o.job_id in done]
    if mine:
        await db.execute(
            sql.RECORD_OUTPUTS,
            term,
            [o.job_id for o in mine],
            [o.name for o in mine],
            [o.size for o in mine],
            [o.sha256 for o in mine],
            [o.content_type for o in mine],
            [o.path for o in mine],
        )
    return done


async def complete(
    db: Executor,
    *,
    term: int,
    job_id: uuid.UUID,
    result: Mapping[str, Any],
    now: datetime | None = None,
) -> bool:
    return job_id in await complete_many(db, term=term, results=[(job_id, result)], now=now)


async def fail_many(
    db: Executor,
    *,
    term: int,
    failures: Sequence[Failure],
    backoff: Backoff = Backoff(),
    now: datetime | None = None,
) -> dict[uuid.UUID, str]:
    """Record failed attempts: retryable ones with attempts left go back to the queue after an
    exponential backoff with jitter, the others end ``failed``. Returns id -> new status."""
    if not failures:
        return {}
    rows = await db.fetch(
        sql.FAIL_MANY,
        term,
        [f.job_id for f in failures],
        [f.kind for f in failures],
        [f.message[:4000] for f in failures],
        [f.retry for f in failures],
        now,
        backoff.max_s,
        backoff.base_s,
    )
    return {r["id"]: r["status"] for r in rows}


async def fail(
    db: Executor,
    *,
    term: int,
    job_id: uuid.UUID,
    kind: str,
    message: str,
    retry: bool,
    backoff: Backoff = Backoff(),
    now: datetime | None = None,
) -> str | None:
    """One failed attempt; returns the new status ("queued" or "failed"), None when not ours."""
    out = await fail_many(
        db,
        term=term,
        failures=[Failure(job_id, kind, message, retry)],
        backoff=backoff,
        now=now,
    )
    return out.get(job_id)


async def release(
    db: Executor,
    *,
    term: int,
    job_ids: Sequence[uuid.UUID],
    reason: str = "released by its scheduler",
) -> set[uuid.UUID]:
    """Give jobs back to the queue without counting the attempt (their workers must be stopped)."""
    if not job_ids:
        return set()
    rows = await db.fetch(sql.RELEASE, term, list(job_ids), reason)
    return {r["id"] for r in rows}


async def mark_cancelled(db: Executor, *, term: int, job_id: uuid.UUID, now: datetime | None = None) -> bool:
    return await db.fetchrow(sql.MARK_CANCELLED, term, job_id, now) is not None


async def cancel_requests(db: Executor, *, term: int) -> set[uuid.UUID]:
    rows = await db.fetch(sql.CANCEL_REQUESTS, term)
    return {r["id"] for r in rows}


# -- cancel (API side) -------------------------------------------------------------------------------


async def cancel(
    db: Executor, job_id: uuid.UUID, *, tenant: str | None, now: datetime | None = None
) -> tuple[Record | None, bool]:
    """Cancel a job: queued ones at once, leased/running ones by request to their leader.

    Returns (job, changed): (None, False) when there is no such job for this tenant; changed is False
    when the job had already finished.
    """
    row = await db.fetchrow(sql.CANCEL, job_id, tenant, now)
    if row is not None:
        return row, True
    existing = await db.fetchrow(sql.GET_JOB, job_id, tenant)
    return existing, False


# -- rescue and retention ----------------------------------------------------------------------------


async def rescue_expired(db: Executor, *, now: datetime | None = None) -> list[Record]:
    """Requeue (or fail, past max_attempts) jobs whose lease ran out; returns what changed."""
    return await db.fetch(sql.RESCUE_EXPIRED, now)


async def rescue_terms(db: Executor, terms: Sequence[int], *, now: datetime | None = None) -> list[Record]:
    """Requeue (or fail) the active jobs of terms known to be dead."""
    if not terms:
        return []
    return await db.fetch(sql.RESCUE_TERMS, list(terms), now)


async def prune(
    db: Executor, *, retention_s: float, batch: int = 1000, now: datetime | None = None
) -> tuple[int, list[str]]:
    """Delete up to ``batch`` finished jobs older than the retention; returns (count, output paths)."""
    row = await db.fetchrow(sql.PRUNE, retention_s, now, batch)
    return int(row["n"]), list(row["paths"])


# -- scheduler terms ---------------------------------------------------------------------------------


async def open_term(
    db: Executor,
    *,
    pool: str,
    host: str,
    pid: int,
    snapshot: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> int:
    row = await db.fetchrow(sql.OPEN_TERM, pool, host, pid, dict(snapshot or {}), now)
    return int(row["term"])


async def heartbeat(
    db: Executor, *, term: int, snapshot: Mapping[str, Any], now: datetime | None = None
) -> bool:
    """Refresh the term's row; False means the term was ended (step down)."""
    return await db.fetchrow(sql.HEARTBEAT, term, dict(snapshot), now) is not None


async def end_term(db: Executor, *, term: int, now: datetime | None = None) -> None:
    await db.execute(sql.END_TERM, term, now)


async def earlier_terms(db: Executor, *, pool: str, term: int) -> list[Record]:
    return await db.fetch(sql.EARLIER_TERMS, pool, term)


async def end_earlier_terms(db: Executor, *, pool: str, term: int, now: datetime | None = None) -> None:
    await db.execute(sql.END_EARLIER_TERMS, pool, term, now)


# -- reads -------------------------------------------------------------------------------------------


async def get_job(db: Executor, job_id: uuid.UUID, *, tenant: str | None = None) -> Record | None:
    row: Record | None = await db.fetchrow(sql.GET_JOB, job_id, tenant)
    return row


async def job_events(db: Executor, job_id: uuid.UUID) -> list[Record]:
    return await db.fetch(sql.JOB_EVENTS, job_id)


async def input_files(db: Executor, file_ids: Sequence[uuid.UUID], *, tenant: str) -> list[Record]:
    return await db.fetch(sql.INPUT_FILES, list(file_ids), tenant)
