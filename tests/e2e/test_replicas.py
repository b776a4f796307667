"""Identical replicas: ``uvicorn api.main:app --workers 3`` on a fresh database, every worker a scheduler
candidate. One leader; 200 jobs submitted through the workers all succeed exactly once; every worker
reports the same leader; SSE delivers each job's transitions in order."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.procs import base_env, free_port, models_file, processes, spawn, wait_for

pytestmark = pytest.mark.timeout(300)


def fresh_client(base: str) -> httpx.AsyncClient:
    # No keep-alive: each request is a new connection, which the kernel hands to any of the workers.
    return httpx.AsyncClient(base_url=base, timeout=30, limits=httpx.Limits(max_keepalive_connections=0))


async def sse_statuses(base: str, job_id: str, subscribed: asyncio.Event) -> list[str]:
    statuses: list[str] = []
    async with (
        httpx.AsyncClient(base_url=base, timeout=60) as client,
        client.stream("GET", f"/api/v1/jobs/{job_id}/events") as resp,
    ):
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                data = json.loads(line[5:])
                subscribed.set()
                if not statuses or statuses[-1] != data["status"]:
                    statuses.append(data["status"])
    return statuses


async def test_three_workers_one_leader_all_jobs_once(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = base_env(
        dsn,
        tmp_path / "data",
        VRAMQ_POOL="replicas",
        VRAMQ_GPUS="fake:1x24GiB",
        VRAMQ_MODELS_FILE=str(models_file(tmp_path / "models.yaml", max_workers=3)),
        VRAMQ_HEARTBEAT_INTERVAL_S="0.5",
        VRAMQ_SSE_POLL_INTERVAL_S="30",
    )
    args = [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port), "--workers", "3"]
    with processes() as procs:
        procs.append(spawn(args, env, tmp_path / "uvicorn.log"))

        async def ready() -> bool:
            try:
                async with fresh_client(base) as c:
                    return (await c.get("/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(ready, timeout=60, what="the API to be ready")

        # Exactly one leader among the three candidates.
        async def one_leader() -> Any:
            rows = await conn.fetch(
                "SELECT term, pid FROM schedulers WHERE pool = 'replicas' AND ended_at IS NULL"
            )
            return rows if len(rows) == 1 else None

        (lead,) = await wait_for(one_leader, timeout=30, what="one leader")

        # Every worker answers with that leader.
        replicas: set[str] = set()
        async with fresh_client(base) as c:
            for _ in range(60):
                r = await c.get("/api/v1/system/status")
                assert r.status_code == 200
                replicas.add(r.headers["x-vramq-replica"])
                leaders = r.json()["leaders"]
                assert [(x["pool"], x["term"], x["pid"]) for x in leaders] == [
                    ("replicas", lead["term"], lead["pid"])
                ]
                if len(replicas) == 3:
                    break
        assert len(replicas) == 3, f"requests reached only {replicas}"

        async with fresh_client(base) as c:
            # Occupy the three workers, so the jobs followed over SSE stay queued until subscribed.
            blockers = []
            for _ in range(3):
                r = await c.post("/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": 2}})
                blockers.append(r.json()["id"])

            async def busy() -> bool:
                n = await conn.fetchval(
                    "SELECT count(*) FROM jobs WHERE status = 'running' AND id = ANY($1::uuid[])", blockers
                )
                return bool(n == 3)

            await wait_for(busy, timeout=60, what="three busy workers")
            ids: list[str] = list(blockers)
            watched_ids = []
            for _ in range(3):
                r = await c.post("/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": 0}})
                watched_ids.append(r.json()["id"])
            subscribed = [asyncio.Event() for _ in watched_ids]
            watched = asyncio.gather(
                *(sse_statuses(base, j, e) for j, e in zip(watched_ids, subscribed, strict=True))
            )
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in subscribed)), 30)
            ids += watched_ids
            # 200 more jobs through all the workers.
            via: set[str] = set()
            for i in range(200):
                r = await c.post(
                    "/api/v1/jobs",
                    json={"model": "demo.sleep", "inputs": {"seconds": 0.01 if i % 10 else 0.2}},
                )
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
                via.add(r.headers["x-vramq-replica"])
        assert len(via) == 3

        async def all_done() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE status = 'succeeded' AND id = ANY($1::uuid[])", ids
            )
            return bool(n == len(ids))

        await wait_for(all_done, timeout=180, interval=0.2, what="all jobs to succeed")
        runs = await conn.fetch(
            "SELECT job_id, count(*) AS n FROM job_events WHERE to_status = 'running' GROUP BY job_id"
        )
        twice = [r["job_id"] for r in runs if r["n"] != 1]
        assert len(runs) == len(ids) and not twice, (twice, procs[0].output().splitlines()[-40:])
        assert await conn.fetchval("SELECT max(attempts) FROM jobs") == 1

        for statuses in await asyncio.wait_for(watched, 60):
            # Claimed for a warm worker: straight from queued to running on it.
            assert statuses == ["queued", "running", "succeeded"], statuses
