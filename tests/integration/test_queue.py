"""The queue protocol on a real PostgreSQL: enqueue, claim, fencing, retry, cancel, progress, prune, terms.

Time-dependent behaviour is driven through the ``now`` parameters, never by sleeping. Waits on NOTIFY
have deadlines; "no further notification" is proven with a sentinel sent after the transaction under test
(one listener receives notifications in commit order).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from core.types import LEGAL_TRANSITIONS
from db import queue as q
from db import sql
from db.connect import connect

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
POOL = "p1"
TTL = 30.0
NOTIFY_DEADLINE_S = 10.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- helpers -----------------------------------------------------------------------------------------


class Listener:
    """Collects the payloads of one NOTIFY channel on its own connection."""

    def __init__(self, conn: asyncpg.Connection, channel: str) -> None:
        self.conn = conn
        self.channel = channel
        self.payloads: asyncio.Queue[str] = asyncio.Queue()

    def _on(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.payloads.put_nowait(payload)

    async def start(self) -> None:
        await self.conn.add_listener(self.channel, self._on)

    async def next(self) -> str:
        return await asyncio.wait_for(self.payloads.get(), NOTIFY_DEADLINE_S)

    async def until_sentinel(self, sender: asyncpg.Connection) -> list[str]:
        """Everything delivered before a sentinel sent now (so nothing earlier is still in flight)."""
        sentinel = f"sentinel-{uuid.uuid4().hex}"
        await sender.execute("SELECT pg_notify($1, $2)", self.channel, sentinel)
        got: list[str] = []
        while (payload := await self.next()) != sentinel:
            got.append(payload)
        return got


@pytest.fixture
async def listen_conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await connect(dsn)
    try:
        yield c
    finally:
        await c.close()


async def new_term(db: asyncpg.Connection, pool: str = POOL) -> int:
    return await q.open_term(db, pool=pool, host="host-a", pid=4242)


async def add(
    db: asyncpg.Connection,
    model: str | None = "m1",
    *,
    feature: str = "f",
    now: datetime | None = None,
    **fields: Any,
) -> uuid.UUID:
    row, created = await q.enqueue(db, q.NewJob(feature=feature, model=model, **fields), now=now)
    assert created
    job_id: uuid.UUID = row["id"]
    return job_id


async def take(
    db: asyncpg.Connection,
    term: int,
    *wants: q.Want,
    pool: str = POOL,
    now: datetime | None = None,
    ttl: float = TTL,
) -> list[Any]:
    if not wants:
        wants = (q.Want("m1", "f", 100),)
    return await q.claim(db, term=term, wants=wants, pool=pool, lease_ttl_s=ttl, now=now)


async def take_one(db: asyncpg.Connection, term: int, now: datetime | None = None) -> uuid.UUID:
    rows = await take(db, term, q.Want("m1", "f", 1), now=now)
    assert len(rows) == 1
    job_id: uuid.UUID = rows[0]["id"]
    return job_id


async def job(db: asyncpg.Connection, job_id: uuid.UUID) -> Any:
    row = await q.get_job(db, job_id)
    assert row is not None
    return row


async def transitions(db: asyncpg.Connection, job_id: uuid.UUID) -> list[tuple[str | None, str]]:
    return [(e["from_status"], e["to_status"]) for e in await q.job_events(db, job_id)]


def assert_legal_path(events: Sequence[Any], final_status: str) -> None:
    """One job's audit trail: starts at insert, every edge legal, each step follows the last."""
    assert events, "a job without events"
    assert events[0]["from_status"] is None
    prev: str | None = None
    for e in events:
        edge = (e["from_status"], e["to_status"])
        assert edge in LEGAL_TRANSITIONS, f"illegal transition {edge}"
        assert e["from_status"] == prev, f"event from {e['from_status']} after {prev}"
        prev = e["to_status"]
    assert prev == final_status


# -- enqueue -----------------------------------------------------------------------------------------


async def test_enqueue_defaults(conn: asyncpg.Connection) -> None:
    row, created = await q.enqueue(conn, q.NewJob(feature="f", model="m1", inputs={"a": [1, 2]}))
    assert created
    assert row["status"] == "queued"
    assert row["tenant"] == "default"
    assert row["model"] == "m1" and row["feature"] == "f"
    assert row["pool"] is None
    assert row["inputs"] == {"a": [1, 2]}
    assert row["metadata"] is None
    assert (row["priority"], row["attempts"], row["max_attempts"]) == (0, 0, 3)
    assert row["timeout_s"] is None and row["idempotency_key"] is None
    assert row["progress"] == 0 and row["result"] is None and row["error"] is None
    assert row["lease_owner"] is None and row["lease_expires_at"] is None
    assert row["run_after"] == row["created_at"]
    assert row["started_at"] is None and row["finished_at"] is None
    assert await transitions(conn, row["id"]) == [(None, "queued")]


async def test_enqueue_fields(conn: asyncpg.Connection) -> None:
    new = q.NewJob(
        feature="f",
        model=None,
        inputs={"x": "y"},
        tenant="acme",
        pool="gpu-a",
        priority=7,
        max_attempts=5,
        timeout_s=12.5,
        metadata={"trace": "t1"},
        idempotency_key="k1",
        run_after=at(60),
    )
    row, created = await q.enqueue(conn, new, now=T0)
    assert created
    assert (row["tenant"], row["model"], row["pool"]) == ("acme", None, "gpu-a")
    assert (row["priority"], row["max_attempts"], row["timeout_s"]) == (7, 5, 12.5)
    assert row["metadata"] == {"trace": "t1"} and row["idempotency_key"] == "k1"
    assert row["created_at"] == T0 and row["run_after"] == at(60)


