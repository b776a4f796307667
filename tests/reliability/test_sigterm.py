"""Scenario 5: SIGTERM to every process at once, under load.

Two scheduler candidates (and an API replica with a candidate inside, when the API is there) get
SIGTERM together while the leader runs jobs, some longer than the shutdown grace. Every process must
exit within the grace (plus a margin for stopping workers and the last writes); jobs that were running
either finished or went back to the queue (their attempt not counted); nothing stays leased, no worker
survives. A fresh candidate then finishes the queue. Proves a deploy or a host shutdown is harmless.
"""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from tests.procs import free_port, wait_for
from tests.reliability.harness import (
    Cluster,
    DbLoad,
    api_available,
    conclude,
    running,
    scale,
)
from tests.reliability.invariants import assert_no_orphans, assert_nothing_leased
from tests.reliability.report import REPORT, Row

pytestmark = [pytest.mark.timeout(1800), pytest.mark.chaos]

GRACE_S = 3.0
MARGIN_S = 12.0  # stop the leftover workers (SIGTERM, then SIGKILL 2 s later), flush, close


async def test_sigterm_everything_drains(cluster: Cluster, db: asyncpg.Connection) -> None:
    rounds = scale(1, 5)
    row = REPORT.add(Row(f"5. SIGTERM all x{rounds}"))
    cluster.env["VRAMQ_SHUTDOWN_GRACE_S"] = str(GRACE_S)
    load = DbLoad(cluster.dsn, rate_hz=3.0, seconds=(0.3, 6.0))
    drains: list[float] = []
    async with running(load):
        for k in range(rounds):
            cluster.scheduler(f"a{k}")
            cluster.scheduler(f"b{k}")
            if api_available():
                cluster.api(f"api{k}", free_port(), VRAMQ_ENABLE_SCHEDULER="true")
            leader = await cluster.wait_leader(db)

            async def busy(term: int = leader["term"]) -> list[uuid.UUID]:
                rows = await db.fetch(
                    "SELECT id FROM jobs WHERE lease_owner = $1 AND status = 'running'", term
                )
                return [r["id"] for r in rows] if len(rows) >= 2 else []

            running_ids = await wait_for(busy, timeout=90, what="the leader to run two jobs")
            took = await cluster.terminate_all(within=GRACE_S + MARGIN_S)
            row.faults += 1
            drains.append(took)
            row.recovery(took)
            await assert_nothing_leased(db)
            await assert_no_orphans(cluster.run_id)
            for jid in running_ids:
                status = await db.fetchval("SELECT status FROM jobs WHERE id = $1", jid)
                assert status in ("succeeded", "queued", "failed"), f"job {jid} left {status}"
    cluster.scheduler("finisher")
    row.notes = f"every process exited {max(drains):.2f}s after SIGTERM at worst (grace {GRACE_S:g}s)"
    row.extra["grace_s"] = GRACE_S
    await conclude(cluster, db, row, accepted=load.accepted)
