"""Uploads and downloads: streamed to disk with a hash, size-limited while streaming, never by path."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from db import queue
from db.connect import connect
from tests.integration.test_api_support import assert_error, make_settings, multipart, running

LIMIT = 256 * 1024


@pytest.fixture
async def api(dsn: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running(make_settings(dsn, tmp_path, max_upload_bytes=LIMIT)) as (_, client):
        yield client


def stored_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "data" / "files").rglob("*") if p.is_file()]


async def test_upload_hash_and_download(api: httpx.AsyncClient, tmp_path: Path) -> None:
    data = bytes(range(256)) * 500  # 128 000 bytes, binary
    body, ctype = multipart("scan.ply", b"ply\nformat binary_little_endian 1.0\n" + data)
    resp = await api.post("/api/v1/files", content=body, headers={"Content-Type": ctype})
    assert resp.status_code == 201, resp.text
    meta = resp.json()
    content = b"ply\nformat binary_little_endian 1.0\n" + data
    assert meta["name"] == "scan.ply"
    assert meta["size"] == len(content)
    assert meta["sha256"] == hashlib.sha256(content).hexdigest()
    assert meta["content_type"] == "application/x-ply"
    assert (await api.get(f"/api/v1/files/{meta['id']}")).json() == meta

    down = await api.get(f"/api/v1/files/{meta['id']}/content")
    assert down.status_code == 200
    assert down.content == content
    assert down.headers["content-type"].startswith("application/x-ply")
    assert "scan.ply" in down.headers["content-disposition"]

    files = stored_files(tmp_path)
    assert [p.name for p in files] == [meta["id"]]  # stored under its id, no temp left behind
    assert "uploads" in files[0].parts


async def test_httpx_multipart_and_sniffing(api: httpx.AsyncClient) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
    resp = await api.post("/api/v1/files", files={"file": ("picture.bin", png)}, data={"note": "hi"})
    assert resp.status_code == 201, resp.text
    assert resp.json()["content_type"] == "image/png"  # the bytes, not the name, decide
    obj = await api.post("/api/v1/files", files={"file": ("mesh.obj", b"v 0 0 0\n")})
    assert obj.json()["content_type"] == "model/obj"


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\mesh.obj", "mesh.obj"),
        ("bad\x01\x7fname.obj", "badname.obj"),
        ("..", "upload"),
        ("", "upload"),
        ("n" * 300 + ".glb", "n" * 196 + ".glb"),
    ],
)
async def test_names_are_sanitised(api: httpx.AsyncClient, raw: str, clean: str) -> None:
    body, ctype = multipart(raw, b"x")
    resp = await api.post("/api/v1/files", content=body, headers={"Content-Type": ctype})
    assert resp.status_code == 201, resp.text
    assert resp.json()["name"] == clean


async def test_oversize_upload_rejected_while_streaming(api: httpx.AsyncClient, tmp_path: Path) -> None:
    boundary = "b0undary"
    sent = 0
    total_chunks = 400  # 400 x 16 KiB = 6.4 MiB, far over the 256 KiB limit
    exhausted = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent, exhausted
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
        ).encode()
        for _ in range(total_chunks):
            sent += 1
            yield b"\xab" * 16384
        yield f"\r\n--{boundary}--\r\n".encode()
        exhausted = True

    resp = await api.post(
        "/api/v1/files", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    err = assert_error(resp, 413, "too_large")
    assert err["details"]["limit"] == LIMIT
    assert not exhausted
    assert sent < total_chunks // 4, sent  # refused soon after the limit, not after reading it all
    assert stored_files(tmp_path) == []


async def test_declared_oversize_refused_before_reading(api: httpx.AsyncClient, tmp_path: Path) -> None:
    read = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal read
        for _ in range(100):
            read += 1
            yield b"x" * 65536

    resp = await api.post(
        "/api/v1/files",
        content=body(),
        headers={"Content-Type": "multipart/form-data; boundary=b", "Content-Length": str(100 * 65536)},
    )
    assert_error(resp, 413, "too_large")
    assert read <= 1
    assert stored_files(tmp_path) == []


async def test_bad_uploads(api: httpx.AsyncClient, tmp_path: Path) -> None:
    assert_error(await api.post("/api/v1/files", content=b"raw", headers={"Content-Type": "text/plain"}), 415)
    assert_error(await api.post("/api/v1/files", json={"file": "x"}), 415)
    other, ctype = multipart("a", b"x")
    other = other.replace(b'name="file"', b'name="other"')
    assert_error(
        await api.post("/api/v1/files", content=other, headers={"Content-Type": ctype}), 422, "missing_file"
    )
    body, ctype = multipart("a.bin", b"x" * 1000)
    truncated = body[: len(body) - 30]
    assert_error(
        await api.post("/api/v1/files", content=truncated, headers={"Content-Type": ctype}),
        400,
        "invalid_multipart",
    )
    garbage = b"--wrong\r\nnonsense\r\n\r\n"
    resp = await api.post(
        "/api/v1/files", content=garbage, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert resp.status_code in (400, 422)
    assert stored_files(tmp_path) == []
    assert_error(await api.get("/api/v1/files/not-a-uuid"), 404)
    assert_error(await api.get(f"/api/v1/files/{uuid.uuid4()}/content"), 404)


async def test_output_download(api: httpx.AsyncClient, dsn: str, tmp_path: Path) -> None:
    job = (await api.post("/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": 0}})).json()
    out_dir = tmp_path / "data" / "files" / "outputs" / job["id"]
    out_dir.mkdir(parents=True)
    (out_dir / "result.txt").write_bytes(b"done\n")
    conn = await connect(dsn)
    try:
        term = await queue.open_term(conn, pool="p", host="h", pid=1)
        [claimed] = await queue.claim(
            conn, term=term, wants=[queue.Want("demo.sleep", "demo", 1)], pool="p", lease_ttl_s=30
        )
        out = queue.Output(
            claimed["id"],
            "result.txt",
            5,
            hashlib.sha256(b"done\n").hexdigest(),
            "text/plain",
            str(out_dir / "result.txt"),
        )
        assert await queue.complete_many(
            conn, term=term, results=[(claimed["id"], {"ok": True})], outputs=[out]
        )
    finally:
        await conn.close()
    detail = (await api.get(f"/api/v1/jobs/{job['id']}")).json()
    assert detail["status"] == "succeeded" and detail["result"] == {"ok": True}
    [o] = detail["outputs"]
    assert (o["name"], o["size"], o["url"]) == (
        "result.txt",
        5,
        f"/api/v1/jobs/{job['id']}/outputs/result.txt",
    )
    down = await api.get(o["url"])
    assert down.status_code == 200 and down.content == b"done\n"
    assert_error(await api.get(f"/api/v1/jobs/{job['id']}/outputs/missing.txt"), 404)
    assert_error(await api.get(f"/api/v1/jobs/{job['id']}/outputs/..%2F..%2Fetc%2Fpasswd"), 404)
