"""Every ```sql block of docs/audit.md runs against a real database with a few jobs in every state."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from db import queue
from db.queue import NewJob, Want

DOC = Path(__file__).resolve().parents[2] / "docs" / "audit.md"
BLOCKS = re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S)


def first_query_per_heading() -> dict[str, str]:
    out: dict[str, str] = {}
    for section in DOC.read_text().split("\n## ")[1:]:
        heading = section.splitlines()[0].strip()
        found = re.search(r"```sql\n(.*?)```", section, flags=re.S)
        if found:
            out[heading] = found.group(1)
    return out


def test_the_doc_has_queries() -> None:
    assert len(BLOCKS) >= 10


async def populate(conn: asyncpg.Connection) -> dict[str, uuid.UUID]:
    """One job succeeded, one retried then succeeded, one failed for good, one cancelled, one queued."""
    term = await queue.open_term(conn, pool="audit", host="host-a", pid=4242)
    ids: dict[str, uuid.UUID] = {}
    for name in ("ok", "retried", "failed", "cancelled", "queued"):
        row, _ = await queue.enqueue(
            conn,
            NewJob(feature="mesh", model="mesh.smooth", inputs={"n": name}, pool="audit", max_attempts=2),
        )
        ids[name] = row["id"]

    async def claim_and_start(job_id: uuid.UUID, *, now: datetime | None = None) -> None:
        # Jobs are claimed oldest first: claiming one at a time takes them in the order made above.
        claimed = await queue.claim(
            conn, term=term, wants=[Want("mesh.smooth", "mesh", 1)], pool="audit", lease_ttl_s=30, now=now
        )
        assert [r["id"] for r in claimed] == [job_id]
        assert await queue.start(conn, term=term, job_id=job_id, worker="w1", gpu="gpu-0")

    await claim_and_start(ids["ok"])
    assert await queue.complete(conn, term=term, job_id=ids["ok"], result={"vertices": 642})

    await claim_and_start(ids["retried"])
    status = await queue.fail(
        conn, term=term, job_id=ids["retried"], kind="worker_crashed", message="exit -9", retry=True
    )
    assert status == "queued"
    later = datetime.now(UTC) + timedelta(hours=1)  # past the retry's backoff
    await claim_and_start(ids["retried"], now=later)
    assert await queue.complete(conn, term=term, job_id=ids["retried"], result={})

    await claim_and_start(ids["failed"])
    status = await queue.fail(
        conn, term=term, job_id=ids["failed"], kind="invalid_input", message="not a mesh", retry=False
    )
    assert status == "failed"

    _, changed = await queue.cancel(conn, ids["cancelled"], tenant=None)
    assert changed
    return ids


@pytest.mark.parametrize("index", range(len(BLOCKS)))
async def test_audit_query_runs(conn: asyncpg.Connection, index: int) -> None:
    ids = await populate(conn)
    query = BLOCKS[index].replace(":'job_id'", f"'{ids['retried']}'")
    rows = await conn.fetch(query)
    assert rows, f"query {index} returned no rows:\n{query}"


async def test_audit_answers(conn: asyncpg.Connection) -> None:
    ids = await populate(conn)
    by_heading = first_query_per_heading()

    timeline = await conn.fetch(
        by_heading["One job's full timeline"].replace(":'job_id'", f"'{ids['retried']}'")
    )
    assert [(r["from_status"], r["to_status"]) for r in timeline] == [
        (None, "queued"),
        ("queued", "leased"),
        ("leased", "running"),
        ("running", "queued"),
        ("queued", "leased"),
        ("leased", "running"),
        ("running", "succeeded"),
    ]
    assert {r["host"] for r in timeline[1:]} == {"host-a"}

    twice = await conn.fetch(by_heading["Jobs that ran more than once"])
    assert [(r["id"], r["executions"]) for r in twice] == [(ids["retried"], 2)]

    failures = await conn.fetch(by_heading["Failures by error kind"])
    assert [(r["kind"], r["jobs"]) for r in failures] == [("invalid_input", 1)]

    per_day = await conn.fetch(by_heading["Jobs per model per day"])
    (row,) = per_day
    assert (row["jobs"], row["succeeded"], row["failed"], row["cancelled"], row["open"]) == (5, 2, 1, 1, 1)