async def test_idempotency_key_is_per_tenant(conn: asyncpg.Connection) -> None:
    first, created = await q.enqueue(
        conn, q.NewJob(feature="f", model="m1", inputs={"n": 1}, idempotency_key="k")
    )
    assert created
    again, created = await q.enqueue(
        conn, q.NewJob(feature="f", model="m1", inputs={"n": 2}, idempotency_key="k")
    )
    assert not created
    assert again["id"] == first["id"] and again["inputs"] == {"n": 1}
    other, created = await q.enqueue(
        conn, q.NewJob(feature="f", model="m1", tenant="other", idempotency_key="k")
    )
    assert created and other["id"] != first["id"]
    assert await conn.fetchval("SELECT count(*) FROM jobs") == 2


async def test_idempotent_enqueue_race(dsn: str) -> None:
    """20 connections enqueue one key at the same moment: one row, one creator, one id for all."""
    conns = [await connect(dsn) for _ in range(20)]
    try:
        barrier = asyncio.Barrier(len(conns))  # all 20 are released at the same moment

        async def one(c: asyncpg.Connection) -> tuple[uuid.UUID, bool]:
            await barrier.wait()
            row, created = await q.enqueue(c, q.NewJob(feature="f", model="m1", idempotency_key="same"))
            return row["id"], created

        tasks = [asyncio.create_task(one(c)) for c in conns]
        results = await asyncio.gather(*tasks)
        assert await conns[0].fetchval("SELECT count(*) FROM jobs") == 1
        assert len({job_id for job_id, _ in results}) == 1
        assert sum(created for _, created in results) == 1
    finally:
        await asyncio.gather(*(c.close() for c in conns))


async def test_enqueue_many_ids_in_order_and_one_wakeup(
    conn: asyncpg.Connection, listen_conn: asyncpg.Connection
) -> None:
    listener = Listener(listen_conn, sql.CHANNEL_NEW)
    await listener.start()
    jobs = [q.NewJob(feature="f", model="m1", inputs={"i": i}, priority=i % 3) for i in range(1000)]
    ids = await q.enqueue_many(conn, jobs)
    assert len(ids) == 1000 and len(set(ids)) == 1000
    rows = await conn.fetch("SELECT id, (inputs->>'i')::int AS i FROM jobs")
    position = {r["id"]: r["i"] for r in rows}
    assert [position[i] for i in ids] == list(range(1000))
    assert await listener.until_sentinel(conn) == ["m1"]
    # A feature-only job wakes the feature's listeners.
    await q.enqueue_many(conn, [q.NewJob(feature="f"), q.NewJob(feature="g", model="m9")])
    assert sorted(await listener.until_sentinel(conn)) == ["*f", "m9"]


async def test_enqueue_many_keeps_every_field(conn: asyncpg.Connection) -> None:
    later = q.NewJob(
        feature="f",
        model=None,
        inputs={"k": 1},
        tenant="acme",
        pool="a",
        priority=4,
        max_attempts=7,
        timeout_s=3.5,
        metadata={"m": True},
        run_after=at(90),
    )
    plain, delayed = await q.enqueue_many(conn, [q.NewJob(feature="f", model="m1"), later], now=T0)
    row = await job(conn, delayed)
    assert (row["tenant"], row["model"], row["pool"], row["inputs"]) == ("acme", None, "a", {"k": 1})
    assert (row["priority"], row["max_attempts"], row["timeout_s"]) == (4, 7, 3.5)
    assert row["metadata"] == {"m": True}
    assert row["created_at"] == T0 and row["run_after"] == at(90)
    first = await job(conn, plain)
    assert first["run_after"] == T0 and first["metadata"] is None


async def test_enqueue_many_edge_cases(conn: asyncpg.Connection) -> None:
    assert await q.enqueue_many(conn, []) == []
    with pytest.raises(ValueError):
        await q.enqueue_many(conn, [q.NewJob(feature="f", idempotency_key="k")])


async def test_enqueue_wakes_listeners(conn: asyncpg.Connection, listen_conn: asyncpg.Connection) -> None:
    listener = Listener(listen_conn, sql.CHANNEL_NEW)
    await listener.start()
    await add(conn, "m2")
    assert await listener.next() == "m2"


# -- claim -------------------------------------------------------------------------------------------


async def test_claim_priority_then_age(conn: asyncpg.Connection) -> None:
    low_new = await add(conn, now=at(0))
    high_mid = await add(conn, now=at(1), priority=5)
    low_old = await add(conn, now=at(-1))
    high_new = await add(conn, now=at(2), priority=5)
    term = await new_term(conn)
    order = [await take_one(conn, term, now=at(10)) for _ in range(4)]
    assert order == [high_mid, high_new, low_old, low_new]
    assert await take(conn, term, now=at(10)) == []


async def test_claim_respects_per_model_wants(conn: asyncpg.Connection) -> None:
    for model in ("m1", "m2", "m3"):
        await q.enqueue_many(conn, [q.NewJob(feature="f", model=model) for _ in range(5)])
    term = await new_term(conn)
    rows = await take(conn, term, q.Want("m1", "f", 2), q.Want("m2", "f", 3), q.Want("m3", "f", 0))
    got = sorted(r["model"] for r in rows)
    assert got == ["m1", "m1", "m2", "m2", "m2"]
    assert all(r["attempts"] == 1 for r in rows)
    assert await take(conn, term, q.Want("m4", "f", 10)) == []
    assert await q.claim(conn, term=term, wants=[], pool=POOL, lease_ttl_s=TTL) == []


