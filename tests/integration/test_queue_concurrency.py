"""Claims under contention: separate OS processes and concurrent connections never share a job.

The multi-process test runs this module as a script (``python -m tests.integration.test_queue_concurrency
DSN TERM BATCH``): each child opens its own connection, says ``ready``, waits for ``go`` on stdin so that
all of them start at once, claims until the queue is empty and prints the ids it got as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from core.types import LEGAL_TRANSITIONS
from db import queue as q
from db.connect import connect

ROOT = Path(__file__).resolve().parents[2]
POOL = "p1"
STARTUP_DEADLINE_S = 60.0
RUN_DEADLINE_S = 180.0


async def _claim_until_empty(
    conn: asyncpg.Connection, term: int, wants: list[q.Want], *, complete: bool
) -> list[uuid.UUID]:
    """Claim batches until nothing is queued any more; optionally complete each batch at once."""
    got: list[uuid.UUID] = []
    # Each claimer leads a pool of its own (a newer term of the same pool would fence the older ones
    # off); the jobs name no pool, so every pool may take them.
    pool = await conn.fetchval("SELECT pool FROM schedulers WHERE term = $1", term)
    while True:
        rows = await q.claim(conn, term=term, wants=wants, pool=pool, lease_ttl_s=300)
        if rows:
            ids = [r["id"] for r in rows]
            got.extend(ids)
            if complete:
                done = await q.complete_many(conn, term=term, results=[(i, {"by": term}) for i in ids])
                assert done == set(ids)
            continue
        # Empty: either the queue is drained, or every remaining row is locked by another claimer for
        # the moment (SKIP LOCKED passes over them). Only the first ends the loop.
        if await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'queued'") == 0:
            return got


async def _child(dsn: str, term: int, batch: int) -> None:
    conn = await connect(dsn)
    try:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        ids = await _claim_until_empty(conn, term, [q.Want("m1", "f", batch)], complete=False)
        print(json.dumps([str(i) for i in ids]), flush=True)
    finally:
        await conn.close()


async def _spawn_claimer(dsn: str, term: int, batch: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.test_queue_concurrency",
        dsn,
        str(term),
        str(batch),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 24,
    )


@pytest.mark.timeout(300)
async def test_processes_claim_every_job_exactly_once(conn: asyncpg.Connection, dsn: str) -> None:
    total, procs_n, batch = 10_000, 8, 50
    for start in range(0, total, 2_000):
        await q.enqueue_many(
            conn, [q.NewJob(feature="f", model="m1", inputs={"i": i}) for i in range(start, start + 2_000)]
        )
    terms = [await q.open_term(conn, pool=f"{POOL}-{i}", host="h", pid=1000 + i) for i in range(procs_n)]
    procs = [await _spawn_claimer(dsn, t, batch) for t in terms]
    try:
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), STARTUP_DEADLINE_S)
            assert line.strip() == b"ready", line
        for p in procs:  # release them together
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), RUN_DEADLINE_S)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    claimed: dict[int, list[uuid.UUID]] = {}
    for term, p, (stdout, stderr) in zip(terms, procs, outs, strict=True):
        assert p.returncode == 0, stderr.decode()
        claimed[term] = [uuid.UUID(s) for s in json.loads(stdout)]

    every = [i for ids in claimed.values() for i in ids]
    dupes = [i for i, n in Counter(every).items() if n > 1]
    assert not dupes, f"{len(dupes)} jobs claimed twice"
    rows = await conn.fetch("SELECT id, status, attempts, lease_owner FROM jobs")
    assert len(rows) == total and set(every) == {r["id"] for r in rows}
    owner = {i: term for term, ids in claimed.items() for i in ids}
    assert all(r["status"] == "leased" and r["attempts"] == 1 for r in rows)
    assert all(r["lease_owner"] == owner[r["id"]] for r in rows)
    assert await conn.fetchval("SELECT count(*) FROM job_events WHERE to_status = 'leased'") == total
    # With 8 claimers on a shared queue, the work is actually spread (not one process taking it all).
    assert sum(1 for ids in claimed.values() if ids) >= 2


@pytest.mark.timeout(300)
async def test_concurrent_claimers_completing_as_they_go(conn: asyncpg.Connection, dsn: str) -> None:
    """8 connections claim (two models plus feature-only jobs) and complete; each job runs once."""
    jobs = [q.NewJob(feature="f", model=("m1", "m2", None)[i % 3], inputs={"i": i}) for i in range(3_000)]
    for start in range(0, len(jobs), 1_000):
        await q.enqueue_many(conn, jobs[start : start + 1_000])
    wants = [q.Want("m1", "f", 20), q.Want("m2", "f", 20)]
    conns = [await connect(dsn) for _ in range(8)]
    try:
        terms = [await q.open_term(c, pool=f"{POOL}-{i}", host="h", pid=i) for i, c in enumerate(conns)]
        go = asyncio.Event()

        async def worker(c: asyncpg.Connection, term: int) -> list[uuid.UUID]:
            await go.wait()
            return await _claim_until_empty(c, term, wants, complete=True)

        tasks = [asyncio.create_task(worker(c, t)) for c, t in zip(conns, terms, strict=True)]
        go.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), RUN_DEADLINE_S)
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    every = [i for ids in results for i in ids]
    assert len(every) == len(set(every)) == len(jobs)
    rows = await conn.fetch("SELECT status, attempts, model, count(*) AS n FROM jobs GROUP BY 1, 2, 3")
    assert {(r["status"], r["attempts"]) for r in rows} == {("succeeded", 1)}
    assert {r["model"] for r in rows} == {"m1", "m2"}  # feature-only jobs took the model that ran them
    paths = await conn.fetch(
        """SELECT array_agg(coalesce(from_status, '') || '>' || to_status ORDER BY id) AS path, count(*) AS n
           FROM job_events GROUP BY job_id"""
    )
    assert len(paths) == len(jobs)
    assert {tuple(r["path"]) for r in paths} == {(">queued", "queued>leased", "leased>succeeded")}


@pytest.mark.timeout(120)
async def test_cancel_racing_claims_has_one_outcome(conn: asyncpg.Connection, dsn: str) -> None:
    """Cancels of queued jobs race with claims: each job is cancelled or leased with the request set."""
    ids = await q.enqueue_many(conn, [q.NewJob(feature="f", model="m1") for _ in range(400)])
    conns = [await connect(dsn) for _ in range(5)]
    try:
        terms = [await q.open_term(c, pool=f"{POOL}-{i}", host="h", pid=i) for i, c in enumerate(conns[:4])]
        go = asyncio.Event()

        async def claimer(c: asyncpg.Connection, term: int) -> list[uuid.UUID]:
            await go.wait()
            return await _claim_until_empty(c, term, [q.Want("m1", "f", 10)], complete=False)

        async def canceller(c: asyncpg.Connection) -> list[Any]:
            await go.wait()
            return [await q.cancel(c, i, tenant=None) for i in ids]

        claims = [asyncio.create_task(claimer(c, t)) for c, t in zip(conns, terms, strict=False)]
        cancels = asyncio.create_task(canceller(conns[4]))
        go.set()
        claimed = await asyncio.wait_for(asyncio.gather(*claims), RUN_DEADLINE_S)
        cancelled = await asyncio.wait_for(cancels, RUN_DEADLINE_S)
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    assert all(changed for _, changed in cancelled)
    taken = {i for batch in claimed for i in batch}
    rows = {r["id"]: r for r in await conn.fetch("SELECT * FROM jobs")}
    for job_id, row in rows.items():
        if job_id in taken:
            # Claimed first; the cancel then asked its leader (the claim itself clears older requests).
            assert row["status"] == "leased" and row["cancel_requested_at"] is not None
        else:
            assert row["status"] == "cancelled" and row["error"]["kind"] == "cancelled"
    edges = await conn.fetch("SELECT DISTINCT from_status, to_status FROM job_events")
    assert {(e["from_status"], e["to_status"]) for e in edges} <= LEGAL_TRANSITIONS


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
