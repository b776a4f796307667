"""Leader election: one scheduler leader per GPU pool, elected by PostgreSQL.

What the database is authoritative for
--------------------------------------
- *Who leads a pool*: whoever holds the session advisory lock ``(hashtext('vramq'), hashtext(pool))``
  on a dedicated connection. Nothing else confers leadership; a process that lost that connection is
  no longer the leader, whatever it believes.
- *Which jobs a leader may write*: those whose ``lease_owner`` is its term (a number from a sequence,
  one per leadership, recorded in ``schedulers``). Every scheduler write is fenced on it.
- *Time*: ``now()`` of the database; a leader uses its own monotonic clock only to fence itself early.

States of a candidate
---------------------
::

    connecting ──▶ waiting (blocked in pg_advisory_lock) ──lock granted──▶ leading
        ▲                 │ connection error                                │
        └─────────────────┴──────────────── step down ◀─────────────────────┘
                                     (lock connection lost, heartbeat failed,
                                      leases not renewed in time, stop requested)

Leading (``scheduler.loop.Leader``): open a term row, rescue what earlier terms of this pool left
behind, then loop: claim only what can start now, dispatch to warm GPU workers, renew leases in one
statement, heartbeat the term row with a snapshot (GPUs, workers, VRAM ledger).

Failure rules
-------------
- Lock connection closes or errors (database restart, network cut, ``pg_terminate_backend``): stop
  dispatching at once, SIGKILL every worker, try to requeue the term's jobs (fenced; harmless if a
  successor already did), and compete again after a short backoff.
- Half-open connection (packets vanish): TCP keepalives on both ends (client socket options, server
  ``tcp_keepalives_*`` for the session) turn it into an error within ~11 s, and the heartbeat on the
  lock connection has a timeout, so the leader notices within a few seconds.
- Leases not renewed for ``0.6 * lease_ttl_s`` (the pool connections are broken): the leader fences
  itself — kills its workers and steps down — before its leases can expire, so a job is never run by
  two schedulers at once.
- A successor rescues an earlier term's jobs at once only when that term is known to have stopped its
  workers: it stepped down cleanly (its last snapshot says ``stopped``), or it ran on this host (same
  boot and pid namespace) and its process is gone — then any of its workers still alive are killed
  first. Otherwise the jobs are requeued when their leases expire.
- Worker subprocesses die with the leader process (PR_SET_PDEATHSIG and a watchdog), so a dead leader
  never leaves VRAM held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

import asyncpg

from core.registry import Registry
from core.settings import Settings
from db import sql
from db.connect import connect, create_pool
from scheduler.gpus import GpuProbe

log = logging.getLogger("vramq.scheduler")

# Errors that mean "the database is unreachable or the connection broke": retry, never crash.
DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
)


class LeadershipLost(Exception):
    """The term is over: the lock connection broke, the term was ended, or leases went stale."""


def host_key() -> str:
    """Identifies this host's process namespace: pids are comparable only under the same key."""
    boot = ""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as fh:
        boot = fh.read().strip()
    pidns = ""
    with contextlib.suppress(OSError):
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    return f"{socket.gethostname()}/{boot}/{pidns}"


def _set_client_keepalive(conn: asyncpg.Connection, settings: Settings) -> None:
    """Client-side TCP keepalives on the lock connection (asyncpg exposes no option for it)."""
    transport = conn._transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, settings.lock_keepalive_idle_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 10_000)


async def connect_lock(dsn: str, settings: Settings) -> asyncpg.Connection:
    """A dedicated session connection for the advisory lock, LISTEN and heartbeats."""
    conn = await connect(
        dsn,
        connect_timeout_s=settings.db_connect_timeout_s,
        server_settings={
            "application_name": f"vramq-scheduler {settings.pool}"[:63],
            "tcp_keepalives_idle": str(settings.lock_keepalive_idle_s),
            "tcp_keepalives_interval": "2",
            "tcp_keepalives_count": "3",
        },
    )
    _set_client_keepalive(conn, settings)
    if conn.get_server_version().major >= 14:
        # The leader heartbeats every heartbeat_interval_s on this connection; a session idle for
        # several intervals belongs to a leader that is gone or cut off.
        idle_ms = int(max(5.0, 4 * settings.heartbeat_interval_s) * 1000)
        await conn.fetchval(sql.SESSION_IDLE_TIMEOUT, str(idle_ms))
    return conn