async def test_claim_pool_filter(conn: asyncpg.Connection) -> None:
    anywhere = await add(conn)
    in_a = await add(conn, pool="a")
    in_b = await add(conn, pool="b")
    term = await new_term(conn, pool="a")
    assert {r["id"] for r in await take(conn, term, pool="a")} == {anywhere, in_a}
    term_b = await new_term(conn, pool="b")
    assert {r["id"] for r in await take(conn, term_b, pool="b")} == {in_b}


async def test_run_after_in_the_future_waits(conn: asyncpg.Connection) -> None:
    job_id = await add(conn, now=T0, run_after=at(60))
    term = await new_term(conn)
    want = q.Want("m1", "f", 5)
    assert await take(conn, term, now=at(59)) == []
    (peeked,) = await q.peek(conn, [want], pool=POOL, now=at(59))
    assert peeked["queued"] == 0
    (peeked,) = await q.peek(conn, [want], pool=POOL, now=at(60))
    assert peeked["queued"] == 1
    assert [r["id"] for r in await take(conn, term, now=at(60))] == [job_id]


async def test_feature_only_jobs(conn: asyncpg.Connection) -> None:
    any_model = await add(conn, None, feature="mesh")
    other_feature = await add(conn, None, feature="audio")
    term = await new_term(conn)
    rows = await take(conn, term, q.Want("mesh.smooth", "mesh", 5), q.Want("mesh.simplify", "mesh", 5))
    assert [r["id"] for r in rows] == [any_model]
    assert rows[0]["model"] in {"mesh.smooth", "mesh.simplify"}
    assert (await job(conn, any_model))["model"] == rows[0]["model"]
    assert (await job(conn, other_feature))["status"] == "queued"


async def test_claim_mixes_model_and_feature_jobs_by_priority(conn: asyncpg.Connection) -> None:
    named = await add(conn, "m1", now=at(0))
    feature_only = await add(conn, None, now=at(1), priority=3)
    term = await new_term(conn)
    assert await take_one(conn, term, now=at(5)) == feature_only
    assert await take_one(conn, term, now=at(5)) == named


async def test_claim_leases_and_audits(conn: asyncpg.Connection) -> None:
    job_id = await add(conn, now=T0)
    term = await new_term(conn)
    (row,) = await take(conn, term, now=at(1), ttl=45)
    assert row["attempts"] == 1
    assert row["lease_expires_at"] == at(46)
    stored = await job(conn, job_id)
    assert stored["status"] == "leased" and stored["lease_owner"] == term
    events = await q.job_events(conn, job_id)
    assert [(e["from_status"], e["to_status"], e["attempt"]) for e in events] == [
        (None, "queued", 0),
        ("queued", "leased", 1),
    ]
    assert events[1]["lease_owner"] == term


async def test_peek_counts_and_oldest_wait(conn: asyncpg.Connection) -> None:
    await add(conn, now=at(0))
    await add(conn, now=at(5), priority=2)
    await add(conn, now=at(8), priority=2)
    await add(conn, None, now=at(1))
    await add(conn, "m2", now=at(0), pool="elsewhere")
    rows = await q.peek(conn, [q.Want("m1", "f", 10), q.Want("m2", "f", 10)], pool=POOL, now=at(10))
    by_model = {r["model"]: r for r in rows}
    assert by_model["m1"]["queued"] == 4
    assert by_model["m1"]["priority"] == 2
    assert by_model["m1"]["oldest_wait_s"] == pytest.approx(5.0)
    assert by_model["m2"]["queued"] == 1  # the feature-only job; the other pool's job is not ours
    assert await q.peek(conn, [], pool=POOL) == []


# -- lifecycle and fencing ---------------------------------------------------------------------------


async def test_run_to_success_with_outputs(conn: asyncpg.Connection) -> None:
    job_id = await add(conn)
    term = await new_term(conn)
    await take(conn, term)
    assert await q.start(conn, term=term, job_id=job_id, worker="w1", gpu="GPU-0")
    started = await job(conn, job_id)
    assert (started["status"], started["worker"], started["gpu"]) == ("running", "w1", "GPU-0")
    assert started["started_at"] is not None
    out = q.Output(job_id, "mesh.glb", 10, "ab" * 32, "model/gltf-binary", "/data/out/mesh.glb")
    async with conn.transaction():
        done = await q.complete_many(conn, term=term, results=[(job_id, {"faces": 12})], outputs=[out])
    assert done == {job_id}
    row = await job(conn, job_id)
    assert (row["status"], row["result"], row["progress"]) == ("succeeded", {"faces": 12}, 1.0)
    assert row["finished_at"] is not None and row["lease_expires_at"] is None
    files = await conn.fetch("SELECT kind, name, path FROM files WHERE job_id = $1", job_id)
    assert [tuple(f) for f in files] == [("output", "mesh.glb", "/data/out/mesh.glb")]
    assert await transitions(conn, job_id) == [
        (None, "queued"),
        ("queued", "leased"),
        ("leased", "running"),
        ("running", "succeeded"),
    ]


