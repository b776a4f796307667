"""The job store's own speed: claim latency with a deep queue, and enqueue throughput.

    python -m bench.db_bench                                  # embedded server (VRAMQ_DATA_DIR)
    python -m bench.db_bench --dsn postgresql://postgres@127.0.0.1:5432/postgres
    python -m bench.db_bench --finished --json out.json       # plus 1,000,000 finished rows

Each run creates a fresh database on the server (migrated with ``db.migrate.upgrade``), measures, and
drops it. Measures, each bounded by ``--seconds``:

``claim n=1`` / ``claim n=32``  latency of ``db.queue.claim`` for one model with ``--queued`` runnable rows
                               present (and, with ``--finished``, that many finished rows too). Every
                               claimed job is completed and replaced by a new one outside the timing,
                               so the queue stays at the same depth.
``enqueue single``             ``db.queue.enqueue`` calls one after the other on one connection.
``enqueue batch``              ``db.queue.enqueue_many`` with ``--batch`` jobs per call.
``enqueue single x8``          single enqueues from 8 connections at once (total rows/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from db import migrate
from db import queue as q
from db.connect import connect
from db.dsn import plain_dsn, redacted, with_database
from db.embedded import embedded_server, resolve_dsn

MODEL, FEATURE, POOL = "bench.noop", "bench", "bench"
WARMUP = 20
CONCURRENCY = 8

# Filler rows go in with triggers off (session_replication_role): they stand for history, not events.
FILL_FINISHED = """
INSERT INTO jobs (tenant, model, feature, status, attempts, progress, result,
                  created_at, run_after, started_at, finished_at)
SELECT 'bench', $2, $3, 'succeeded', 1, 1, '{}'::jsonb,
       now() - make_interval(secs => i + 2), now() - make_interval(secs => i + 2),
       now() - make_interval(secs => i + 1), now() - make_interval(secs => i)
FROM generate_series(1, $1::int) AS i
"""
FILL_QUEUED = """
INSERT INTO jobs (tenant, model, feature, inputs, created_at, run_after)
SELECT 'bench', $2, $3, jsonb_build_object('i', i),
       now() - make_interval(secs => $1::int - i), now() - make_interval(secs => $1::int - i)
