"""Scenario 6: a deposed leader that keeps running.

The leader's lock session is ended by the server (``pg_terminate_backend`` of the backend holding the
advisory lock) while its process lives on. Two variants:

- *awake*: the leader notices at once, stops its workers, hands its jobs back, and competes again; the
  standby leads. Nothing the old term does after the takeover changes a job.
- *frozen*: the leader is stopped (SIGSTOP) first, so it cannot notice; its lock session is ended, the
  standby leads and, once the old leases expire, runs the old term's jobs again. Then the old leader
  resumes with results of jobs that are no longer its own: those late writes must change nothing
  (fencing on the term), and it must stop its workers.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime

import asyncpg
import pytest

from tests.procs import Proc, wait_for
from tests.reliability.harness import Cluster, DbLoad, conclude, running, scale
from tests.reliability.invariants import observed_gone, worker_pids
from tests.reliability.report import REPORT, Row

pytestmark = [pytest.mark.timeout(1800), pytest.mark.chaos]

RESCUE_LIMIT_S = 25.0  # lease TTL (6 s) + janitor period + a loaded machine


async def cut_lock_session(db: asyncpg.Connection) -> int:
    """End the backend that holds the pool's advisory lock; returns its pid."""
    pid = await db.fetchval(
        "SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND a.application_name LIKE 'vramq-scheduler%'"
    )
    assert pid is not None, "no scheduler session holds the lock"
    assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
    return int(pid)


async def fencing_violations(db: asyncpg.Connection, term: int) -> list[str]:
    """Writes by ``term`` to a job after the job was taken from it (rescued, or leased to another
    term), without claiming it again first: exactly what fencing on the term must prevent."""
    rows = await db.fetch(
        "SELECT e.id, e.job_id, e.from_status, e.to_status, e.lease_owner, e.at FROM job_events e "
        "WHERE e.job_id IN (SELECT job_id FROM job_events WHERE lease_owner = $1) ORDER BY e.id",
        term,
    )
    out = []
    taken: set[object] = set()
    for e in rows:
        jid, mine = e["job_id"], e["lease_owner"] == term
        # A claim moves a job from queued to leased, or straight to running on a chosen worker.
        claim = e["from_status"] == "queued" and e["to_status"] in ("leased", "running")
        if mine and claim:
            taken.discard(jid)  # claimed again: its own from here
        elif mine and jid in taken:
            out.append(f"job {jid}: {e['from_status']} -> {e['to_status']} by term {term} at {e['at']}")
        elif (mine and e["to_status"] == "queued") or (not mine and claim):
            taken.add(jid)
    return out


async def late_claims(db: asyncpg.Connection, term: int, since: datetime) -> int:
    """Jobs ``term`` leased after a newer term of its pool had started."""
    n: int = await db.fetchval(
        "SELECT count(*) FROM job_events WHERE lease_owner = $1 AND at > $2 "
        "AND from_status = 'queued' AND to_status IN ('leased', 'running')",
        term,
        since,
    )
    return n


async def leading_with_work(cluster: Cluster, db: asyncpg.Connection) -> tuple[asyncpg.Record, Proc]:
    leader = await cluster.wait_leader(db)

    async def busy() -> bool:
        n = await db.fetchval(
            "SELECT count(*) FROM jobs WHERE lease_owner = $1 AND status = 'running'", leader["term"]
        )
        return bool(n)

    await wait_for(busy, timeout=60, what="the leader to run jobs")
    proc = cluster.by_pid(leader["pid"])
    assert proc is not None
    return leader, proc


async def test_deposed_leader_is_fenced(cluster: Cluster, db: asyncpg.Connection) -> None:
    rounds = scale(1, 5)
    row = REPORT.add(Row(f"6. deposed leader x{2 * rounds}"))
    cluster.scheduler("a")
    cluster.scheduler("b")
    load = DbLoad(cluster.dsn, rate_hz=3.0, seconds=(0.2, 1.0))
    stop_workers: list[float] = []
    terms: list[int] = []
    claims = 0
    frozen_tx = 0
    async with running(load):
        for _ in range(rounds):
            # Awake: it notices the cut itself.
            old, proc = await leading_with_work(cluster, db)
            workers = worker_pids(proc.pid)
            cut = time.time()
            await cut_lock_session(db)
            row.faults += 1
            new = await cluster.new_leader(db, old["term"], timeout=30)
            row.recovery(new["started_at"].timestamp() - cut)
            gone = await observed_gone(workers, timeout=15)
            assert gone.keys() == workers, f"the deposed leader kept workers {workers - gone.keys()}"
            stop_workers.append(max(gone.values(), default=cut) - cut)
            terms.append(old["term"])
            assert proc.popen.poll() is None, "the deposed leader should live on as a candidate"
            claims += await late_claims(db, old["term"], new["started_at"])

            # Frozen: it cannot notice until it resumes, with results that are no longer its own.
            old, proc = await leading_with_work(cluster, db)
            workers = worker_pids(proc.pid)
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                cut = time.time()
                await cut_lock_session(db)
                row.faults += 1
                new = await cluster.new_leader(db, old["term"], timeout=30)
                row.recovery(new["started_at"].timestamp() - cut)

                async def rescued(term: int = old["term"]) -> bool:
                    n = await db.fetchval(
                        "SELECT count(*) FROM jobs WHERE lease_owner = $1 "
                        "AND status IN ('leased', 'running')",
                        term,
                    )
                    return bool(n == 0)

                # The old leases expire (the frozen leader cannot renew them) and are rescued, except
                # a job whose row the leader froze in the middle of writing: its open transaction
                # holds the row until the process resumes (or the server ends the session).
                try:
                    await wait_for(
                        rescued, timeout=RESCUE_LIMIT_S, what="the frozen term's jobs to be rescued"
                    )
                except AssertionError:
                    stuck = await db.fetch(
                        "SELECT pid, application_name, state, now() - xact_start AS in_xact "
                        "FROM pg_stat_activity WHERE datname = current_database() "
                        "AND state LIKE 'idle in transaction%'"
                    )
                    assert stuck, f"rescue stalled with no transaction in the way\n{cluster.logs_tail(60)}"
                    frozen_tx += 1
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            gone = await observed_gone(workers, timeout=15)
            assert gone.keys() == workers, f"the resumed deposed leader kept workers {workers - gone.keys()}"
            claims += await late_claims(db, old["term"], new["started_at"])
            terms.append(old["term"])
    row.extra["late_claims"] = claims
    row.extra["rescue_blocked_by_frozen_transaction"] = frozen_tx
    row.notes = (
        f"deposed leader stopped its workers {max(stop_workers):.2f}s after the cut (awake); "
        f"{claims} jobs leased by a deposed term after its successor started (see the regression test); "
        f"{frozen_tx} rounds where a transaction frozen with the leader kept one job leased until it resumed"
    )
    await conclude(cluster, db, row, accepted=load.accepted)
    violations = [v for t in terms for v in await fencing_violations(db, t)]
    assert not violations, "late writes of a deposed term were not fenced off:\n  " + "\n  ".join(violations)