async def _stale_writes_change_nothing(conn: asyncpg.Connection, term: int, job_id: uuid.UUID) -> None:
    before = dict(await job(conn, job_id))
    events_before = len(await q.job_events(conn, job_id))
    assert not await q.start(conn, term=term, job_id=job_id, worker="w", gpu="g")
    assert not await q.progress(conn, term=term, job_id=job_id, fraction=0.5, min_interval_s=0)
    assert not await q.complete(conn, term=term, job_id=job_id, result={"late": True})
    assert (
        await q.fail(conn, term=term, job_id=job_id, kind="model_error", message="late", retry=True) is None
    )
    assert not await q.mark_cancelled(conn, term=term, job_id=job_id)
    assert await q.extend_leases(conn, term=term, lease_ttl_s=TTL) == set()
    assert await q.release(conn, term=term, job_ids=[job_id]) == set()
    assert await q.cancel_requests(conn, term=term) == set()
    out = q.Output(job_id, "late.bin", 1, "00" * 32, "application/octet-stream", "/late")
    await q.complete_many(conn, term=term, results=[(job_id, {})], outputs=[out])
    assert await conn.fetchval("SELECT count(*) FROM files WHERE job_id = $1", job_id) == 0
    assert dict(await job(conn, job_id)) == before
    assert len(await q.job_events(conn, job_id)) == events_before


async def test_fencing_after_rescue_terms_and_reclaim(conn: asyncpg.Connection) -> None:
    job_id = await add(conn)
    old = await new_term(conn)
    await take(conn, old)
    assert await q.start(conn, term=old, job_id=job_id, worker="w", gpu="g")
    new = await new_term(conn)
    rescued = await q.rescue_terms(conn, [old])
    assert [(r["id"], r["status"], r["attempts"]) for r in rescued] == [(job_id, "queued", 1)]
    row = await job(conn, job_id)
    assert row["error"]["kind"] == "lease_lost" and row["lease_owner"] is None
    await _stale_writes_change_nothing(conn, old, job_id)
    (again,) = await take(conn, new)
    assert again["id"] == job_id and again["attempts"] == 2
    # The job is leased again, to the new term: the old one still writes nothing.
    await _stale_writes_change_nothing(conn, old, job_id)
    assert await q.extend_leases(conn, term=new, lease_ttl_s=TTL) == {job_id}
    assert await q.complete(conn, term=new, job_id=job_id, result={})


async def test_lease_renewal_never_waits_for_a_locked_row(conn: asyncpg.Connection, dsn: str) -> None:
    busy, free = await add(conn, now=T0), await add(conn, now=at(1))
    term = await new_term(conn)
    await take(conn, term, q.Want("m1", "f", 2), now=at(2), ttl=10)
    other = await connect(dsn)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", busy)  # a writer finishing it
        async with asyncio.timeout(5):  # would block until the other transaction ends
            ours = await q.extend_leases(conn, term=term, lease_ttl_s=10, now=at(8))
        assert ours == {busy, free}  # the locked job is still ours...
        assert (await job(conn, free))["lease_expires_at"] == at(18)
        assert (await job(conn, busy))["lease_expires_at"] == at(12)  # ...and keeps its lease for now
        await tx.rollback()
    finally:
        await other.close()
    assert await q.extend_leases(conn, term=term, lease_ttl_s=10, now=at(9)) == {busy, free}
    assert (await job(conn, busy))["lease_expires_at"] == at(19)


async def test_fencing_after_rescue_expired(conn: asyncpg.Connection) -> None:
    job_id = await add(conn, now=T0)
    term = await new_term(conn)
    await take(conn, term, now=T0, ttl=10)
    assert await q.start(conn, term=term, job_id=job_id, worker="w", gpu="g", now=at(1))
    assert await q.extend_leases(conn, term=term, lease_ttl_s=10, now=at(5)) == {job_id}
    assert await q.rescue_expired(conn, now=at(14)) == []  # extended to at(15)
    rescued = await q.rescue_expired(conn, now=at(16))
    assert [(r["id"], r["status"]) for r in rescued] == [(job_id, "queued")]
    row = await job(conn, job_id)
    assert row["status"] == "queued" and row["run_after"] == at(16)
    assert row["error"]["kind"] == "lease_lost"
    await _stale_writes_change_nothing(conn, term, job_id)
    other = await new_term(conn)
    (again,) = await take(conn, other, now=at(16))
    assert again["attempts"] == 2


async def test_fencing_against_a_concurrent_term(conn: asyncpg.Connection) -> None:
    """A term that never held the job (another leader's) cannot touch it."""
    job_id = await add(conn)
    mine = await new_term(conn)
    theirs = await new_term(conn, pool="other")
    await take(conn, mine)
    await _stale_writes_change_nothing(conn, theirs, job_id)
    assert (await job(conn, job_id))["lease_owner"] == mine


async def test_rescue_past_max_attempts_fails_with_lease_lost(conn: asyncpg.Connection) -> None:
    job_id = await add(conn, now=T0, max_attempts=1)
    term = await new_term(conn)
    await take(conn, term, now=T0, ttl=5)
    (rescued,) = await q.rescue_expired(conn, now=at(6))
    assert rescued["status"] == "failed"
    row = await job(conn, job_id)
    assert row["status"] == "failed" and row["finished_at"] == at(6)
    assert row["error"]["kind"] == "lease_lost" and row["error"]["attempt"] == 1
    assert await take(conn, term, now=at(100)) == []


async def test_rescue_terms_past_max_attempts(conn: asyncpg.Connection) -> None:
    job_id = await add(conn, max_attempts=2)
    old = await new_term(conn)
    await take(conn, old)
    await q.rescue_terms(conn, [old])
    older = old
    old = await new_term(conn)
    await take(conn, old)
    (rescued,) = await q.rescue_terms(conn, [older, old])
    assert (rescued["status"], rescued["attempts"]) == ("failed", 2)
    assert (await job(conn, job_id))["error"]["kind"] == "lease_lost"


