"""The API as it is deployed: a real uvicorn subprocess (``uvicorn api.main:app``) configured by the
environment, with authentication on, driven over TCP."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from db import queue
from db.connect import connect
from tests.integration.test_api_support import bearer, create_key
from tests.procs import start_api

ROOT = Path(__file__).resolve().parents[2]
UPLOAD_LIMIT = 256 * 1024


@pytest.fixture
def server(dsn: str, tmp_path: Path) -> Iterator[str]:
    env = {
        **os.environ,
        "VRAMQ_DATABASE_URL": dsn,
        "VRAMQ_DATA_DIR": str(tmp_path / "data"),
        "VRAMQ_ENABLE_SCHEDULER": "false",
        "VRAMQ_AUTH": "required",
        "VRAMQ_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "VRAMQ_SSE_POLL_INTERVAL_S": "30",
    }
    proc, base = start_api(env, tmp_path / "uvicorn.log")
    try:
        yield base
        proc.popen.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert proc.popen.wait(timeout=20) in (0, -signal.SIGTERM)
        output = (tmp_path / "uvicorn.log").read_text()
        assert "Application shutdown complete" in output, output
        assert "Traceback" not in output, output
    finally:
        if proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait()


async def test_submit_follow_and_finish(server: str, dsn: str) -> None:
    key = bearer(await create_key(dsn, "acme", "submit", "read"))
    async with httpx.AsyncClient(base_url=server, headers=key, timeout=10) as client:
        assert (await client.get("/api/v1/jobs", headers={"Authorization": "Bearer nope"})).status_code == 401
        resp = await client.post("/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": 2}})
        assert resp.status_code == 202
        job_id = resp.json()["id"]
        statuses = []
        async with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as stream:
            lines = stream.aiter_lines()
            conn = await connect(dsn)
            try:
                term = await queue.open_term(conn, pool="p", host="h", pid=1)
                steps: list[Callable[[], Awaitable[object]]] = [
                    lambda: queue.claim(
                        conn, term=term, wants=[queue.Want("demo.sleep", "demo", 1)], pool="p", lease_ttl_s=30
                    ),
                    lambda: queue.start(conn, term=term, job_id=uuid.UUID(job_id), worker="w", gpu="g"),
                    lambda: queue.complete(conn, term=term, job_id=uuid.UUID(job_id), result={"ok": 1}),
                ]
                async for line in lines:
                    if not line.startswith("data:"):
                        continue
                    statuses.append(json.loads(line[5:])["status"])
                    if steps:
                        await steps.pop(0)()
            finally:
                await conn.close()
        assert statuses == ["queued", "leased", "running", "succeeded"]
        final = (await client.get(f"/api/v1/jobs/{job_id}")).json()
        assert final["status"] == "succeeded" and final["result"] == {"ok": 1}
        metrics = (await client.get("/metrics")).text
        assert 'vramq_jobs{model="demo.sleep",status="succeeded"} 1.0' in metrics


def _oversize_upload(base: str, secret: str) -> tuple[bytes, int]:
    """Send a chunked upload far over the limit; return (the response head, chunks sent before it came)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    boundary = "xyz"
    head = (
        f"POST /api/v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {secret}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'.encode()
    sock.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
    chunk = b"\x00" * 65536
    sent = 0
    try:
        while sent < 200:  # up to 12.5 MiB; the limit is 256 KiB
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server answered and closed while we were still sending
                break
            sent += 1
        sock.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
        return data, sent
    finally:
        sock.close()


async def test_oversize_upload_over_tcp(server: str, dsn: str, tmp_path: Path) -> None:
    secret = await create_key(dsn, "acme", "submit", "read")
    head, sent = await asyncio.to_thread(_oversize_upload, server, secret)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert sent < 100, sent  # answered long before the client was done
    leftovers = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert leftovers == []
