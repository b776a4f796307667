"""The HTTP side of vramq: POST /api/v1/jobs throughput and latency, and SSE push latency.

    .venv/bin/python -m bench.vramq_bench --workload http_enqueue --workload api_submit --workload sse_push

(this module holds the parts; ``bench.vramq_bench`` runs them on a fresh database and writes the
result lines). The server is ``uvicorn api.main:app --workers N`` with ``VRAMQ_ENABLE_SCHEDULER=false``
and ``VRAMQ_AUTH=disabled``, access log off, started fresh for each measure.

- ``run_http_enqueue``: one client (httpx, one keep-alive connection) POSTs one job at a time;
  jobs/s = n / elapsed, the same rule as the ``enqueue`` workload.
- ``api_submit``: ``clients`` concurrent clients (asyncio tasks sharing one httpx pool of that many
  connections) POST ``n`` jobs in all; requests/s and per-request latency percentiles.
- ``sse_push``: for each job, open ``GET /api/v1/jobs/{id}/events``, then change the job's status
  directly through ``db.queue`` (claim, start, progress 0.5, complete, under a term opened with
  ``db.queue.open_term``). Latency = the moment the client has read the matching event minus
  ``time.time()`` just before the write call. One change at a time.

The clients run on the same machine as the server and the database, so on a small machine their CPU
is part of the figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench import common

ROOT = Path(__file__).resolve().parent.parent
MODEL, FEATURE, POOL = "bench.noop", "bench", "bench"
API_REQUESTS = 5_000  # api_submit: requests in all
SSE_CHANGES = ("leased", "running", "progress", "succeeded")
READY_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiServer:
    """``uvicorn api.main:app --workers N`` on a free port, API only, auth off."""

    def __init__(self, dsn: str, models_file: Path, workdir: Path, workers: int = 2) -> None:
        self.dsn = dsn
        self.models_file = models_file
        self.workdir = workdir
        self.workers = workers
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: common.Worker | None = None

    def __enter__(self) -> ApiServer:
        env = {
            "VRAMQ_DATABASE_URL": self.dsn,
            "VRAMQ_ENABLE_SCHEDULER": "false",
            "VRAMQ_AUTH": "disabled",
            "VRAMQ_MODELS_FILE": str(self.models_file),
            "VRAMQ_DATA_DIR": str(self.workdir / "api-data"),
            "VRAMQ_POOL": POOL,
            "PYTHONUNBUFFERED": "1",
        }
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "api.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        self.proc = common.Worker(argv, env=env, log_path=self.workdir / "api.log", cwd=str(ROOT))
        try:
            self._wait_ready()
        except BaseException:
            self.proc.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        ok_in_a_row = 0
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            while ok_in_a_row < 2 * self.workers:  # several answers: likely every worker is up
                self.proc.check()
                if time.monotonic() > deadline:
                    raise common.BenchError(f"the API did not become ready:\n{self.proc.log_tail()}")
                try:
                    r = client.get("/readyz")
                    ok_in_a_row = ok_in_a_row + 1 if r.status_code == 200 else 0
                except httpx.HTTPError:
                    ok_in_a_row = 0
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.stop()


def _body(i: int) -> dict[str, Any]:
    return {"model": MODEL, "inputs": {"i": i}}


def run_http_enqueue(base_url: str, n: int) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """One keep-alive client, one job per request, sequential (the ``enqueue`` workload over HTTP)."""
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        for k in range(20):  # connection set up and first-request costs, outside the timing
            client.post("/api/v1/jobs", json=_body(-1 - k)).raise_for_status()

        def one(i: int) -> None:
            r = client.post("/api/v1/jobs", json=_body(i))
            if r.status_code != 202:
                raise common.BenchError(f"POST /api/v1/jobs answered {r.status_code}: {r.text[:300]}")

        value, extra = asyncio.run(common.measure_enqueue(one, n))
    params = {"jobs": n, "client": "httpx.Client, one keep-alive connection", "endpoint": "POST /api/v1/jobs"}
    return value, extra, params


async def api_submit(base_url: str, n: int, clients: int) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """``clients`` concurrent submitters, ``n`` requests in all. Returns (requests/s, extra, params)."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    lat: list[float] = []
    errors: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0, limits=limits) as client:
        await asyncio.gather(*(client.post("/api/v1/jobs", json=_body(-1)) for _ in range(clients)))
        counter = iter(range(n))

        async def submitter() -> None:
            for i in counter:
                a = time.perf_counter()
                try:
                    r = await client.post("/api/v1/jobs", json=_body(i))
                    code = str(r.status_code)
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                lat.append((time.perf_counter() - a) * 1000.0)
                if code != "202":
                    errors[code] = errors.get(code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(submitter() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    stats = common.percentiles(lat)
    extra = {
        **{f"{k}_ms" if k != "n" else k: v for k, v in stats.items()},
        "mean_ms": sum(lat) / len(lat),
        "elapsed_s": elapsed,
        "errors": errors,
    }
    params = {
        "requests": n,
        "clients": clients,
        "client": f"httpx.AsyncClient, {clients} keep-alive connections, one process",
        "endpoint": "POST /api/v1/jobs",
    }
    return (n - sum(errors.values())) / elapsed, extra, params


# ------------------------------------------------------------------------------------- SSE


class _Stream:
    """Reads one job's event stream in a task; ``next(match)`` waits for a matching event."""

    def __init__(self, client: httpx.AsyncClient, job_id: uuid.UUID) -> None:
        self.events: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
        self.task = asyncio.create_task(self._read(client, job_id))

    async def _read(self, client: httpx.AsyncClient, job_id: uuid.UUID) -> None:
        async with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as resp:
            if resp.status_code != 200:
                raise common.BenchError(f"events answered {resp.status_code}")
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    t = time.time()
                    self.events.put_nowait((t, json.loads(line[5:])))

    async def next(self, match: Any, timeout_s: float = 10.0) -> float:
        deadline = time.monotonic() + timeout_s
        seen: list[dict[str, Any]] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.task.done() and self.events.empty()):
                if self.task.done() and not self.task.cancelled() and self.task.exception() is not None:
                    raise common.BenchError(f"event stream failed: {self.task.exception()!r}")
                raise common.BenchError(f"no matching event in {timeout_s:g}s; saw {seen!r}")
            try:
                t, data = await asyncio.wait_for(self.events.get(), min(left, 0.5))
            except TimeoutError:
                continue
            if match(data):
                return t
            seen.append(data)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


async def sse_push(dsn: str, base_url: str, jobs: int) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Status change written through db.queue -> SSE event read by the client. Returns (p50 ms, ...)."""
    from db import queue as q
    from db.connect import connect

    conn = await connect(dsn)
    per_change: dict[str, list[float]] = {c: [] for c in SSE_CHANGES}
    order: list[float] = []
    try:
        term = await q.open_term(conn, pool=POOL, host=platform.node(), pid=os.getpid())
        wants = [q.Want(MODEL, FEATURE, 1)]
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        async with httpx.AsyncClient(base_url=base_url, timeout=30.0, limits=limits) as client:
            for k in range(jobs + 1):  # the first job is a warm-up, not counted
                row, _ = await q.enqueue(conn, q.NewJob(feature=FEATURE, model=MODEL, inputs={"i": k}))
                jid: uuid.UUID = row["id"]
                stream = _Stream(client, jid)
                try:
                    await stream.next(lambda d: d.get("status") == "queued")
                    await asyncio.sleep(0.01)  # the stream now waits on its notification

                    async def claim(jid: uuid.UUID = jid) -> None:
                        rows = await q.claim(conn, term=term, wants=wants, pool=POOL, lease_ttl_s=60)
                        if [r["id"] for r in rows] != [jid]:
                            raise common.BenchError(f"claimed {rows!r}, expected {jid}")

                    steps = (
                        ("leased", claim, lambda d: d.get("status") == "leased"),
                        (
                            "running",
                            lambda jid=jid: q.start(conn, term=term, job_id=jid, worker="bench", gpu="fake0"),
                            lambda d: d.get("status") == "running",
                        ),
                        (
                            "progress",
                            lambda jid=jid: q.progress(
                                conn, term=term, job_id=jid, fraction=0.5, min_interval_s=0.0
                            ),
                            lambda d: (d.get("progress") or 0) >= 0.5,
                        ),
                        (
                            "succeeded",
                            lambda jid=jid: q.complete(conn, term=term, job_id=jid, result={}),
                            lambda d: d.get("status") == "succeeded",
                        ),
                    )
                    for name, write, match in steps:
                        t0 = time.time()
                        await write()
                        t1 = await stream.next(match)
                        if k > 0:
                            per_change[name].append((t1 - t0) * 1000.0)
                            order.append((t1 - t0) * 1000.0)
                        await asyncio.sleep(0.005)
                finally:
                    await stream.close()
    finally:
        await conn.close()
    stats = common.percentiles(order)
    extra: dict[str, Any] = {
        **{f"{k}_ms" if k != "n" else k: v for k, v in stats.items()},
        "mean_ms": sum(order) / len(order),
        "by_change": {c: common.percentiles(v) for c, v in per_change.items()},
    }
    params = {
        "jobs": jobs,
        "changes_per_job": len(SSE_CHANGES),
        "writes": "db.queue claim/start/progress/complete, one connection",
        "client": "httpx.AsyncClient stream, one subscriber at a time",
    }
    return stats["p50"], extra, params