async def test_fail_many_retry_on_last_attempt_fails_with_that_error(conn: asyncpg.Connection) -> None:
    job_id = await add(conn, max_attempts=2, now=T0)
    term = await new_term(conn)
    backoff = q.Backoff(base_s=1, max_s=1)
    await take(conn, term, now=T0)
    first = q.Failure(job_id, "worker_crashed", "segfault", retry=True)
    assert await q.fail_many(conn, term=term, failures=[first], backoff=backoff, now=at(1)) == {
        job_id: "queued"
    }
    await take(conn, term, now=at(2))
    last = q.Failure(job_id, "model_error", "out of ideas", retry=True)
    assert await q.fail_many(conn, term=term, failures=[last], backoff=backoff, now=at(3)) == {
        job_id: "failed"
    }
    row = await job(conn, job_id)
    assert row["status"] == "failed" and row["attempts"] == 2 and row["finished_at"] == at(3)
    assert row["error"] == {"kind": "model_error", "message": "out of ideas", "attempt": 2}
    assert row["lease_owner"] is None


async def test_release_does_not_count_an_attempt(conn: asyncpg.Connection) -> None:
    job_id = await add(conn)
    term = await new_term(conn)
    await take(conn, term)
    assert await q.release(conn, term=term, job_ids=[job_id]) == {job_id}
    row = await job(conn, job_id)
    assert (row["status"], row["attempts"], row["lease_owner"]) == ("queued", 0, None)
    assert await q.release(conn, term=term, job_ids=[]) == set()
    (again,) = await take(conn, term)
    assert again["attempts"] == 1
    # A started job is released too (its worker was stopped first), still without counting the attempt.
    await q.start(conn, term=term, job_id=job_id, worker="w", gpu="g")
    assert await q.release(conn, term=term, job_ids=[job_id], reason="shutting down") == {job_id}
    row = await job(conn, job_id)
    assert (row["status"], row["attempts"], row["worker"]) == ("queued", 0, None)
    assert row["error"]["kind"] == "lease_lost" and row["error"]["message"] == "shutting down"
    assert (await transitions(conn, job_id))[-1] == ("running", "queued")


# -- retry and backoff -------------------------------------------------------------------------------


async def test_retry_backoff_grows_with_jitter_and_cap(conn: asyncpg.Connection) -> None:
    base, cap = 2.0, 100.0
    job_id = await add(conn, max_attempts=20, now=T0)
    term = await new_term(conn)
    backoff = q.Backoff(base_s=base, max_s=cap)
    now = T0
    for attempt in range(1, 10):
        (claimed,) = await take(conn, term, now=now)
        assert claimed["attempts"] == attempt
        assert await q.start(conn, term=term, job_id=job_id, worker="w", gpu="g", now=now)
        status = await q.fail(
            conn,
            term=term,
            job_id=job_id,
            kind="model_error",
            message=f"try {attempt}",
            retry=True,
            backoff=backoff,
            now=now,
        )
        assert status == "queued"
        row = await job(conn, job_id)
        full = min(cap, base * 2 ** (attempt - 1))
        delay = (row["run_after"] - now).total_seconds()
        assert full * 0.5 - 1e-3 <= delay <= full + 1e-3, (attempt, delay)
        assert row["finished_at"] is None and row["lease_owner"] is None
        # Not claimable before the backoff has passed.
        assert await take(conn, term, now=row["run_after"] - timedelta(milliseconds=1)) == []
        now = row["run_after"]
    events = await q.job_events(conn, job_id)
    requeues = [e for e in events if (e["from_status"], e["to_status"]) == ("running", "queued")]
    assert len(requeues) == 9
    assert requeues[0]["detail"]["error"] == {"kind": "model_error", "message": "try 1", "attempt": 1}
    assert "run_after" in requeues[0]["detail"]


async def test_non_retryable_failure_is_final(conn: asyncpg.Connection) -> None:
    job_id = await add(conn, max_attempts=5)
    term = await new_term(conn)
    await take(conn, term)
    await q.start(conn, term=term, job_id=job_id, worker="w", gpu="g")
    assert (
        await q.fail(conn, term=term, job_id=job_id, kind="invalid_input", message="bad", retry=False)
        == "failed"
    )
    row = await job(conn, job_id)
    assert row["status"] == "failed" and row["error"]["kind"] == "invalid_input"
    assert (await transitions(conn, job_id))[-1] == ("running", "failed")


async def test_fail_many_mixed_batch(conn: asyncpg.Connection) -> None:
    a, b, c = [await add(conn) for _ in range(3)]
    term = await new_term(conn)
    await take(conn, term)
    out = await q.fail_many(
        conn,
        term=term,
        failures=[
            q.Failure(a, "oom", "x", retry=True),
            q.Failure(b, "timeout", "y", retry=False),
            q.Failure(c, "model_error", "z" * 10_000, retry=True),
        ],
    )
    assert out == {a: "queued", b: "failed", c: "queued"}
    assert len((await job(conn, c))["error"]["message"]) == 4000
    assert await q.fail_many(conn, term=term, failures=[]) == {}


# -- cancel ------------------------------------------------------------------------------------------


async def test_cancel_queued_is_immediate(conn: asyncpg.Connection) -> None:
    job_id = await add(conn, tenant="acme")
    row, changed = await q.cancel(conn, job_id, tenant="acme", now=T0)
    assert changed and row is not None
    assert row["status"] == "cancelled" and row["finished_at"] == T0
    assert row["error"]["kind"] == "cancelled"
    assert await transitions(conn, job_id) == [(None, "queued"), ("queued", "cancelled")]
    term = await new_term(conn)
    assert await take(conn, term) == []


