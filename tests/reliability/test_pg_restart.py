"""Scenario 3: PostgreSQL restarts under load (fast and immediate shutdowns, alternately).

An API replica (with a scheduler candidate inside) and a standalone candidate run against a PostgreSQL
of the scenario's own; jobs arrive over HTTP, each with an Idempotency-Key, resubmitted with that key
until the API accepts it. Each round stops the server, checks that the API answers 503 (never another
5xx, never a hang) while it is down, starts it again, and measures how long until a leader runs the pool
again and the API is ready with its LISTEN connection back. Proves that every process reconnects by
itself and that nothing accepted, or half-written when the server went away, is lost or doubled.
"""

from __future__ import annotations

import time

import asyncpg
import httpx
import pytest

from db.connect import connect
from tests.procs import free_port, wait_for
from tests.reliability.harness import (
    Cluster,
    HttpLoad,
    RestartablePg,
    accepts_connections,
    api_available,
    conclude,
    running,
    scale,
    wait_http_ready,
)
from tests.reliability.report import REPORT, Row

pytestmark = [pytest.mark.timeout(1800), pytest.mark.chaos]


async def test_postgres_restarts_under_load(own_pg: RestartablePg, own_dsn: str, tmp_path: object) -> None:
    if not api_available():
        pytest.skip("api.main is not importable yet: this scenario drives load over HTTP")
    restarts = scale(2, 5)
    row = REPORT.add(Row(f"3. PostgreSQL restart x{restarts}"))
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    cluster = Cluster(dsn=own_dsn, root=tmp_path / "cluster")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db = await connect(own_dsn)
    try:
        api = cluster.api("api", port, VRAMQ_ENABLE_SCHEDULER="true", VRAMQ_SSE_POLL_INTERVAL_S="60")
        cluster.scheduler("sched")
        await wait_http_ready(base, api)
        await cluster.wait_leader(db)
        load = HttpLoad(base, rate_hz=4.0, seconds=(0.2, 1.0))
        async with running(load):
            for k in range(restarts):
                mode = "fast" if k % 2 == 0 else "immediate"
                before = await cluster.wait_leader(db)
                done_before = await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'succeeded'")

                async def progressing(n: int = done_before, db: asyncpg.Connection = db) -> bool:
                    return bool(await db.fetchval("SELECT count(*) FROM jobs WHERE status = 'succeeded'") > n)

                await wait_for(progressing, timeout=60, what="jobs to finish before the restart")
                await db.close()
                answers_before = load.answers.get(503, 0)
                own_pg.stop(mode)
                row.faults += 1
                # While it is down: the API answers 503 to submissions and to /readyz.
                async with httpx.AsyncClient(base_url=base, timeout=10) as client:

                    async def unavailable(answers_before: int = answers_before) -> bool:
                        r = await client.get("/readyz")
                        assert r.status_code == 503, r.text
                        return load.answers.get(503, 0) > answers_before

                    await wait_for(
                        unavailable, timeout=30, interval=0.05, what="503s while the database is down"
                    )
                own_pg.start_again()
                up = time.time()
                await wait_for(lambda: accepts_connections(own_dsn), timeout=30, what="the server to be back")
                db = await connect(own_dsn)
                await cluster.new_leader(db, before["term"], timeout=60)
                await wait_http_ready(base, api, timeout=60)
                row.recovery(time.time() - up)

                async def both_candidates(db: asyncpg.Connection = db) -> bool:
                    n = await db.fetchval(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND application_name LIKE 'vramq-scheduler%'"
                    )
                    return bool(n == 2)

                await wait_for(both_candidates, timeout=60, what="both candidates to reconnect")
        assert not load.server_errors, f"the API answered 5xx other than 503: {load.answers}"
        assert load.unresolved == 0, f"{load.unresolved} submissions were never accepted"
        row.extra.update({"http_503": load.answers.get(503, 0), "transport_errors": load.transport_errors})
        row.notes = (
            f"{load.answers.get(503, 0)} submissions answered 503 while down, all later accepted "
            f"(idempotent retries); recovery = server up -> new leader + API ready"
        )
        await conclude(cluster, db, row, accepted=load.accepted)
    finally:
        await cluster.close()
        if not db.is_closed():
            await db.close()
