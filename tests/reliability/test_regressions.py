"""Regression tests for faults the reliability scenarios found, small enough to run in a second.

A test for an open bug is marked ``xfail(strict=True)``: the suite stays green, and the fix turns it
into an unexpected pass, which fails until the marker is removed.
"""

from __future__ import annotations

import asyncpg

from db import queue as q
from tests.reliability.harness import demo_job


async def test_a_deposed_term_cannot_claim(conn: asyncpg.Connection) -> None:
    old = await q.open_term(conn, pool="p1", host="h", pid=1)
    new = await q.open_term(conn, pool="p1", host="h", pid=2)
    await q.end_earlier_terms(conn, pool="p1", term=new)
    row, _ = await q.enqueue(conn, demo_job(0.1))
    claimed = await q.claim(
        conn, term=old, wants=[q.Want("demo.sleep", "demo", 4)], pool="p1", lease_ttl_s=30
    )
    assert claimed == [], f"term {old} was succeeded by {new} and still leased {[r['id'] for r in claimed]}"
    job = await q.get_job(conn, row["id"])
    assert job is not None and job["status"] == "queued"