async def test_cancel_running_requests_and_notifies(
    conn: asyncpg.Connection, listen_conn: asyncpg.Connection
) -> None:
    listener = Listener(listen_conn, sql.CHANNEL_CANCEL)
    await listener.start()
    job_id = await add(conn)
    term = await new_term(conn)
    await take(conn, term)
    await q.start(conn, term=term, job_id=job_id, worker="w", gpu="g")
    row, changed = await q.cancel(conn, job_id, tenant=None, now=T0)
    assert changed and row is not None
    assert row["status"] == "running" and row["cancel_requested_at"] == T0
    assert await listener.next() == str(job_id)
    assert await q.cancel_requests(conn, term=term) == {job_id}
    # Asking twice keeps the first request time and sends nothing new.
    row, changed = await q.cancel(conn, job_id, tenant=None, now=at(5))
    assert row is not None and row["cancel_requested_at"] == T0
    assert await listener.until_sentinel(conn) == []
    assert await q.mark_cancelled(conn, term=term, job_id=job_id, now=at(6))
    done = await job(conn, job_id)
    assert done["status"] == "cancelled" and done["finished_at"] == at(6)
    assert done["error"]["kind"] == "cancelled"
    assert (await transitions(conn, job_id))[-1] == ("running", "cancelled")


async def test_cancel_terminal_and_other_tenant(conn: asyncpg.Connection) -> None:
    job_id = await add(conn, tenant="acme")
    term = await new_term(conn)
    await take(conn, term)
    await q.complete(conn, term=term, job_id=job_id, result={})
    row, changed = await q.cancel(conn, job_id, tenant="acme")
    assert not changed and row is not None and row["status"] == "succeeded"
    assert row["cancel_requested_at"] is None
    queued = await add(conn, tenant="acme")
    assert await q.cancel(conn, queued, tenant="intruder") == (None, False)
    assert (await job(conn, queued))["status"] == "queued"
    assert await q.cancel(conn, uuid.uuid4(), tenant=None) == (None, False)


async def test_rescue_of_cancel_requested_job_cancels_it(conn: asyncpg.Connection) -> None:
    job_id = await add(conn)
    term = await new_term(conn)
    await take(conn, term)
    await q.start(conn, term=term, job_id=job_id, worker="w", gpu="g")
    await q.cancel(conn, job_id, tenant=None)
    (rescued,) = await q.rescue_terms(conn, [term])
    assert rescued["status"] == "cancelled"
    row = await job(conn, job_id)
    assert row["error"]["kind"] == "cancelled" and row["finished_at"] is not None


# -- progress ----------------------------------------------------------------------------------------


async def test_progress_is_throttled_and_pushed(
    conn: asyncpg.Connection, listen_conn: asyncpg.Connection
) -> None:
    listener = Listener(listen_conn, sql.CHANNEL_STATUS)
    await listener.start()
    job_id = await add(conn, now=T0)
    term = await new_term(conn)
    await take(conn, term, now=T0)
    assert not await q.progress(conn, term=term, job_id=job_id, fraction=0.1, now=T0)  # leased, not running
    await q.start(conn, term=term, job_id=job_id, worker="w", gpu="g", now=T0)

    def write(fraction: float, seconds: float) -> Any:
        return q.progress(
            conn,
            term=term,
            job_id=job_id,
            fraction=fraction,
            message=f"{fraction}",
            min_interval_s=1.0,
            now=at(seconds),
        )

    assert await write(0.1, 1.0)
    assert not await write(0.2, 1.5)  # within min_interval of the last write
    assert await write(0.3, 2.0)
    mid = await job(conn, job_id)
    assert (mid["progress"], mid["progress_message"], mid["progress_at"]) == (0.3, "0.3", at(2.0))
    assert await write(1.0, 2.1)  # completion is always written
    assert await write(7.0, 2.2)  # clamped to 1.0, still written
    row = await job(conn, job_id)
    assert row["progress"] == 1.0 and row["progress_message"] == "7.0"
    payloads = [json.loads(p) for p in await listener.until_sentinel(conn)]
    assert all(set(p) == {"id", "status", "progress"} for p in payloads)
    assert all(p["id"] == str(job_id) for p in payloads)
    assert [(p["status"], p["progress"]) for p in payloads] == [
        ("leased", 0),
        ("running", 0),
        ("running", 0.1),
        ("running", 0.3),
        ("running", 1),
    ]


# -- retention ---------------------------------------------------------------------------------------


