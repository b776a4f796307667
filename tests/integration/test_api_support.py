"""Shared helpers of the API tests: an app over the test's database, driven in-process (httpx's ASGI
transport, lifespan run by hand) or served by a real uvicorn on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from api.main import create_app
from core.settings import Settings
from db import catalog
from db.connect import connect


def make_settings(dsn: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": dsn,
        "data_dir": tmp_path / "data",
        "enable_scheduler": "false",
        "auth": "disabled",
        "sse_poll_interval_s": 0.5,
        "db_connect_timeout_s": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan started, and a client that talks to it in-process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://vramq.test") as client:
            yield app, client


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[FastAPI, str]]:
    """The app behind a real uvicorn on a free port of this event loop; yields (app, base URL)."""
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", log_level="warning", ws="none", http="h11", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_for(lambda: server.started, timeout_s=20)
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)
        sock.close()


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], *, timeout_s: float = 10, every_s: float = 0.02
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = condition()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every_s)


async def create_key(dsn: str, tenant: str, *scopes: str) -> str:
    conn = await connect(dsn)
    try:
        _, secret = await catalog.create_api_key(conn, tenant=tenant, name="test", scopes=scopes)
    finally:
        await conn.close()
    return secret


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str)
    if code is not None:
        assert body["error"]["code"] == code, body
    err: dict[str, Any] = body["error"]
    return err


def multipart(name: str, data: bytes, boundary: str = "vramqtestboundary") -> tuple[bytes, str]:
    """A one-file multipart body and its Content-Type."""
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
