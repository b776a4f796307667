"""Scenario 8: adapters that misbehave.

Each fault runs on a pool of its own (the demo adapter reads its fault knobs from the environment of
its scheduler), with jobs pinned to that pool:

- ``faults``: jobs that raise (``fail: true``), a job that hangs past its ``timeout_s``, and healthy jobs
  between them: the failures end ``failed`` with the right kind, the hung worker is killed, the
  healthy jobs succeed on replacement workers.
- ``crash``: the worker process exits while loading; ``oom``: loading raises CUDA out-of-memory (the
  model's estimate must grow). Their jobs end ``failed`` instead of waiting for ever.
- ``big``: the model declares 256 MB but measures 9000 MB once loaded, on one 24 GiB GPU with up to four
  workers allowed: the ledger must switch to the measured figure and never book more than the GPU has,
  so at most two of its jobs ever run at once.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from db import queue as q
from db.connect import connect
from tests.procs import executions, models_file
from tests.reliability.harness import Cluster, conclude, demo_job, scale
from tests.reliability.invariants import ledger_problems, live_snapshot, wait_settled
from tests.reliability.report import REPORT, Row

pytestmark = [pytest.mark.timeout(1800), pytest.mark.chaos]

MEASURED_MB = 9000


def max_concurrency(runs: list[dict[str, Any]], ids: set[str]) -> int:
    points = []
    for r in runs:
        if r["job_id"] in ids and r["end"] is not None:
            points += [(r["start"], 1), (r["end"], -1)]
    level = best = 0
    for _, d in sorted(points, key=lambda p: (p[0], p[1])):
        level += d
        best = max(best, level)
    return best


async def enqueue(db: asyncpg.Connection, job: q.NewJob, ids: list[uuid.UUID]) -> uuid.UUID:
    row, _ = await q.enqueue(db, job)
    ids.append(row["id"])
    jid: uuid.UUID = row["id"]
    return jid


async def test_adapter_faults(cluster: Cluster, db: asyncpg.Connection) -> None:
    reps = scale(1, 5)
    row = REPORT.add(Row("8. adapter faults"))
    cluster.models = models_file(cluster.root / "models.yaml", max_workers=4, timeout_s=120)
    accepted: list[uuid.UUID] = []
    cluster.scheduler("faults", VRAMQ_POOL="faults")
    cluster.scheduler("crash", VRAMQ_POOL="crash", VRAMQ_DEMO_LOAD_FAIL="crash")
    cluster.scheduler("oom", VRAMQ_POOL="oom", VRAMQ_DEMO_LOAD_FAIL="oom")
    for pool in ("faults", "crash", "oom"):
        await cluster.wait_leader(db, pool)

    raising, hanging, healthy = [], [], []
    for _ in range(reps):
        raising.append(
            await enqueue(db, demo_job(0.1, pool="faults", inputs={"fail": True}, max_attempts=2), accepted)
        )
        hanging.append(
            await enqueue(db, demo_job(60, pool="faults", timeout_s=1.0, max_attempts=1), accepted)
        )
        for _ in range(3):
            healthy.append(await enqueue(db, demo_job(0.2, pool="faults"), accepted))
    # A model that cannot load fails one queued attempt per load, with a doubling back-off between
    # loads (up to a minute): two jobs of two attempts each already take ~15 s to drain.
    broken = min(reps, 2)
    crashing = [
        await enqueue(db, demo_job(0.1, pool="crash", max_attempts=2), accepted) for _ in range(broken)
    ]
    ooming = [await enqueue(db, demo_job(0.1, pool="oom", max_attempts=2), accepted) for _ in range(broken)]
    row.faults += len(raising) + len(hanging) + len(crashing) + len(ooming)

    await wait_settled(db, timeout=180, ids=accepted)
    jobs = {r["id"]: r for r in await db.fetch("SELECT id, status, error, attempts FROM jobs")}
    for jid in raising:
        assert jobs[jid]["status"] == "failed" and jobs[jid]["error"]["kind"] == "model_error", jobs[jid]
        assert jobs[jid]["attempts"] == 2
    for jid in hanging:
        assert jobs[jid]["status"] == "failed" and jobs[jid]["error"]["kind"] == "timeout", jobs[jid]
    for jid in healthy:
        assert jobs[jid]["status"] == "succeeded", jobs[jid]
    for jid in crashing + ooming:
        assert jobs[jid]["status"] == "failed", jobs[jid]
    assert {jobs[j]["error"]["kind"] for j in ooming} == {"oom"}, [jobs[j]["error"] for j in ooming]
    oom_snap = await live_snapshot(db, "oom")
    assert oom_snap is not None and oom_snap["estimates_mb"]["demo.sleep"] > 256, oom_snap

    # Measured VRAM above the declared figure: the ledger follows the measurement, nothing over-commits.
    cluster.scheduler("big", VRAMQ_POOL="big", VRAMQ_DEMO_VRAM_MB=str(MEASURED_MB))
    await cluster.wait_leader(db, "big")
    big = [await enqueue(db, demo_job(1.0, pool="big"), accepted) for _ in range(6 * reps)]
    row.faults += 1
    problems: list[str] = []
    peak_ledger = 0
    watcher = await connect(cluster.dsn)
    settled = asyncio.create_task(wait_settled(watcher, timeout=180, ids=big))
    while not settled.done():
        snap = await live_snapshot(db, "big")
        if snap is not None:
            problems += ledger_problems(snap)
            for g in snap["gpus"]:
                peak_ledger = max(peak_ledger, int(g.get("ledger_mb") or 0))
            for w in snap["workers"]:
                if w["state"] in ("idle", "busy"):
                    assert w["vram_mb"] == MEASURED_MB, w
        await asyncio.sleep(0.1)
    try:
        await settled
    finally:
        await watcher.close()
    assert not problems, problems[:5]
    assert peak_ledger >= MEASURED_MB, f"the ledger never used the measured {MEASURED_MB} MB: {peak_ledger}"
    runs = executions(cluster.records)
    most = max_concurrency(runs, {str(j) for j in big})
    assert most <= 2, f"{most} jobs of a {MEASURED_MB} MB model ran at once on one 24 GiB GPU"
    row.extra.update({"peak_ledger_mb": peak_ledger, "max_concurrent_big": most})
    row.notes = (
        f"raise/hang/load-crash/load-OOM all end failed with their kind; measured {MEASURED_MB} MB "
        f"model: ledger peak {peak_ledger} MB, at most {most} at once on 24 GiB"
    )
    await conclude(cluster, db, row, accepted=accepted, pools=("faults", "crash", "oom", "big"))