async def test_prune_deletes_only_old_terminal_jobs(conn: asyncpg.Connection) -> None:
    day = 86_400.0
    term = await new_term(conn)

    async def finished(days_ago: float, how: str) -> uuid.UUID:
        when = T0 - timedelta(days=days_ago)
        job_id = await add(conn, now=when - timedelta(seconds=1))
        await take(conn, term, now=when)
        if how == "succeeded":
            out = q.Output(job_id, "out.glb", 1, "00" * 32, "model/gltf-binary", f"/out/{job_id}.glb")
            await q.complete_many(conn, term=term, results=[(job_id, {})], outputs=[out], now=when)
        elif how == "failed":
            await q.fail(conn, term=term, job_id=job_id, kind="timeout", message="", retry=False, now=when)
        else:
            await q.cancel(conn, job_id, tenant=None, now=when)
            await q.mark_cancelled(conn, term=term, job_id=job_id, now=when)
        return job_id

    old_ok = await finished(40, "succeeded")
    old_failed = await finished(31, "failed")
    old_cancelled = await finished(35, "cancelled")
    recent = await finished(1, "succeeded")
    stale_queued = await add(conn, now=T0 - timedelta(days=90))
    stale_running = await add(conn, now=T0 - timedelta(days=90))
    await take(conn, term, q.Want("m1", "f", 1), now=T0 - timedelta(days=89))

    n, paths = await q.prune(conn, retention_s=30 * day, batch=2, now=T0)
    assert n == 2 and paths == [f"/out/{old_ok}.glb"]  # oldest first
    n, paths = await q.prune(conn, retention_s=30 * day, now=T0)
    assert n == 1 and paths == []
    assert await q.prune(conn, retention_s=30 * day, now=T0) == (0, [])
    left = {r["id"] for r in await conn.fetch("SELECT id FROM jobs")}
    assert left == {recent, stale_queued, stale_running}
    gone = [old_ok, old_failed, old_cancelled]
    assert await conn.fetchval("SELECT count(*) FROM job_events WHERE job_id = ANY($1::uuid[])", gone) == 0
    assert await conn.fetchval("SELECT count(*) FROM files WHERE job_id = ANY($1::uuid[])", gone) == 0
    assert await conn.fetchval("SELECT count(*) FROM files WHERE job_id = $1", recent) == 1


# -- scheduler terms ---------------------------------------------------------------------------------


async def test_terms(conn: asyncpg.Connection) -> None:
    first = await q.open_term(conn, pool=POOL, host="h1", pid=1, snapshot={"gpus": []}, now=T0)
    # The first term holds a job (claimed before a newer term of the pool exists, which fences it).
    job_id = await add(conn)
    await take(conn, first)
    second = await q.open_term(conn, pool=POOL, host="h2", pid=2)
    elsewhere = await q.open_term(conn, pool="other", host="h3", pid=3)
    assert first < second < elsewhere
    assert await q.heartbeat(conn, term=first, snapshot={"gpus": [1]}, now=at(5))
    row = await conn.fetchrow("SELECT heartbeat_at, snapshot FROM schedulers WHERE term = $1", first)
    assert row["heartbeat_at"] == at(5) and row["snapshot"] == {"gpus": [1]}

    # The second term ended cleanly.
    await q.end_term(conn, term=second)
    assert not await q.heartbeat(conn, term=second, snapshot={})
    third = await new_term(conn)
    earlier = await q.earlier_terms(conn, pool=POOL, term=third)
    assert [(r["term"], r["active"], r["ended_at"] is None) for r in earlier] == [(first, 1, True)]

    await q.end_earlier_terms(conn, pool=POOL, term=third, now=at(10))
    assert not await q.heartbeat(conn, term=first, snapshot={})
    earlier = await q.earlier_terms(conn, pool=POOL, term=third)
    assert [(r["term"], r["active"], r["ended_at"]) for r in earlier] == [(first, 1, at(10))]
    assert await q.heartbeat(conn, term=elsewhere, snapshot={})  # another pool is not touched
    assert await q.heartbeat(conn, term=third, snapshot={})

    await q.rescue_terms(conn, [r["term"] for r in earlier])
    assert await q.earlier_terms(conn, pool=POOL, term=third) == []
    assert (await job(conn, job_id))["status"] == "queued"
    await q.end_term(conn, term=third)
    await q.end_term(conn, term=third)  # idempotent
    assert not await q.heartbeat(conn, term=third, snapshot={})
    assert await q.rescue_terms(conn, []) == []


# -- the claim path uses the partial indexes ---------------------------------------------------------


def _plan_nodes(plan: Any) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(_plan_nodes(child))
    return nodes


async def _explain(conn: asyncpg.Connection, query: str, *args: Any) -> list[dict[str, Any]]:
    raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + query, *args)
    doc = json.loads(raw) if isinstance(raw, str) else raw
    return _plan_nodes(doc[0]["Plan"])


def _assert_queued_index_only(nodes: list[dict[str, Any]], what: str) -> None:
    seq = [n for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "jobs"]
    assert not seq, f"{what}: sequential scan of jobs"
    used = {n.get("Index Name") for n in nodes}
    assert used & {"jobs_queued_model_idx", "jobs_queued_idx"}, f"{what}: queued index not used: {used}"


@pytest.mark.timeout(300)
async def test_claim_and_peek_plans_use_the_queued_indexes(conn: asyncpg.Connection) -> None:
    await conn.execute(
        """
        INSERT INTO jobs (tenant, model, feature, status, attempts, finished_at, created_at, run_after)
        SELECT 'default', 'm' || (i % 4), 'f', 'succeeded', 1,
               now() - make_interval(secs => i), now() - make_interval(secs => i + 10),
               now() - make_interval(secs => i + 10)
        FROM generate_series(1, 100000) AS i
        """
    )
    await q.enqueue_many(conn, [q.NewJob(feature="f", model=f"m{i % 4}", priority=i % 3) for i in range(100)])
    await q.enqueue_many(conn, [q.NewJob(feature="f") for _ in range(5)])
    await conn.execute("ANALYZE jobs")
    wants = [q.Want("m1", "f", 32), q.Want("m2", "f", 1)]
    claim_args = (
        1,
        [w.model for w in wants],
        [w.feature for w in wants],
        [w.n for w in wants],
        POOL,
        None,
        TTL,
        ["m1"],
        [1],
        ["w1"],
        ["g1"],
    )
    peek_args = ([w.model for w in wants], [w.feature for w in wants], [w.n for w in wants], POOL, None)
    for mode in ("force_custom_plan", "force_generic_plan"):
        await conn.execute(f"SET plan_cache_mode = {mode}")
        _assert_queued_index_only(await _explain(conn, sql.CLAIM, *claim_args), f"claim ({mode})")
        _assert_queued_index_only(await _explain(conn, sql.PEEK, *peek_args), f"peek ({mode})")
    await conn.execute("RESET plan_cache_mode")
    term = await new_term(conn)
    claimed = await take(conn, term, *wants)
    assert len(claimed) == 25 + 5 + 1  # m1: its 25 jobs and the 5 feature-only ones; m2: one


