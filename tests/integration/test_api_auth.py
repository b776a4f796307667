"""API keys: 401 without a valid key, 403 without the scope, 404 for another tenant's jobs and files."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from db import catalog
from db.connect import connect
from tests.integration.test_api_support import (
    assert_error,
    bearer,
    create_key,
    make_settings,
    multipart,
    running,
)

JOB = {"model": "demo.sleep", "inputs": {"seconds": 1}}


@pytest.fixture
async def api(dsn: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running(make_settings(dsn, tmp_path, auth="required")) as (_, client):
        yield client


async def test_missing_or_invalid_key_is_401(api: httpx.AsyncClient) -> None:
    for headers in ({}, bearer("vq_not-a-key"), {"Authorization": "Basic dXNlcjpwdw=="}, bearer("x" * 500)):
        resp = await api.get("/api/v1/jobs", headers=headers)
        assert_error(resp, 401, "unauthorized")
        assert resp.headers["www-authenticate"] == "Bearer"
    assert_error(await api.post("/api/v1/jobs", json=JOB), 401)
    # Probes stay open.
    assert (await api.get("/healthz")).status_code == 200


async def test_scopes(api: httpx.AsyncClient, dsn: str) -> None:
    reader = bearer(await create_key(dsn, "acme", "read"))
    submitter = bearer(await create_key(dsn, "acme", "submit"))
    assert_error(await api.post("/api/v1/jobs", json=JOB, headers=reader), 403, "forbidden")
    job = await api.post("/api/v1/jobs", json=JOB, headers=submitter)
    assert job.status_code == 202
    assert_error(await api.get(f"/api/v1/jobs/{job.json()['id']}", headers=submitter), 403)
    assert (await api.get(f"/api/v1/jobs/{job.json()['id']}", headers=reader)).status_code == 200
    assert_error(await api.post(f"/api/v1/jobs/{job.json()['id']}/cancel", headers=reader), 403)
    body, ctype = multipart("a.bin", b"data")
    assert_error(
        await api.post("/api/v1/files", content=body, headers={**reader, "Content-Type": ctype}), 403
    )
    assert (await api.get("/api/v1/models", headers=reader)).status_code == 200
    assert_error(await api.get("/api/v1/models", headers=submitter), 403)


async def test_tenants_are_isolated(api: httpx.AsyncClient, dsn: str) -> None:
    acme = bearer(await create_key(dsn, "acme", "read", "submit"))
    other = bearer(await create_key(dsn, "globex", "read", "submit"))
    admin = bearer(await create_key(dsn, "ops", "admin"))

    job = (await api.post("/api/v1/jobs", json=JOB, headers=acme)).json()
    assert job["tenant"] == "acme"
    body, ctype = multipart("a.obj", b"v 0 0 0\n")
    upload = (await api.post("/api/v1/files", content=body, headers={**acme, "Content-Type": ctype})).json()

    assert_error(await api.get(f"/api/v1/jobs/{job['id']}", headers=other), 404)
    assert_error(await api.get(f"/api/v1/jobs/{job['id']}/events", headers=other), 404)
    assert_error(await api.post(f"/api/v1/jobs/{job['id']}/cancel", headers=other), 404)
    assert_error(await api.get(f"/api/v1/jobs/{job['id']}/outputs/mesh.glb", headers=other), 404)
    assert_error(await api.get(f"/api/v1/files/{upload['id']}", headers=other), 404)
    assert_error(await api.get(f"/api/v1/files/{upload['id']}/content", headers=other), 404)
    assert (await api.get("/api/v1/jobs", headers=other)).json()["items"] == []
    # Another tenant's upload cannot be used as an input either.
    assert_error(
        await api.post(
            "/api/v1/jobs",
            json={"model": "mesh.uv_unwrap", "inputs": {"mesh": {"file": upload["id"]}}},
            headers=other,
        ),
        422,
        "unknown_file",
    )
    # The same idempotency key in two tenants makes two jobs.
    a = await api.post("/api/v1/jobs", json=JOB, headers={**acme, "Idempotency-Key": "same"})
    b = await api.post("/api/v1/jobs", json=JOB, headers={**other, "Idempotency-Key": "same"})
    assert a.json()["id"] != b.json()["id"]

    # An admin sees every tenant.
    assert (await api.get(f"/api/v1/jobs/{job['id']}", headers=admin)).status_code == 200
    assert (await api.get(f"/api/v1/files/{upload['id']}", headers=admin)).status_code == 200
    tenants = {j["tenant"] for j in (await api.get("/api/v1/jobs", headers=admin)).json()["items"]}
    assert tenants == {"acme", "globex"}


async def test_revoked_key_stops_working(api: httpx.AsyncClient, dsn: str) -> None:
    conn = await connect(dsn)
    try:
        row, secret = await catalog.create_api_key(conn, tenant="acme", name="ci", scopes=["read"])
        assert secret.startswith("vq_")
        stored = await conn.fetchval("SELECT secret_sha256 FROM api_keys WHERE id = $1", row["id"])
        assert stored == catalog.hash_secret(secret) and secret not in stored
        assert [k["name"] for k in await catalog.list_api_keys(conn, "acme")] == ["ci"]
        assert await catalog.revoke_api_key(conn, str(row["id"]))
        assert not await catalog.revoke_api_key(conn, row["id"])  # already revoked
        assert not await catalog.revoke_api_key(conn, "not-a-uuid")
        assert not await catalog.revoke_api_key(conn, uuid.uuid4())
        with pytest.raises(ValueError):
            await catalog.create_api_key(conn, tenant="acme", name="bad", scopes=["root"])
    finally:
        await conn.close()
    # Fresh process cache: the revoked key is refused.
    assert_error(await api.get("/api/v1/jobs", headers=bearer(secret)), 401)
