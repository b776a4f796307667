"""The vramq HTTP API: ``uvicorn api.main:app`` (``--workers N`` for several processes per host).

Start-up (the lifespan): resolve the database (the embedded one when no URL is set), connect a pool —
or, when the database is down, start anyway and keep connecting in the background (``/readyz`` and the
routes answer 503 meanwhile) —, load the model registry, start the one LISTEN connection of this process,
then the scheduler candidate unless ``VRAMQ_ENABLE_SCHEDULER=false``. Start-up never migrates the
database (``vramq migrate`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from api.deps import AppState, Database
from api.listener import JobListener
from api.routes import files, health, jobs, models, system
from core.registry import Registry
from core.settings import Settings, get_settings
from core.types import ConfigError
from db import migrate
from db.connect import create_pool
from db.dsn import redacted
from db.embedded import resolve_dsn

log = logging.getLogger("vramq.api")

VERSION = "0.1.0"


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes`` with 413, reading at most that much.

    The body is read here (bounded) and replayed to the app; later ``receive`` calls go straight
    through, so disconnects still reach streaming responses. Upload routes, which enforce their own
    limit while streaming to disk, are passed through untouched.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, exempt: tuple[tuple[str, str], ...]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"].rstrip("/")) in self.exempt:
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_body_bytes:
                    await self._too_large(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = errors.error_response(
            413,
            "too_large",
            f"the request body exceeds {self.max_body_bytes} bytes",
            details={"limit": self.max_body_bytes},
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


async def _connect_pool(state: AppState, dsn: str) -> asyncpg.Pool:
    s = state.settings
    return await create_pool(
        dsn,
        min_size=s.db_pool_min,
        max_size=s.db_pool_max,
        connect_timeout_s=s.db_connect_timeout_s,
        command_timeout=s.db_command_timeout_s,
        server_settings={"application_name": "vramq-api"},
    )


async def _keep_connecting(state: AppState, dsn: str) -> None:
    """Retry the pool in the background until the database answers (the API serves 503 meanwhile)."""
    delay = 0.5
    while state.db.pool is None:
        await asyncio.sleep(delay * (0.5 + random.random() / 2))
        try:
            state.db.pool = await _connect_pool(state, dsn)
            log.info("connected to the database %s", redacted(dsn))
        except Exception as exc:
            log.warning("database %s still unreachable (%s); retrying", redacted(dsn), type(exc).__name__)
            delay = min(delay * 2, 10.0)


async def _start_scheduler(state: AppState, dsn: str) -> Any:
    """Start this replica's scheduler candidate. With ENABLE_SCHEDULER=true a candidate that cannot
    start (e.g. no GPU driver for VRAMQ_GPUS=nvml) fails start-up; with auto the replica serves the API
    alone and says why."""
    from scheduler.service import SchedulerService

    try:
        svc = SchedulerService(settings=state.settings, dsn=dsn, registry=state.registry)
    except ConfigError as exc:
        if state.settings.enable_scheduler == "true":
            raise
        log.error("no scheduler candidate in this replica (ENABLE_SCHEDULER=auto): %s", exc)
        return None
    await svc.start()
    log.info("scheduler candidate started for pool %s", state.settings.pool)
    return svc


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = Registry.load(settings.models_file)
        state = AppState(
            settings=settings,
            registry=registry,
            db=Database(acquire_timeout_s=settings.db_connect_timeout_s),
            listener=JobListener(connect_timeout_s=settings.db_connect_timeout_s),
            migration_head=migrate.head(),
        )
        dsn = await asyncio.to_thread(resolve_dsn, settings.database_url, settings.data_dir)
        state.dsn = dsn
        connector: asyncio.Task[None] | None = None
        try:
            state.db.pool = await _connect_pool(state, dsn)
        except Exception as exc:
            log.error(
                "database %s unreachable at start-up (%s: %s); serving 503 until it answers",
                redacted(dsn),
                type(exc).__name__,
                exc,
            )
            connector = asyncio.create_task(_keep_connecting(state, dsn), name="vramq-db-connect")
        state.listener.start(dsn)
        app.state.vramq = state
        if settings.scheduler_enabled:
            state.scheduler = await _start_scheduler(state, dsn)
        try:
            yield
        finally:
            if state.scheduler is not None:
                await state.scheduler.stop()
            if connector is not None:
                connector.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connector
            await state.listener.stop()
            pool, state.db.pool = state.db.pool, None
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), 10)
                except (TimeoutError, Exception):
                    pool.terminate()

    app = FastAPI(
        title="vramq",
        version=VERSION,
        summary="GPU job scheduling for model inference on PostgreSQL",
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        exempt=(("POST", files.UPLOAD_PATH),),
    )
    app.add_middleware(ReplicaHeaderMiddleware)
    for module in (jobs, files, models, system, health):
        app.include_router(module.router)
    return app


class ReplicaHeaderMiddleware:
    """Adds ``x-vramq-replica: <host>/<pid>`` to every response: which replica answered, for operators
    checking a load balancer (and for tests that must reach every uvicorn worker)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.value = f"{socket.gethostname()}/{os.getpid()}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-vramq-replica", self.value)]
            await send(message)

        await self.app(scope, receive, tagged)


app = create_app()