class Candidate:
    """Competes for a pool's leadership until stopped; leads whenever it holds the lock."""

    def __init__(
        self,
        *,
        settings: Settings,
        dsn: str,
        registry: Registry,
        probe: GpuProbe,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        self.registry = registry
        self.probe = probe
        self.state = "connecting"
        self.term: int | None = None
        self.terms_led: list[int] = []
        self._stop = asyncio.Event()
        self._leader: Any = None

    @property
    def is_leader(self) -> bool:
        return self.state == "leading"

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Compete, lead, step down, compete again — until ``request_stop``; then drain and return."""
        backoff = 0.1
        while not self._stop.is_set():
            try:
                await self._compete_and_lead()
                backoff = 0.1
            except DB_ERRORS as exc:
                log.warning(
                    "scheduler for pool %s: database unavailable (%s); retrying", self.settings.pool, exc
                )
            except LeadershipLost as exc:
                log.warning("scheduler for pool %s stepped down: %s", self.settings.pool, exc)
            except asyncpg.PostgresError as exc:
                log.error("scheduler for pool %s: database error: %s", self.settings.pool, exc)
            except Exception:
                # A bug must not end the candidate: log it, step back, and compete again.
                log.exception("scheduler for pool %s failed", self.settings.pool)
            self.state = "connecting"
            self.term = None
            if self._stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            backoff = min(backoff * 2, 5.0)

    async def _compete_and_lead(self) -> None:
        from scheduler.loop import Leader

        self.state = "connecting"
        lock_conn = await connect_lock(self.dsn, self.settings)
        pool: asyncpg.Pool | None = None
        outcomes: asyncpg.Pool | None = None
        try:
            self.state = "waiting"
            if not await self._acquire(lock_conn):
                return  # stop requested while waiting
            idle_tx_ms = str(int(max(5.0, self.settings.lease_ttl_s / 2) * 1000))
            name = f"vramq-leader {self.settings.pool}"[:63]
            pool = await create_pool(
                self.dsn,
                min_size=2,
                max_size=4,
                connect_timeout_s=self.settings.db_connect_timeout_s,
                command_timeout=self.settings.db_command_timeout_s,
                server_settings={
                    "application_name": name,
                    # Claims, starts, progress and lease renewals need not wait for the WAL flush: if
                    # the server crashes before it, this leader loses its lock connection and stops
                    # its workers, and the jobs are simply claimed again.
                    "synchronous_commit": "off",
                    # A leader frozen inside a transaction must not hold job rows locked for ever.
                    "idle_in_transaction_session_timeout": idle_tx_ms,
                },
            )
            # Job outcomes (succeeded, failed, cancelled) are what clients act on: durable commits.
            outcomes = await create_pool(
                self.dsn,
                min_size=1,
                max_size=2,
                connect_timeout_s=self.settings.db_connect_timeout_s,
                command_timeout=self.settings.db_command_timeout_s,
                server_settings={
                    "application_name": name,
                    "idle_in_transaction_session_timeout": idle_tx_ms,
                },
            )
            self.state = "leading"
            leader = Leader(
                settings=self.settings,
                registry=self.registry,
                probe=self.probe,
                lock_conn=lock_conn,
                pool=pool,
                outcomes=outcomes,
                host=socket.gethostname(),
                host_key=host_key(),
                own_terms=self.terms_led,
            )
            self._leader = leader
            try:
                await leader.run(self._stop)
            finally:
                self._leader = None
                if leader.term is not None:
                    self.terms_led.append(leader.term)
        finally:
            self.state = "connecting"
            for p in (pool, outcomes):
                if p is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(p.close(), 5)
                    p.terminate()
            await self._close_lock(lock_conn)

    async def _acquire(self, lock_conn: asyncpg.Connection) -> bool:
        """Block on the advisory lock; False if a stop was requested first."""
        lock = asyncio.ensure_future(lock_conn.fetchval(sql.LEADER_LOCK, self.settings.pool, timeout=None))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait({lock, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if lock in done:
            lock.result()
            return True
        lock.cancel()
        with contextlib.suppress(BaseException):
            await lock
        return False

    async def _close_lock(self, lock_conn: asyncpg.Connection) -> None:
        if lock_conn.is_closed():
            return
        try:
            # Closing the session releases the lock; unlock first so a standby need not wait for the
            # backend to notice the close.
            await asyncio.wait_for(lock_conn.fetchval(sql.LEADER_UNLOCK, self.settings.pool), 2)
            await asyncio.wait_for(lock_conn.close(), 2)
        except Exception:
            lock_conn.terminate()
