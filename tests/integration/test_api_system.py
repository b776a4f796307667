"""Probes, metrics, system status and models; database outages answer 503, never a hang or a 500."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from db import queue
from db.connect import connect
from db.dsn import with_database
from tests.integration.test_api_support import assert_error, make_settings, multipart, running, wait_for

SNAPSHOT: dict[str, Any] = {
    "gpus": [
        {
            "id": "GPU-0",
            "name": "Fake 24GiB",
            "total_mb": 24576,
            "free_mb": 20000,
            "used_mb": 4576,
            "ledger_mb": 1280,
            "utilization_pct": 37,
            "temperature_c": 55,
        }
    ],
    "workers": [
        {
            "id": "w1",
            "model": "demo.sleep",
            "gpu": "GPU-0",
            "state": "idle",
            "vram_mb": 300,
            "pid": 42,
            "jobs_done": 3,
        }
    ],
    "reservation": None,
}


@pytest.fixture
async def api(dsn: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running(make_settings(dsn, tmp_path)) as (_, client):
        yield client


async def test_probes(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok", "revision": None, "listener": None}
    ready = await api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_readyz_refuses_an_unmigrated_database(empty_dsn: str, tmp_path: Path) -> None:
    async with running(make_settings(empty_dsn, tmp_path)) as (_, client):
        err = assert_error(await client.get("/readyz"), 503, "not_ready")
        assert err["details"]["revision"] is None
        assert (await client.get("/healthz")).status_code == 200


async def test_status_models_and_metrics(api: httpx.AsyncClient, dsn: str) -> None:
    conn = await connect(dsn)
    try:
        term = await queue.open_term(conn, pool="gpu-a", host="box-a", pid=1234, snapshot=SNAPSHOT)
        old = datetime.now(UTC) - timedelta(hours=1)
        await queue.open_term(
            conn, pool="gpu-b", host="box-b", pid=99, snapshot={"gpus": [], "workers": []}, now=old
        )
        for _ in range(3):
            await api.post("/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": 1}})
        body, ctype = multipart("m.obj", b"v 0 0 0\n")
        fid = (await api.post("/api/v1/files", content=body, headers={"Content-Type": ctype})).json()["id"]
        await api.post("/api/v1/jobs", json={"feature": "mesh", "inputs": {"mesh": {"file": fid}}})
        # One job runs to completion.
        [claimed] = await queue.claim(
            conn, term=term, wants=[queue.Want("demo.sleep", "demo", 1)], pool="gpu-a", lease_ttl_s=30
        )
        await queue.start(conn, term=term, job_id=claimed["id"], worker="w1", gpu="GPU-0")
        await queue.complete(conn, term=term, job_id=claimed["id"], result={})
    finally:
        await conn.close()

    status = (await api.get("/api/v1/system/status")).json()
    leaders = {leader["pool"]: leader for leader in status["leaders"]}
    assert set(leaders) == {"gpu-a", "gpu-b"}
    assert (leaders["gpu-a"]["term"], leaders["gpu-a"]["host"], leaders["gpu-a"]["pid"]) == (
        term,
        "box-a",
        1234,
    )
    assert leaders["gpu-a"]["stale"] is False and leaders["gpu-b"]["stale"] is True
    assert status["gpus"] == [{**SNAPSHOT["gpus"][0], "pool": "gpu-a", "stale": False}]
    assert [w["id"] for w in status["workers"]] == ["w1"]
    assert status["queue"] == {"demo.sleep": 2, "mesh.*": 1}

    items = {m["id"]: m for m in (await api.get("/api/v1/models")).json()["items"]}
    assert set(items) == {"demo.sleep", "mesh.smooth", "mesh.simplify", "mesh.uv_unwrap"}
    demo = items["demo.sleep"]
    assert demo["queued"] == 2 and demo["feature"] == "demo"
    assert [(i["pool"], i["worker"], i["state"]) for i in demo["instances"]] == [("gpu-a", "w1", "idle")]
    assert items["mesh.smooth"]["file_inputs"] == ["mesh"]

    resp = await api.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(resp.text)
        for s in fam.samples
    }
    assert samples[("vramq_queue_depth", (("model", "demo.sleep"),))] == 2
    assert samples[("vramq_queue_depth", (("model", "mesh.*"),))] == 1
    assert samples[("vramq_queue_depth", (("model", "mesh.smooth"),))] == 0
    assert samples[("vramq_jobs", (("model", "demo.sleep"), ("status", "succeeded")))] == 1
    assert samples[("vramq_job_run_seconds_count", (("model", "demo.sleep"), ("status", "succeeded")))] == 1
    assert (
        samples[
            (
                "vramq_job_run_seconds_bucket",
                (("le", "+Inf"), ("model", "demo.sleep"), ("status", "succeeded")),
            )
        ]
        == 1
    )
    gpu = (("gpu", "GPU-0"), ("name", "Fake 24GiB"), ("pool", "gpu-a"))
    assert samples[("vramq_gpu_memory_total_bytes", gpu)] == 24576 * 1024 * 1024
    assert samples[("vramq_gpu_utilization_percent", gpu)] == 37
    assert samples[("vramq_workers", (("model", "demo.sleep"), ("pool", "gpu-a"), ("state", "idle")))] == 1


async def test_database_dropped_mid_run(pg_server: str, dsn: str, tmp_path: Path) -> None:
    async with running(make_settings(dsn, tmp_path)) as (_, client):
        job = await client.post("/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": 1}})
        assert job.status_code == 202
        name = urlsplit(dsn).path.lstrip("/")
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        for method, path in (
            ("GET", f"/api/v1/jobs/{job.json()['id']}"),
            ("GET", "/api/v1/jobs"),
            ("POST", "/api/v1/jobs"),
            ("GET", "/api/v1/system/status"),
            ("GET", "/metrics"),
        ):
            resp = await client.request(method, path, json={"model": "demo.sleep", "inputs": {"seconds": 1}})
            err = assert_error(resp, 503, "database_unavailable")
            assert resp.headers["retry-after"].isdigit(), (path, err)
        assert_error(await client.get("/readyz"), 503, "not_ready")
        assert (await client.get("/healthz")).status_code == 200


async def test_starts_without_a_database_and_connects_later(
    pg_server: str, template_db: str, tmp_path: Path
) -> None:
    name = f"vramq_late_{uuid.uuid4().hex[:10]}"
    late_dsn = with_database(pg_server, name)
    try:
        async with running(make_settings(late_dsn, tmp_path)) as (_, client):
            assert (await client.get("/healthz")).status_code == 200
            assert_error(await client.get("/readyz"), 503, "not_ready")
            resp = await client.get("/api/v1/jobs")
            assert_error(resp, 503, "database_unavailable")
            assert "retry-after" in resp.headers
            body, ctype = multipart("a.bin", b"x")
            assert_error(
                await client.post("/api/v1/files", content=body, headers={"Content-Type": ctype}), 503
            )

            with psycopg.connect(pg_server, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await wait_for(ready, timeout_s=20, every_s=0.2)
            assert (await client.get("/api/v1/jobs")).status_code == 200
    finally:
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_closed_port_answers_503(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        url = f"postgresql://postgres@127.0.0.1:{port}/nothing"
        async with running(make_settings(url, tmp_path)) as (_, client):
            assert_error(await client.get("/api/v1/jobs"), 503, "database_unavailable")
            assert_error(await client.get("/readyz"), 503)
            assert (await client.get("/healthz")).status_code == 200
