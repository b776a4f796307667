"""Scenario 1: the leader is SIGKILLed again and again under steady load.

Two or three candidates compete for one pool; each round kills whoever leads (its GPU workers die with
it), measures how long until another candidate leads, and starts a fresh candidate in its place. Proves
that failover is fast, that the dead leader's jobs are rescued and run again without ever overlapping
the killed execution, and that nothing is lost or finished twice.
"""

from __future__ import annotations

import asyncpg
import pytest

from tests.procs import wait_for
from tests.reliability.harness import Cluster, DbLoad, conclude, running, scale
from tests.reliability.report import REPORT, Row

pytestmark = [pytest.mark.timeout(1800), pytest.mark.chaos]


async def test_leader_sigkill_under_load(cluster: Cluster, db: asyncpg.Connection) -> None:
    kills = scale(3, 50)
    row = REPORT.add(Row(f"1. leader SIGKILL x{kills}"))
    for i in range(scale(2, 3)):
        cluster.scheduler(f"cand{i}")
    leader = await cluster.wait_leader(db)
    recoveries: list[float] = []
    load = DbLoad(cluster.dsn, rate_hz=3.0, seconds=(0.2, 1.0))
    async with running(load):
        for k in range(kills):

            async def busy(term: int = leader["term"]) -> bool:
                n = await db.fetchval(
                    "SELECT count(*) FROM job_events WHERE lease_owner = $1 AND to_status = 'running'", term
                )
                return bool(n)

            # Kill only a leader that has work in flight (or has run some): the fault must hit jobs.
            await wait_for(busy, timeout=60, what=f"term {leader['term']} to run a job")
            victim = cluster.by_pid(leader["pid"])
            assert victim is not None, f"the leader pid {leader['pid']} is not one of ours"
            killed = await cluster.sigkill_tree(victim)
            row.faults += 1
            leader = await cluster.new_leader(db, leader["term"], timeout=30)
            # From the kill to the new term's row (the database's clock, on this same machine).
            took = leader["started_at"].timestamp() - killed
            row.recovery(took)
            recoveries.append(took)
            cluster.scheduler(f"restart{k}")
    row.extra["mean_recovery_s"] = round(sum(recoveries) / len(recoveries), 3)
    row.notes = f"failover mean {row.extra['mean_recovery_s']:.2f}s"
    await conclude(cluster, db, row, accepted=load.accepted)