FROM generate_series(1, $1::int) AS i
"""


def job(i: int) -> q.NewJob:
    return q.NewJob(feature=FEATURE, model=MODEL, inputs={"i": i}, tenant="bench")


def summary_ms(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, round(p / 100 * (len(ms) - 1)))]

    return {
        "count": len(ms),
        "p50_ms": round(pct(50), 3),
        "p90_ms": round(pct(90), 3),
        "p99_ms": round(pct(99), 3),
        "max_ms": round(ms[-1], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


async def fill(conn: asyncpg.Connection, query: str, rows: int) -> float:
    t0 = time.perf_counter()
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        for start in range(0, rows, 200_000):
            await conn.execute(query, min(200_000, rows - start), MODEL, FEATURE)
    await conn.execute("VACUUM ANALYZE jobs")
    return time.perf_counter() - t0


async def measure_claim(conn: asyncpg.Connection, term: int, n: int, seconds: float) -> dict[str, float]:
    """Timed claims; each batch is completed and replaced untimed so the depth does not change."""
    wants = [q.Want(MODEL, FEATURE, n)]
    samples: list[float] = []
    counter = 0
    deadline = time.perf_counter() + seconds
    for i in range(10**9):
        t0 = time.perf_counter()
        rows = await q.claim(conn, term=term, wants=wants, pool=POOL, lease_ttl_s=60)
        elapsed = time.perf_counter() - t0
        if len(rows) != n:
            raise RuntimeError(f"claim returned {len(rows)} jobs, expected {n}: is the queue deep enough?")
        if i >= WARMUP:
            samples.append(elapsed)
        await q.complete_many(conn, term=term, results=[(r["id"], {}) for r in rows])
        await q.enqueue_many(conn, [job(counter + k) for k in range(n)])
        counter += n
        if time.perf_counter() > deadline and len(samples) >= 100:
            break
    return summary_ms(samples)


async def measure_enqueue_single(conn: asyncpg.Connection, seconds: float) -> dict[str, float]:
    for i in range(WARMUP):
        await q.enqueue(conn, job(i))
    count = 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        for _ in range(50):
            await q.enqueue(conn, job(count))
            count += 1
    return {"rows": count, "seconds": round(elapsed, 3), "rows_per_s": round(count / elapsed, 1)}


async def measure_enqueue_batch(conn: asyncpg.Connection, seconds: float, batch: int) -> dict[str, float]:
    await q.enqueue_many(conn, [job(i) for i in range(batch)])
    count = 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        jobs = [job(count + k) for k in range(batch)]
        await q.enqueue_many(conn, jobs)
        count += batch
    return {
        "rows": count,
        "calls": count // batch,
        "seconds": round(elapsed, 3),
        "rows_per_s": round(count / elapsed, 1),
    }


async def measure_enqueue_concurrent(dsn: str, seconds: float) -> dict[str, float]:
    conns = [await connect(dsn) for _ in range(CONCURRENCY)]
    try:
        for c in conns:
            await q.enqueue(c, job(0))
        counts = [0] * CONCURRENCY
        start = asyncio.Event()

        async def one(k: int, c: asyncpg.Connection) -> None:
            await start.wait()
            while time.perf_counter() < deadline:
                await q.enqueue(c, job(counts[k]))
                counts[k] += 1

        tasks = [asyncio.create_task(one(k, c)) for k, c in enumerate(conns)]
        t0 = time.perf_counter()
        deadline = t0 + seconds
        start.set()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    total = sum(counts)
    return {
        "rows": total,
        "connections": CONCURRENCY,
        "seconds": round(elapsed, 3),
        "rows_per_s": round(total / elapsed, 1),
    }


async def run(dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    conn = await connect(dsn)
    try:
        server = await conn.fetchval("SHOW server_version")
        setup: dict[str, float] = {}
        if args.finished:
            setup["finished_fill_s"] = round(await fill(conn, FILL_FINISHED, args.finished_rows), 2)
        setup["queued_fill_s"] = round(await fill(conn, FILL_QUEUED, args.queued), 2)
        term = await q.open_term(conn, pool=POOL, host=platform.node(), pid=0)
        results: dict[str, Any] = {}

        async def step(name: str, fn: Callable[[], Awaitable[dict[str, float]]]) -> None:
            print(f"  {name} ...", end="", flush=True, file=sys.stderr)
            results[name] = await fn()
            print(f" {results[name]}", file=sys.stderr)

        await step("claim_n1", lambda: measure_claim(conn, term, 1, args.seconds))
        await step("claim_n32", lambda: measure_claim(conn, term, 32, args.seconds))
        await step("enqueue_single", lambda: measure_enqueue_single(conn, args.seconds))
        await step("enqueue_batch", lambda: measure_enqueue_batch(conn, args.seconds, args.batch))
        await step("enqueue_single_x8", lambda: measure_enqueue_concurrent(dsn, args.seconds))
        queued = await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'queued'")
        return {
            "server_version": server,
            "queued_at_start": args.queued,
            "finished_rows": args.finished_rows if args.finished else 0,
            "queued_at_end": queued,
            "setup": setup,
            "results": results,
        }
    finally:
        await conn.close()


def report(out: dict[str, Any]) -> None:
    r = out["results"]
    print(f"\nvramq job store on PostgreSQL {out['server_version']} ({out['target']})")
    print(f"  queued rows: {out['queued_at_start']:,}   finished rows: {out['finished_rows']:,}")
    for name in ("claim_n1", "claim_n32"):
        s = r[name]
        print(
            f"  {name:<18} p50 {s['p50_ms']:8.3f} ms   p99 {s['p99_ms']:8.3f} ms   "
            f"mean {s['mean_ms']:8.3f} ms   ({s['count']} claims)"
        )
    for name in ("enqueue_single", "enqueue_batch", "enqueue_single_x8"):
        s = r[name]
        print(f"  {name:<18} {s['rows_per_s']:>12,.0f} rows/s   ({s['rows']:,} rows in {s['seconds']} s)")


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    base = resolve_dsn(args.dsn)
    admin_dsn = with_database(plain_dsn(base), "postgres")
    name = f"vramq_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = with_database(plain_dsn(base), name)
        try:
            await asyncio.to_thread(migrate.upgrade, dsn)
            out = await run(dsn, args)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    out["target"] = redacted(base) if args.dsn else "embedded"
    out["params"] = {"seconds": args.seconds, "batch": args.batch}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.db_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="a PostgreSQL server to use (default: VRAMQ_DATABASE_URL, else embedded)")
    p.add_argument("--queued", type=int, default=100_000, help="runnable jobs present while claiming")
    p.add_argument("--finished", action="store_true", help="also keep finished rows in the table")
    p.add_argument("--finished-rows", type=int, default=1_000_000)
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each measure (max 20)")
    p.add_argument("--batch", type=int, default=1_000, help="jobs per enqueue_many call")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    args.seconds = min(max(args.seconds, 1.0), 20.0)
    if args.queued < 1_000:
        p.error("--queued must be at least 1000")
    try:
        out = asyncio.run(amain(args))
    finally:
        if not args.dsn:
            from core.settings import get_settings

            if not get_settings().database_url:
                embedded_server(get_settings().data_dir).release()
    report(out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
