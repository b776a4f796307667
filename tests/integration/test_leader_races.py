"""Races inside one leader, provoked in-process with a real database and real worker subprocesses."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from core.registry import Registry
from core.settings import Settings
from db import queue as q
from scheduler import loop
from scheduler.service import SchedulerService
from tests.procs import executions, models_file, wait_for

pytestmark = pytest.mark.timeout(120)


async def test_jobs_claimed_while_leases_are_renewed_are_not_taken_for_lost(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal answers with the jobs leased when its statement ran. Jobs claimed and started while the
    answer was on its way are missing from it: they must not be judged lost (and their workers killed)."""
    real_extend = q.extend_leases

    async def slow_extend(*args: Any, **kwargs: Any) -> set[uuid.UUID]:
        ours = await real_extend(*args, **kwargs)
        await asyncio.sleep(0.3)  # the answer arrives late; the leader claims meanwhile
        return ours

    monkeypatch.setattr(loop.q, "extend_leases", slow_extend)
    record = tmp_path / "rec"
    monkeypatch.setenv("VRAMQ_DEMO_RECORD_DIR", str(record))
    settings = Settings(
        database_url=dsn,
        gpus="fake:1x24GiB",
        pool="races",
        data_dir=tmp_path / "data",
        models_file=models_file(tmp_path / "models.yaml", max_workers=2),
        lease_ttl_s=4,
        lease_extend_interval_s=0.2,
        heartbeat_interval_s=0.5,
        poll_interval_s=0.2,
    )
    svc = SchedulerService(settings=settings, dsn=dsn, registry=Registry.load(settings.models_file))
    await svc.start()
    try:
        ids = []
        for _ in range(30):
            row, _ = await q.enqueue(
                conn, q.NewJob(feature="demo", model="demo.sleep", inputs={"seconds": 0.1})
            )
            ids.append(row["id"])
            await asyncio.sleep(0.03)

        async def all_done() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE status = 'succeeded' AND id = ANY($1::uuid[])", ids
            )
            return bool(n == len(ids))

        await wait_for(all_done, timeout=90, interval=0.1, what="all jobs")
    finally:
        await svc.stop()
    attempts = await conn.fetchval("SELECT max(attempts) FROM jobs WHERE id = ANY($1::uuid[])", ids)
    assert attempts == 1, "a job was taken for lost and run again"
    runs = executions(record)
    assert len(runs) == len(ids) and all(r["outcome"] == "ok" for r in runs)
