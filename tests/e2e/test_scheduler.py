"""The scheduler with real processes: candidates (``python -m scheduler``), GPU worker subprocesses on the
``fake:`` probe, a real PostgreSQL. Failover, crashes, cancel, timeouts, VRAM placement, several pools."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from db import queue as q
from tests.procs import (
    Proc,
    executions,
    models_file,
    overlapping,
    pid_gone,
    processes,
    start_scheduler,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)


async def leader(conn: asyncpg.Connection, pool: str) -> Any:
    return await conn.fetchrow(
        "SELECT term, pid, snapshot FROM schedulers WHERE pool = $1 AND ended_at IS NULL "
        "ORDER BY term DESC LIMIT 1",
        pool,
    )


async def job(conn: asyncpg.Connection, job_id: uuid.UUID) -> Any:
    return await q.get_job(conn, job_id)


async def worker_pid_of(conn: asyncpg.Connection, pool: str, job_id: uuid.UUID) -> int | None:
    row = await leader(conn, pool)
    if row is None:
        return None
    for w in (row["snapshot"] or {}).get("workers", []):
        if w.get("job") == str(job_id):
            return int(w["pid"])
    return None


def submit(seconds: float, **kw: Any) -> q.NewJob:
    return q.NewJob(feature="demo", model=kw.pop("model", "demo.sleep"), inputs={"seconds": seconds}, **kw)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    rec = tmp_path / "executions"
    return {
        "data": tmp_path / "data",
        "rec": rec,
        "models": models_file(tmp_path / "models.yaml"),
        "log": tmp_path,
    }


def sched(dsn: str, env: dict[str, Any], name: str, pool: str = "p1", **extra: str) -> Proc:
    return start_scheduler(
        dsn,
        env["data"],
        env["log"] / f"{name}.log",
        VRAMQ_POOL=pool,
        VRAMQ_GPUS=extra.pop("gpus", "fake:1x24GiB"),
        VRAMQ_MODELS_FILE=str(extra.pop("models", env["models"])),
        VRAMQ_DEMO_RECORD_DIR=str(env["rec"]),
        VRAMQ_LEASE_TTL_S=extra.pop("ttl", "10"),
        VRAMQ_LEASE_EXTEND_INTERVAL_S="1",
        VRAMQ_HEARTBEAT_INTERVAL_S="0.5",
        VRAMQ_SHUTDOWN_GRACE_S="5",
        VRAMQ_CANCEL_GRACE_S="0.5",
        **extra,
    )


async def test_leader_failover_rescues_the_running_job(dsn: str, conn: asyncpg.Connection, env: Any) -> None:
    with processes() as procs:
        procs += [sched(dsn, env, "a"), sched(dsn, env, "b")]
        first = await wait_for(lambda: leader(conn, "p1"), timeout=30, what="a leader")
        assert first["pid"] in {p.pid for p in procs}
        # Exactly one leads: the other is blocked on the lock.
        locks = await conn.fetch(
            "SELECT l.classid, l.objid, l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()"
        )
        assert len(locks) == 1, [dict(r) for r in locks]

        created, _ = await q.enqueue(conn, submit(2.0))
        jid = created["id"]
        await wait_for(lambda: worker_pid_of(conn, "p1", jid), timeout=30, what="the job running on a worker")
        wpid = await worker_pid_of(conn, "p1", jid)
        assert wpid is not None
        killed = time.time()
        os.kill(first["pid"], signal.SIGKILL)

        async def new_leader() -> Any:
            row = await leader(conn, "p1")
            return row if row is not None and row["term"] != first["term"] else None

        second = await wait_for(new_leader, timeout=5, what="a new leader")
        took = time.time() - killed
        assert second["pid"] != first["pid"]
        assert took < 3.0, f"failover took {took:.2f}s"

        # The dead leader's worker died with it.
        await wait_for(lambda: _async(pid_gone(wpid)), timeout=5, what="the old worker to exit")

        done = await wait_for(lambda: _terminal(conn, jid), timeout=60, what="the rescued job to finish")
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2
        runs = executions(env["rec"])
        assert overlapping(runs, killed_at={wpid: killed}) == []
        assert sum(1 for r in runs if r.get("outcome") == "ok") == 1


async def _async(v: Any) -> Any:
    return v


async def _terminal(conn: asyncpg.Connection, jid: uuid.UUID) -> Any:
    row = await job(conn, jid)
    return row if row is not None and row["status"] in ("succeeded", "failed", "cancelled") else None


async def test_worker_crash_is_retried_and_the_worker_replaced(
    dsn: str, conn: asyncpg.Connection, env: Any
) -> None:
    with processes() as procs:
        procs.append(sched(dsn, env, "a"))
        created, _ = await q.enqueue(conn, submit(2.0))
        jid = created["id"]
        wpid = await wait_for(lambda: worker_pid_of(conn, "p1", jid), timeout=30, what="job on a worker")
        killed = time.time()
        os.kill(wpid, signal.SIGKILL)
        done = await wait_for(lambda: _terminal(conn, jid), timeout=60, what="the retried job")
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2
        events = await q.job_events(conn, jid)
        crash = [e for e in events if e["to_status"] == "queued" and e["from_status"] == "running"]
        assert crash and crash[0]["detail"]["error"]["kind"] == "worker_crashed"
        # Later jobs of that model run normally, on a new worker.
        later = [(await q.enqueue(conn, submit(0.05)))[0]["id"] for _ in range(3)]
        for lj in later:
            row = await wait_for(lambda lj=lj: _terminal(conn, lj), timeout=30, what="a later job")
            assert row["status"] == "succeeded"
            assert row["result"]["pid"] != wpid
        assert overlapping(executions(env["rec"]), killed_at={wpid: killed}) == []


async def test_cancel_running_job_stops_it_within_a_second(
    dsn: str, conn: asyncpg.Connection, env: Any
) -> None:
    with processes() as procs:
        procs.append(sched(dsn, env, "a"))
        created, _ = await q.enqueue(conn, submit(30.0))
        jid = created["id"]
        await wait_for(lambda: worker_pid_of(conn, "p1", jid), timeout=30, what="job on a worker")
        t0 = time.monotonic()
        row, changed = await q.cancel(conn, jid, tenant=None)
        assert changed and row is not None and row["status"] == "running"
        done = await wait_for(lambda: _terminal(conn, jid), timeout=5, interval=0.01, what="cancelled")
        took = time.monotonic() - t0
        assert done["status"] == "cancelled"
        assert done["error"]["kind"] == "cancelled"
        assert took < 1.0, f"cancel took {took:.2f}s"
        runs = [r for r in executions(env["rec"]) if r["job_id"] == str(jid)]
        assert len(runs) == 1 and runs[0]["outcome"] == "cancelled" and runs[0]["end"] is not None


async def test_timeout_fails_the_job_and_stops_its_worker(
    dsn: str, conn: asyncpg.Connection, env: Any
) -> None:
    with processes() as procs:
        procs.append(sched(dsn, env, "a"))
        created, _ = await q.enqueue(conn, submit(60.0, timeout_s=1.0))
        jid = created["id"]
        wpid = await wait_for(lambda: worker_pid_of(conn, "p1", jid), timeout=30, what="job on a worker")
        done = await wait_for(lambda: _terminal(conn, jid), timeout=20, what="the timeout")
        assert done["status"] == "failed"
        assert done["error"]["kind"] == "timeout"
        await wait_for(lambda: _async(pid_gone(wpid)), timeout=5, what="the worker to be gone")


async def test_vram_placement_on_one_24gib_gpu(dsn: str, conn: asyncpg.Connection, env: Any) -> None:
    models = models_file(
        env["log"] / "vram.yaml",
        extra=[
            {"id": "big16", "vram_mb": 16384, "max_workers": 1},
            {"id": "mid12", "vram_mb": 12288, "max_workers": 1},
            {"id": "tiny", "vram_mb": 256, "max_workers": 1},
        ],
    )
    with processes() as procs:
        procs.append(sched(dsn, env, "a", models=str(models)))
        # A big job, then a 12 GiB one: the 16 GiB worker, idle after its job, is evicted for it.
        big, _ = await q.enqueue(conn, submit(0.5, model="big16"))
        await wait_for(lambda: _terminal(conn, big["id"]), timeout=60, what="big16 job")
        mid, _ = await q.enqueue(conn, submit(0.5, model="mid12"))
        done = await wait_for(lambda: _terminal(conn, mid["id"]), timeout=60, what="mid12 job")
        assert done["status"] == "succeeded"
        snap = (await leader(conn, "p1"))["snapshot"]
        assert {w["model"] for w in snap["workers"]} <= {"mid12"}

        # A long big16 job keeps the GPU busy; a second big16 job and a mid12 job cannot fit, but a
        # tiny job queued behind them (lower priority) must not wait.
        long_big, _ = await q.enqueue(conn, submit(4.0, model="big16", priority=5))
        await wait_for(lambda: worker_pid_of(conn, "p1", long_big["id"]), timeout=60, what="long big16")
        blocked, _ = await q.enqueue(conn, submit(0.1, model="mid12", priority=5))
        small, _ = await q.enqueue(conn, submit(0.1, model="tiny", priority=0))
        s_done = await wait_for(lambda: _terminal(conn, small["id"]), timeout=30, what="the tiny job")
        assert s_done["status"] == "succeeded"
        lb = await job(conn, long_big["id"])
        assert lb["status"] == "running", "the tiny job had to wait for the big one"
        b_done = await wait_for(lambda: _terminal(conn, blocked["id"]), timeout=60, what="blocked mid12")
        assert b_done["status"] == "succeeded"

    # 16 GiB and 12 GiB never ran at the same time.
    runs = executions(env["rec"])
    models_of = {
        str(r["id"]): r["model"]
        for r in await conn.fetch("SELECT id, model FROM jobs WHERE model IN ('big16', 'mid12')")
    }
    big_runs = [r for r in runs if models_of.get(r["job_id"]) == "big16"]
    mid_runs = [r for r in runs if models_of.get(r["job_id"]) == "mid12"]
    for a in big_runs:
        for b in mid_runs:
            assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)


async def test_two_pools_share_one_database(dsn: str, conn: asyncpg.Connection, env: Any) -> None:
    with processes() as procs:
        procs += [sched(dsn, env, "a", pool="gpu-a"), sched(dsn, env, "b", pool="gpu-b")]
        await wait_for(lambda: leader(conn, "gpu-a"), timeout=30, what="leader of gpu-a")
        await wait_for(lambda: leader(conn, "gpu-b"), timeout=30, what="leader of gpu-b")
        ids = await q.enqueue_many(conn, [submit(0.2) for _ in range(40)])

        async def all_done() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) AND status = 'succeeded'", ids
            )
            return bool(n == len(ids))

        await wait_for(all_done, timeout=90, what="all 40 jobs")
        terms = await conn.fetch(
            "SELECT s.pool, count(DISTINCT e.job_id) AS jobs FROM job_events e "
            "JOIN schedulers s ON s.term = e.lease_owner WHERE e.to_status = 'running' GROUP BY s.pool"
        )
        assert {t["pool"] for t in terms} == {"gpu-a", "gpu-b"}, terms
        runs = await conn.fetch(
            "SELECT job_id, count(*) AS n FROM job_events WHERE to_status = 'running' GROUP BY job_id"
        )
        assert len(runs) == 40 and all(r["n"] == 1 for r in runs)
        assert overlapping(executions(env["rec"])) == []


async def test_workers_of_a_frozen_leader_stop_before_its_leases_expire(
    dsn: str, conn: asyncpg.Connection, env: Any
) -> None:
    with processes() as procs:
        procs.append(sched(dsn, env, "a", ttl="4"))
        leader_pid = procs[0].pid
        created, _ = await q.enqueue(conn, submit(30.0))
        jid = created["id"]
        wpid = await wait_for(lambda: worker_pid_of(conn, "p1", jid), timeout=30, what="job on a worker")
        row = await job(conn, jid)
        os.kill(leader_pid, signal.SIGSTOP)
        try:
            # The worker fences itself at 0.6 x the lease TTL after the last renewal: before the lease
            # expires, so a rescue elsewhere can never overlap with it.
            await wait_for(
                lambda: _async(pid_gone(wpid)), timeout=8, what="the frozen leader's worker to exit"
            )
            expires = (await job(conn, jid))["lease_expires_at"]
            assert expires >= row["lease_expires_at"]
            assert await conn.fetchval("SELECT now() < $1::timestamptz + interval '1 second'", expires)
        finally:
            os.kill(leader_pid, signal.SIGCONT)
        # Once thawed, the leader notices its leases went stale, steps down, and the job runs again.
        await conn.execute("UPDATE jobs SET inputs = '{\"seconds\": 0.2}' WHERE id = $1", jid)
        done = await wait_for(lambda: _terminal(conn, jid), timeout=60, what="the job to run again")
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2


async def test_killing_workers_that_hold_queues_of_short_jobs(
    dsn: str, conn: asyncpg.Connection, env: Any, tmp_path: Path
) -> None:
    """Workers of a millisecond model hold several jobs each; a worker SIGKILLed mid-drain costs an
    attempt only to the job it was running, the jobs queued behind it run later, none twice at once."""
    n, kills = 2000, 3
    models = models_file(tmp_path / "short.yaml", max_workers=2)
    with processes() as procs:
        procs.append(sched(dsn, env, "a", models=models))
        await q.enqueue_many(conn, [submit(0) for _ in range(n)])
        killed: dict[int, float] = {}
        for k in range(1, kills + 1):

            async def progressed(k: int = k) -> bool:
                done = await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
                return bool(done >= k * n // (kills + 2))

            await wait_for(progressed, timeout=60, what=f"{k}/{kills + 2} of the jobs done")

            async def busy_worker() -> int | None:
                row = await leader(conn, "p1")
                pids = [w["pid"] for w in (row["snapshot"] or {}).get("workers", []) if w.get("job")]
                return next((int(p) for p in pids if p not in killed), None) if row else None

            wpid = await wait_for(busy_worker, timeout=30, what="a busy worker not killed yet")
            killed[wpid] = time.time()
            os.kill(wpid, signal.SIGKILL)

        async def all_done() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'succeeded'") == n)

        await wait_for(all_done, timeout=120, what="every job succeeded")
        retried = await conn.fetchval("SELECT count(*) FROM jobs WHERE attempts > 1")
        assert retried <= kills, f"{retried} jobs lost an attempt to {kills} worker crashes"
        # (The jobs queued on a killed worker went back to the queue without losing an attempt: how
        # many depends on how full its queue was at that instant; tests/unit/test_workerpool.py pins
        # the attribution down.)
        runs = executions(env["rec"])
        ids = {str(r["id"]) for r in await conn.fetch("SELECT id FROM jobs")}
        assert len(ids) == n and {r["job_id"] for r in runs} == ids
        assert overlapping(runs, killed_at=killed) == []
