"""The job event stream over a real HTTP server: every transition, in order, pushed by NOTIFY; the
stream ends after the terminal status, survives a lost LISTEN connection, and cleans up on disconnect."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from api.deps import AppState
from db import queue
from db.connect import connect
from tests.integration.test_api_support import make_settings, served, wait_for

WANT = [queue.Want("demo.sleep", "demo", 1)]


class EventReader:
    """Parses a text/event-stream response into (event, data) pairs as they arrive."""

    def __init__(self, resp: httpx.Response) -> None:
        self.resp = resp
        self.lines = resp.aiter_lines()
        self.comments: list[str] = []

    async def next(self, timeout_s: float = 5.0) -> tuple[str, dict[str, Any]] | None:
        return await asyncio.wait_for(self._next(), timeout_s)

    async def _next(self) -> tuple[str, dict[str, Any]] | None:
        event, data = "message", ""
        async for line in self.lines:
            if line == "":
                if data:
                    return event, json.loads(data)
                continue
            if line.startswith(":"):
                self.comments.append(line)
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
        return None


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await connect(dsn)
    try:
        yield c
    finally:
        await c.close()


async def _submit(client: httpx.AsyncClient) -> str:
    resp = await client.post("/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": 1}})
    assert resp.status_code == 202
    job_id: str = resp.json()["id"]
    return job_id


async def test_every_transition_in_order(dsn: str, tmp_path: Path, conn: asyncpg.Connection) -> None:
    # A long poll interval: the events below can only arrive this fast through NOTIFY.
    settings = make_settings(dsn, tmp_path, sse_poll_interval_s=60)
    async with served(settings) as (app, base), httpx.AsyncClient(base_url=base, timeout=10) as client:
        job_id = await _submit(client)
        jid = uuid.UUID(job_id)
        async with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = EventReader(resp)
            name, data = await _expect(events)
            assert (name, data["id"], data["status"], data["progress"], data["attempts"]) == (
                "status",
                job_id,
                "queued",
                0.0,
                0,
            )

            term = await queue.open_term(conn, pool="p", host="h", pid=1)
            await queue.claim(conn, term=term, wants=WANT, pool="p", lease_ttl_s=30)
            name, data = await _expect(events)
            assert (name, data["status"], data["attempts"]) == ("status", "leased", 1)

            await queue.start(conn, term=term, job_id=jid, worker="w1", gpu="g0")
            name, data = await _expect(events)
            assert (name, data["status"]) == ("status", "running")

            await queue.progress(conn, term=term, job_id=jid, fraction=0.5, message="half", min_interval_s=0)
            name, data = await _expect(events)
            assert (name, data["status"], data["progress"], data["progress_message"]) == (
                "progress",
                "running",
                0.5,
                "half",
            )

            await queue.complete(conn, term=term, job_id=jid, result={"slept": 1})
            name, data = await _expect(events)
            assert (name, data["status"], data["result"], data["error"]) == (
                "status",
                "succeeded",
                {"slept": 1},
                None,
            )
            assert await events.next() is None  # the stream ended after the terminal status
        state: AppState = app.state.vramq
        await wait_for(lambda: state.listener.subscriber_count == 0)


async def _expect(events: EventReader) -> tuple[str, dict[str, Any]]:
    got = await events.next(timeout_s=3)
    assert got is not None, "the stream ended early"
    return got


async def test_burst_of_transitions_all_reported(dsn: str, tmp_path: Path, conn: asyncpg.Connection) -> None:
    """Transitions that land between two reads are still reported, each once, in order (audit trail)."""
    settings = make_settings(dsn, tmp_path, sse_poll_interval_s=60)
    async with served(settings) as (_, base), httpx.AsyncClient(base_url=base, timeout=10) as client:
        job_id = await _submit(client)
        jid = uuid.UUID(job_id)
        async with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as resp:
            events = EventReader(resp)
            assert (await _expect(events))[1]["status"] == "queued"
            term = await queue.open_term(conn, pool="p", host="h", pid=1)
            async with conn.transaction():  # one commit: one wake-up for four transitions
                await queue.claim(conn, term=term, wants=WANT, pool="p", lease_ttl_s=30)
                await queue.start(conn, term=term, job_id=jid, worker="w", gpu="g")
                await queue.fail(conn, term=term, job_id=jid, kind="model_error", message="boom", retry=False)
            seen = []
            while (got := await events.next()) is not None:
                seen.append((got[0], got[1]["status"]))
            assert seen == [("status", "leased"), ("status", "running"), ("status", "failed")]


async def test_terminal_job_streams_one_event(dsn: str, tmp_path: Path) -> None:
    async with served(make_settings(dsn, tmp_path)) as (_, base), httpx.AsyncClient(base_url=base) as client:
        job_id = await _submit(client)
        assert (await client.post(f"/api/v1/jobs/{job_id}/cancel")).status_code == 200
        async with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as resp:
            events = EventReader(resp)
            name, data = await _expect(events)
            assert (name, data["status"], data["error"]["kind"]) == ("status", "cancelled", "cancelled")
            assert await events.next() is None
        missing = await client.get(f"/api/v1/jobs/{uuid.uuid4()}/events")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_listener_reconnects(dsn: str, tmp_path: Path, conn: asyncpg.Connection) -> None:
    settings = make_settings(dsn, tmp_path, sse_poll_interval_s=60)
    async with served(settings) as (app, base), httpx.AsyncClient(base_url=base, timeout=10) as client:
        state: AppState = app.state.vramq
        await wait_for(state.listener.connected.is_set)
        job_id = await _submit(client)
        async with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as resp:
            events = EventReader(resp)
            assert (await _expect(events))[1]["status"] == "queued"
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'vramq-listener' AND datname = current_database()"
            )
            assert killed == 1
            await wait_for(lambda: state.listener.connects >= 2)
            term = await queue.open_term(conn, pool="p", host="h", pid=1)
            await queue.claim(conn, term=term, wants=WANT, pool="p", lease_ttl_s=30)
            assert (await _expect(events))[1]["status"] == "leased"


async def test_poll_fallback_without_notifications(
    dsn: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    """With the listener gone, the stream still sees changes by re-reading the job."""
    settings = make_settings(dsn, tmp_path, sse_poll_interval_s=0.2)
    async with served(settings) as (app, base), httpx.AsyncClient(base_url=base, timeout=10) as client:
        state: AppState = app.state.vramq
        await state.listener.stop()
        job_id = await _submit(client)
        async with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as resp:
            events = EventReader(resp)
            assert (await _expect(events))[1]["status"] == "queued"
            assert (await client.post(f"/api/v1/jobs/{job_id}/cancel")).status_code == 200
            assert (await _expect(events))[1]["status"] == "cancelled"


async def test_disconnect_unsubscribes(dsn: str, tmp_path: Path) -> None:
    async with (
        served(make_settings(dsn, tmp_path)) as (app, base),
        httpx.AsyncClient(base_url=base) as client,
    ):
        state: AppState = app.state.vramq
        job_id = await _submit(client)
        async with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as resp:
            await _expect(EventReader(resp))
            assert state.listener.subscriber_count == 1
        await wait_for(lambda: state.listener.subscriber_count == 0)
