"""One LISTEN connection per API process, fanned out to the event streams of individual jobs.

A trigger NOTIFYs ``vramq_jobs`` with ``{id, status, progress}`` on every status change and on
(throttled) progress. This listener wakes the subscribers of that job id; they then read the job (and
its audit trail) themselves, so a notification is only ever a hint:

    stopped ──start()──▶ connecting ──ok──▶ listening ──connection lost──▶ backoff ──▶ connecting
                             │                                               ▲
                             └──────────────fails───────────────────────────┘

- Notifications are lost while the connection is down (and PostgreSQL drops them for a listener that
  falls far behind), so every subscriber also re-reads its job every ``poll_interval_s``, and after a
  reconnect the listener wakes every subscriber once.
- A silent network partition is noticed by a ping every ``ping_interval_s`` with a timeout.
- Reconnects back off exponentially (with jitter) up to ``max_backoff_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from typing import Any

import asyncpg

from db import catalog
from db.connect import connect
from db.sql import CHANNEL_STATUS

log = logging.getLogger("vramq.api.listener")


class Subscription:
    """One event stream's interest in one job: ``wait()`` returns when the job may have changed."""

    def __init__(self, listener: JobListener, job_id: uuid.UUID) -> None:
        self._listener = listener
        self.job_id = job_id
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, timeout_s: float) -> bool:
        """True when woken by a notification, False when the timeout passed first."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except TimeoutError:
            return False
        finally:
            self._event.clear()
        return True

    def close(self) -> None:
        self._listener.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JobListener:
    def __init__(
        self,
        dsn: str | None = None,
        *,
        channel: str = CHANNEL_STATUS,
        connect_timeout_s: float = 5.0,
        ping_interval_s: float = 10.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.channel = channel
        self.connect_timeout_s = connect_timeout_s
        self.ping_interval_s = ping_interval_s
        self.max_backoff_s = max_backoff_s
        self._subs: dict[uuid.UUID, set[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self.connected = asyncio.Event()
        # Counters, for tests and for a look at a running process.
        self.connects = 0
        self.notifications = 0

    # -- subscribers ---------------------------------------------------------------------------------

    def subscribe(self, job_id: uuid.UUID) -> Subscription:
        sub = Subscription(self, job_id)
        self._subs.setdefault(job_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.job_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[sub.job_id]

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def _wake_all(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub.notify()

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self.notifications += 1
        try:
            job_id = uuid.UUID(str(json.loads(payload)["id"]))
        except (ValueError, KeyError, TypeError):
            log.debug("ignoring notification %r", payload)
            return
        for sub in self._subs.get(job_id, ()):
            sub.notify()

    def _on_terminate(self, conn: Any) -> None:
        self._lost.set()

    # -- connection ----------------------------------------------------------------------------------

    def start(self, dsn: str | None = None) -> None:
        if dsn is not None:
            self.dsn = dsn
        if self.dsn is None:
            raise ValueError("JobListener needs a DSN")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="vramq-listener")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close()
        self._wake_all()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        self.connected.clear()
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)
            if not conn.is_closed():
                conn.terminate()

    async def _run(self) -> None:
        assert self.dsn is not None
        delay = 0.1
        while True:
            try:
                self._lost.clear()
                self._conn = await connect(
                    self.dsn,
                    connect_timeout_s=self.connect_timeout_s,
                    server_settings={"application_name": "vramq-listener"},
                )
                self._conn.add_termination_listener(self._on_terminate)
                await self._conn.add_listener(self.channel, self._on_notify)
                self.connects += 1
                self.connected.set()
                delay = 0.1
                if self.connects > 1:
                    log.info("listener reconnected")
                # Whatever happened while we were not listening is unknown: every stream re-reads.
                self._wake_all()
                await self._watch(self._conn)
                log.warning("listener connection lost; reconnecting")
            except asyncio.CancelledError:
                await self._close()
                raise
            except Exception as exc:
                log.warning(
                    "listener cannot connect (%s: %s); retrying in %.1fs", type(exc).__name__, exc, delay
                )
            await self._close()
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self.max_backoff_s)

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """Return when the connection is gone: closed by the server, or silent past a ping."""
        while not conn.is_closed():
            try:
                await asyncio.wait_for(self._lost.wait(), self.ping_interval_s)
                return
            except TimeoutError:
                pass
            try:
                await conn.fetchval(catalog.PING, timeout=self.connect_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                return
