"""Scenario 2: GPU workers are SIGKILLed mid-job under load.

Each round picks a worker process that is running a job right now (its execution record has a start
and no end), kills it, and measures how long until the leader has given that job back to the queue (or
failed it, once its attempts are spent). Proves that a crash costs one attempt, the job runs again on a
fresh worker and never alongside its killed execution, and the ledger forgets the dead worker.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from tests.procs import wait_for
from tests.reliability.harness import Cluster, DbLoad, conclude, running, scale
from tests.reliability.report import REPORT, Row

pytestmark = [pytest.mark.timeout(1800), pytest.mark.chaos]


def in_flight(records: Path, workers: set[int]) -> list[dict[str, Any]]:
    """Executions that started and have not ended, on the given worker pids."""
    out: list[dict[str, Any]] = []
    for pid in workers:
        f = records / f"executions-{pid}.jsonl"
        try:
            lines = f.read_text().splitlines()
        except OSError:
            continue
        open_runs: dict[tuple[str, int], dict[str, Any]] = {}
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line being written
            key = (e["job_id"], e["attempt"])
            if e["event"] == "start":
                open_runs[key] = e
            else:
                open_runs.pop(key, None)
        out += open_runs.values()
    return out


def worker_pids(cluster: Cluster) -> set[int]:
    pids: set[int] = set()
    for p in cluster.alive():
        try:
            pids |= {c.pid for c in psutil.Process(p.pid).children()}
        except psutil.Error:
            continue
    return pids


async def test_worker_sigkill_under_load(cluster: Cluster, db: asyncpg.Connection) -> None:
    kills = scale(5, 100)
    row = REPORT.add(Row(f"2. worker SIGKILL x{kills}"))
    cluster.scheduler("a")
    cluster.scheduler("b")
    await cluster.wait_leader(db)
    load = DbLoad(cluster.dsn, rate_hz=3.0, seconds=(0.5, 1.5))
    recoveries: list[float] = []
    async with running(load):
        for _ in range(kills):

            async def target() -> dict[str, Any] | None:
                runs = [
                    r
                    for r in in_flight(cluster.records, worker_pids(cluster))
                    if time.time() - r["start"] > 0.1
                ]
                return runs[0] if runs else None

            found = await wait_for(target, timeout=60, interval=0.05, what="a worker running a job")
            assert found is not None
            victim = found
            try:
                os.kill(victim["pid"], signal.SIGKILL)
            except ProcessLookupError:
                continue  # it finished and exited on its own meanwhile
            killed = time.time()
            cluster.killed_at[victim["pid"]] = killed
            row.faults += 1
            jid = uuid.UUID(victim["job_id"])

            async def given_back(jid: uuid.UUID = jid, attempt: int = victim["attempt"]) -> Any:
                return await db.fetchval(
                    "SELECT at FROM job_events WHERE job_id = $1 AND attempt = $2 "
                    "AND from_status = 'running' AND to_status IN ('queued', 'failed', 'succeeded') "
                    "ORDER BY id LIMIT 1",
                    jid,
                    attempt,
                )

            at = await wait_for(given_back, timeout=30, what=f"job {jid} to be given back")
            took = max(0.0, at.timestamp() - killed)
            row.recovery(took)
            recoveries.append(took)
    row.extra["mean_recovery_s"] = round(sum(recoveries) / max(1, len(recoveries)), 3)
    row.notes = f"crash noticed and job requeued in {row.extra['mean_recovery_s']:.2f}s on average"
    await conclude(cluster, db, row, accepted=load.accepted)