# -- audit -------------------------------------------------------------------------------------------


async def test_every_audit_trail_is_a_legal_path(conn: asyncpg.Connection) -> None:
    """A scenario with retries, rescues, cancels and releases; every job_events trail stays legal."""
    t1 = await new_term(conn)
    backoff = q.Backoff(base_s=0.001, max_s=0.001)

    retried = await add(conn, now=T0)
    await take(conn, t1, now=T0)
    await q.start(conn, term=t1, job_id=retried, worker="w", gpu="g", now=T0)
    await q.fail(conn, term=t1, job_id=retried, kind="oom", message="", retry=True, backoff=backoff, now=T0)
    await take(conn, t1, now=at(1))
    await q.start(conn, term=t1, job_id=retried, worker="w", gpu="g", now=at(1))
    await q.complete(conn, term=t1, job_id=retried, result={}, now=at(2))

    rescued = await add(conn, now=T0)
    await take(conn, t1, now=at(3))
    await q.start(conn, term=t1, job_id=rescued, worker="w", gpu="g", now=at(3))
    t2 = await new_term(conn)
    await q.rescue_terms(conn, [t1], now=at(4))
    await take(conn, t2, now=at(4))
    await q.start(conn, term=t2, job_id=rescued, worker="w", gpu="g", now=at(4))
    await q.cancel(conn, rescued, tenant=None, now=at(5))
    await q.mark_cancelled(conn, term=t2, job_id=rescued, now=at(6))

    cancelled_queued = await add(conn, now=at(7))
    await q.cancel(conn, cancelled_queued, tenant=None, now=at(7))

    released = await add(conn, now=at(8))
    await take(conn, t2, now=at(8))
    await q.release(conn, term=t2, job_ids=[released])
    await take(conn, t2, now=at(9))
    await q.fail(conn, term=t2, job_id=released, kind="invalid_input", message="", retry=False, now=at(9))

    expired = await add(conn, now=at(10), max_attempts=2)
    for i in range(2):
        await take(conn, t2, now=at(10 + 100 * i), ttl=5)
        await q.start(conn, term=t2, job_id=expired, worker="w", gpu="g", now=at(10 + 100 * i))
        await q.rescue_expired(conn, now=at(20 + 100 * i))

    leased_cancel = await add(conn, now=at(300))
    await take(conn, t2, now=at(300))
    await q.cancel(conn, leased_cancel, tenant=None, now=at(301))
    await q.rescue_expired(conn, now=at(400))

    expected = {
        retried: "succeeded",
        rescued: "cancelled",
        cancelled_queued: "cancelled",
        released: "failed",
        expired: "failed",
        leased_cancel: "cancelled",
    }
    for job_id, status in expected.items():
        assert (await job(conn, job_id))["status"] == status
        assert_legal_path(await q.job_events(conn, job_id), status)
    # Plain SQL over the audit table says the same for every job at once.
    edges = await conn.fetch("SELECT DISTINCT from_status, to_status FROM job_events")
    assert {(e["from_status"], e["to_status"]) for e in edges} <= LEGAL_TRANSITIONS


async def test_a_claim_with_worker_slots_starts_the_jobs_on_those_workers(conn: asyncpg.Connection) -> None:
    ids = [await add(conn, now=at(i)) for i in range(4)]
    feature_only = await add(conn, None, now=at(5))
    term = await new_term(conn)
    rows = await q.claim(
        conn,
        term=term,
        wants=[q.Want("m1", "f", 6)],
        pool=POOL,
        lease_ttl_s=TTL,
        slots={"m1": [("w-a", "g0"), ("w-b", "g1"), ("w-a", "g0")]},
        now=at(10),
    )
    got = {r["id"]: r for r in rows}
    assert set(got) == {*ids, feature_only}
    # Oldest first: the first three jobs take the three slots in order; the rest are only leased.
    assert [(got[i]["status"], got[i]["worker"]) for i in ids[:3]] == [
        ("running", "w-a"),
        ("running", "w-b"),
        ("running", "w-a"),
    ]
    assert [(got[i]["status"], got[i]["worker"]) for i in (ids[3], feature_only)] == [
        ("leased", None),
        ("leased", None),
    ]
    first = await job(conn, ids[1])
    assert first["gpu"] == "g1" and first["started_at"] == at(10) and first["attempts"] == 1
    events = await q.job_events(conn, ids[1])
    assert [(e["from_status"], e["to_status"], e["worker"]) for e in events] == [
        (None, "queued", None),
        ("queued", "running", "w-b"),
    ]
    # A job claimed into running is completed like any other; a slot-less one still starts first.
    assert await q.complete_many(conn, term=term, results=[(ids[0], {"ok": 1})], now=at(11)) == {ids[0]}
    assert await q.start_many(conn, term=term, started=[(ids[3], "w-b", "g1")]) == {ids[3]}
    assert await q.start_many(conn, term=term, started=[(ids[2], "w-b", "g1")]) == set()  # running already
