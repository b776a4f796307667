"""Jobs over HTTP on a real PostgreSQL: submit, read, list, cancel, idempotency and validation."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from db import queue
from db.connect import connect
from tests.integration.test_api_support import assert_error, make_settings, multipart, running


@pytest.fixture
async def api(dsn: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running(make_settings(dsn, tmp_path)) as (_, client):
        yield client


async def test_submit_and_get(api: httpx.AsyncClient) -> None:
    resp = await api.post(
        "/api/v1/jobs",
        json={"model": "demo.sleep", "inputs": {"seconds": 0.1}, "priority": 5, "metadata": {"who": "me"}},
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["model"] == "demo.sleep" and job["feature"] == "demo"
    assert job["max_attempts"] == 3  # the model's default
    assert job["timeout_s"] is None
    assert job["metadata"] == {"who": "me"}

    got = await api.get(f"/api/v1/jobs/{job['id']}")
    assert got.status_code == 200
    body = got.json()
    fields = {
        *("id", "status", "model", "feature", "pool", "priority", "progress", "progress_message"),
        *("attempts", "max_attempts", "created_at", "started_at", "finished_at", "result", "error"),
        *("metadata", "queue_position", "outputs"),
    }
    for field in fields:
        assert field in body, field
    assert body["queue_position"] == 1
    assert body["outputs"] == []


async def test_queue_position_follows_priority(api: httpx.AsyncClient) -> None:
    ids = []
    for prio in (0, 0, 10):
        r = await api.post(
            "/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": 1}, "priority": prio}
        )
        ids.append(r.json()["id"])
    positions = [(await api.get(f"/api/v1/jobs/{i}")).json()["queue_position"] for i in ids]
    assert positions == [2, 3, 1]


async def test_feature_only_resolution(api: httpx.AsyncClient) -> None:
    one = await api.post("/api/v1/jobs", json={"feature": "demo", "inputs": {"seconds": 1}})
    assert one.status_code == 202 and one.json()["model"] == "demo.sleep"  # the only demo model
    # mesh has several models: any of them may run it; inputs fit one of them.
    several = await api.post("/api/v1/jobs", json={"feature": "mesh", "inputs": {"bogus": 1}})
    assert_error(several, 422, "invalid_input")


async def test_unknown_model_and_feature(api: httpx.AsyncClient) -> None:
    err = assert_error(
        await api.post("/api/v1/jobs", json={"model": "nope.model", "inputs": {}}), 422, "unknown_model"
    )
    assert err["details"]["path"] == "model"
    assert_error(await api.post("/api/v1/jobs", json={"feature": "nope", "inputs": {}}), 422, "unknown_model")
    assert_error(
        await api.post(
            "/api/v1/jobs", json={"model": "demo.sleep", "feature": "mesh", "inputs": {"seconds": 1}}
        ),
        422,
        "unknown_model",
    )
    assert_error(await api.post("/api/v1/jobs", json={"inputs": {}}), 422, "invalid_request")


async def test_inputs_validated_with_path(api: httpx.AsyncClient) -> None:
    resp = await api.post("/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": "soon"}})
    err = assert_error(resp, 422, "invalid_input")
    assert err["details"]["path"] == "inputs.seconds"
    missing = assert_error(await api.post("/api/v1/jobs", json={"model": "demo.sleep", "inputs": {}}), 422)
    assert missing["details"]["path"] == "inputs"


@pytest.mark.parametrize(
    "payload",
    [
        {"mesh": {"file": "/etc/passwd"}},
        {"mesh": "/etc/passwd"},
        {"mesh": {"file": "../../etc/passwd"}},
        {"mesh": {"file": str(uuid.uuid4())}},  # a UUID that is no upload of ours
        {"mesh": {"file": "x", "path": "/etc/passwd"}},
    ],
)
async def test_server_paths_are_refused(api: httpx.AsyncClient, payload: dict[str, object]) -> None:
    resp = await api.post("/api/v1/jobs", json={"model": "mesh.uv_unwrap", "inputs": payload})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] in {"unknown_file", "invalid_input"}


async def test_file_input_of_own_upload(api: httpx.AsyncClient) -> None:
    body, ctype = multipart("cube.obj", b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    up = await api.post("/api/v1/files", content=body, headers={"Content-Type": ctype})
    assert up.status_code == 201, up.text
    fid = up.json()["id"]
    ok = await api.post(
        "/api/v1/jobs", json={"model": "mesh.uv_unwrap", "inputs": {"mesh": {"file": fid.upper()}}}
    )
    assert ok.status_code == 202, ok.text
    assert ok.json()["inputs"] == {"mesh": {"file": fid}}  # canonical id, nothing else
    # The wrong kind of file for this model.
    body, ctype = multipart("notes.txt", b"hello")
    txt = (await api.post("/api/v1/files", content=body, headers={"Content-Type": ctype})).json()["id"]
    assert_error(
        await api.post("/api/v1/jobs", json={"model": "mesh.uv_unwrap", "inputs": {"mesh": {"file": txt}}}),
        422,
        "invalid_input",
    )


async def test_idempotency_key(api: httpx.AsyncClient) -> None:
    body = {"model": "demo.sleep", "inputs": {"seconds": 1}}
    first = await api.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    again = await api.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    other = await api.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "k-2"})
    assert first.status_code == 202 and again.status_code == 200 and other.status_code == 202
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert_error(await api.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "x" * 201}), 422)


async def test_field_limits(api: httpx.AsyncClient) -> None:
    base = {"model": "demo.sleep", "inputs": {"seconds": 1}}
    for extra in (
        {"priority": 101},
        {"priority": -101},
        {"max_attempts": 0},
        {"max_attempts": 21},
        {"timeout_s": 0},
        {"metadata": {"big": "x" * 17000}},
        {"metadata": [1, 2]},
        {"surprise": True},
        {"pool": ""},
    ):
        assert_error(await api.post("/api/v1/jobs", json={**base, **extra}), 422, "invalid_request")
    ok = await api.post("/api/v1/jobs", json={**base, "max_attempts": 7, "timeout_s": 12.5, "pool": "gpu-a"})
    assert ok.status_code == 202
    assert (ok.json()["max_attempts"], ok.json()["timeout_s"], ok.json()["pool"]) == (7, 12.5, "gpu-a")


async def test_values_postgres_cannot_store(api: httpx.AsyncClient) -> None:
    for raw in (
        b'{"model": "demo.sleep", "inputs": {"seconds": NaN}}',
        b'{"model": "demo.sleep", "inputs": {"seconds": 1}, "metadata": {"a": "\\u0000"}}',
        b'{"model": "demo.sleep", "inputs": {"seconds": 1}, "metadata": {"a": "\\ud800"}}',
        b'{"model": "demo.sleep", "inputs": {"seconds": 1e999}}',
    ):
        resp = await api.post("/api/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert resp.status_code in (400, 422), (raw, resp.status_code, resp.text)
        assert "error" in resp.json()


async def test_malformed_json_and_body_limit(api: httpx.AsyncClient) -> None:
    bad = await api.post("/api/v1/jobs", content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert_error(bad, 400, "invalid_json")
    huge = (
        b'{"model": "demo.sleep", "inputs": {"seconds": 1}, "metadata": {"a": "' + b"x" * 2_000_000 + b'"}}'
    )
    assert_error(
        await api.post("/api/v1/jobs", content=huge, headers={"Content-Type": "application/json"}),
        413,
        "too_large",
    )

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        for _ in range(40):
            yield b" " * 65536

    assert_error(
        await api.post("/api/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}), 413
    )


async def test_routing_errors_are_json(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/api/v1/nothing"), 404, "not_found")
    assert_error(await api.delete("/api/v1/jobs"), 405, "method_not_allowed")
    assert_error(await api.get("/api/v1/jobs/not-a-uuid"), 404, "not_found")
    assert_error(await api.get(f"/api/v1/jobs/{uuid.uuid4()}"), 404, "not_found")
    assert_error(await api.get("/api/v1/jobs", params={"limit": 0}), 422, "invalid_request")
    assert_error(await api.get("/api/v1/jobs", params={"status": "bogus"}), 422)
    assert_error(await api.get("/api/v1/jobs", params={"cursor": "garbage!"}), 422, "invalid_cursor")


async def test_list_with_pagination_and_filters(api: httpx.AsyncClient, dsn: str) -> None:
    ids = set()
    for i in range(7):
        r = await api.post("/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": i}})
        ids.add(r.json()["id"])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get("/api/v1/jobs", params=params)).json()
        pages += 1
        seen.extend(j["id"] for j in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and len(seen) == 7 and set(seen) == ids
    created = [(await api.get(f"/api/v1/jobs/{i}")).json()["created_at"] for i in seen]
    assert created == sorted(created, reverse=True)

    cancelled = seen[0]
    assert (await api.post(f"/api/v1/jobs/{cancelled}/cancel")).status_code == 200
    only = (await api.get("/api/v1/jobs", params={"status": "cancelled"})).json()["items"]
    assert [j["id"] for j in only] == [cancelled]
    assert (await api.get("/api/v1/jobs", params={"model": "mesh.smooth"})).json()["items"] == []
    assert len((await api.get("/api/v1/jobs", params={"feature": "demo"})).json()["items"]) == 7


async def test_cancel(api: httpx.AsyncClient, dsn: str) -> None:
    queued = (await api.post("/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": 1}})).json()
    resp = await api.post(f"/api/v1/jobs/{queued['id']}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert_error(await api.post(f"/api/v1/jobs/{queued['id']}/cancel"), 409, "already_finished")
    assert_error(await api.post(f"/api/v1/jobs/{uuid.uuid4()}/cancel"), 404)

    # A running job keeps its status until its scheduler stops it; the request is recorded.
    running_job = (
        await api.post("/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": 1}})
    ).json()
    conn = await connect(dsn)
    try:
        term = await queue.open_term(conn, pool="p", host="h", pid=1)
        claimed = await queue.claim(
            conn, term=term, wants=[queue.Want("demo.sleep", "demo", 1)], pool="p", lease_ttl_s=30
        )
        assert [r["id"] for r in claimed] == [uuid.UUID(running_job["id"])]
        await queue.start(conn, term=term, job_id=claimed[0]["id"], worker="w", gpu="g")
    finally:
        await conn.close()
    resp = await api.post(f"/api/v1/jobs/{running_job['id']}/cancel")
    assert resp.status_code == 200
    assert resp.json()["status"] == "running" and resp.json()["cancel_requested_at"] is not None
