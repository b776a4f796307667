"""What the reliability scenarios share: a cluster of real processes, load drivers, a restartable
PostgreSQL, and a TCP proxy that can stall.

Every process a scenario starts carries ``VRAMQ_RELIABILITY_RUN=<run id>`` in its environment, and so do
the GPU workers it spawns: that is how ``invariants.assert_no_orphans`` finds survivors without mistaking
the processes of other test runs on the same machine for ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

from db import queue as q
from db.connect import connect
from db.embedded import EmbeddedServer
from tests.procs import Proc, base_env, free_port, models_file, spawn, wait_for
from tests.reliability.invariants import (
    RUN_MARK,
    Verdict,
    assert_ledger_clean,
    assert_no_orphans,
    assert_nothing_leased,
    check_jobs,
    observed_gone,
    wait_settled,
    worker_pids,
)
from tests.reliability.report import Row

FULL = os.environ.get("VRAMQ_CHAOS", "").strip().lower() == "full"


def scale(ci: int, full: int) -> int:
    """How many faults (or cases): the small CI number, or the full one under ``VRAMQ_CHAOS=full``."""
    return full if FULL else ci


def api_available() -> bool:
    try:
        import api.main  # noqa: F401
    except Exception:
        return False
    return True


# Short timings, so faults are noticed (and the scenarios finish) in seconds.
FAST = {
    "VRAMQ_LEASE_TTL_S": "6",
    "VRAMQ_LEASE_EXTEND_INTERVAL_S": "1",
    "VRAMQ_HEARTBEAT_INTERVAL_S": "0.5",
    "VRAMQ_POLL_INTERVAL_S": "0.5",
    "VRAMQ_SHUTDOWN_GRACE_S": "5",
    "VRAMQ_CANCEL_GRACE_S": "0.5",
    "VRAMQ_BACKOFF_BASE_S": "0.2",
    "VRAMQ_BACKOFF_MAX_S": "2",
    "VRAMQ_LOCK_KEEPALIVE_IDLE_S": "1",
    "VRAMQ_DB_CONNECT_TIMEOUT_S": "3",
}


class ProcessWatch:
    """Notices every descendant of the cluster's processes (GPU workers) and records the moment each
    one exits, through a pidfd: the end of an execution that was killed without a record of its own."""

    def __init__(self, parents: Callable[[], list[int]]) -> None:
        self.parents = parents
        self.deaths: dict[int, float] = {}
        self._fds: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._discover())

    async def _discover(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for parent in self.parents():
                try:
                    children = psutil.Process(parent).children(recursive=True)
                except psutil.Error:
                    continue
                for child in children:
                    pid = child.pid
                    if pid in self._fds or pid in self.deaths:
                        continue
                    try:
                        fd = os.pidfd_open(pid)
                    except OSError:
                        continue  # already gone; its death is bounded by the scenario's own records
                    self._fds[pid] = fd
                    loop.add_reader(fd, self._exited, pid)
            await asyncio.sleep(0.05)

    def _exited(self, pid: int) -> None:
        self.deaths.setdefault(pid, time.time())
        fd = self._fds.pop(pid, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # Let exits that already happened be read before the descriptors go.
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        for pid, fd in list(self._fds.items()):
            loop.remove_reader(fd)
            os.close(fd)
            del self._fds[pid]


@dataclass
class Cluster:
    """Real vramq processes of one scenario, all marked with its run id; stopped by ``close``."""

    dsn: str
    root: Path
    pool: str = "p1"
    gpus: str = "fake:1x24GiB"
    models: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    procs: list[Proc] = field(default_factory=list)
    killed_at: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.records = self.root / "executions"
        self.data = self.root / "data"
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.watch = ProcessWatch(lambda: [p.pid for p in self.alive()])
        if self.models is None:
            self.models = models_file(self.root / "models.yaml", max_workers=3, timeout_s=120)

    def _env(self, dsn: str | None, extra: dict[str, str]) -> dict[str, str]:
        env = base_env(dsn or self.dsn, self.data)
        env.update(FAST)
        env.update(
            {
                "VRAMQ_POOL": self.pool,
                "VRAMQ_GPUS": self.gpus,
                "VRAMQ_MODELS_FILE": str(self.models),
                "VRAMQ_DEMO_RECORD_DIR": str(self.records),
                RUN_MARK: self.run_id,
            }
        )
        env.update(self.env)
        env.update(extra)
        return env

    def scheduler(self, name: str, *, dsn: str | None = None, **extra: str) -> Proc:
        proc = spawn([sys.executable, "-m", "scheduler"], self._env(dsn, extra), self.logs / f"{name}.log")
        self.procs.append(proc)
        self.watch.start()
        return proc

    def api(self, name: str, port: int, *, dsn: str | None = None, **extra: str) -> Proc:
        env = self._env(dsn, {"VRAMQ_ENABLE_SCHEDULER": "false", **extra})
        args = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
        proc = spawn([*args, "--log-level", "warning"], env, self.logs / f"{name}.log")
        self.procs.append(proc)
        self.watch.start()
        return proc

    def alive(self) -> list[Proc]:
        return [p for p in self.procs if p.popen.poll() is None]

    def by_pid(self, pid: int) -> Proc | None:
        return next((p for p in self.procs if p.pid == pid), None)

    async def leader(self, conn: asyncpg.Connection, pool: str | None = None) -> asyncpg.Record | None:
        """The pool's live term (not ended, heartbeat within the last few seconds)."""
        row: asyncpg.Record | None = await conn.fetchrow(
            "SELECT term, pid, snapshot, started_at FROM schedulers WHERE pool = $1 AND ended_at IS NULL "
            "AND heartbeat_at > now() - interval '3 seconds' ORDER BY term DESC LIMIT 1",
            pool or self.pool,
        )
        return row

    async def wait_leader(
        self, conn: asyncpg.Connection, pool: str | None = None, *, within: float = 60.0
    ) -> asyncpg.Record:
        async def check() -> asyncpg.Record | None:
            return await self.leader(conn, pool)

        row: asyncpg.Record = await wait_for(check, timeout=within, what=f"a leader of {pool or self.pool}")
        return row

    async def new_leader(
        self, conn: asyncpg.Connection, after_term: int, *, timeout: float, pool: str | None = None
    ) -> asyncpg.Record:
        async def check() -> asyncpg.Record | None:
            row = await self.leader(conn, pool)
            return row if row is not None and row["term"] > after_term else None

        row: asyncpg.Record = await wait_for(check, timeout=timeout, interval=0.01, what="a new leader")
        return row

    async def sigkill_tree(self, proc: Proc) -> float:
        """SIGKILL a scheduler; its workers die with it. Records each worker's end (when it was seen
        gone) for the overlap check, reaps the scheduler, and returns the kill time."""
        workers = worker_pids(proc.pid)
        t = time.time()
        proc.kill()
        for pid in workers:
            self.killed_at[pid] = t
        await asyncio.to_thread(proc.popen.wait, 10)
        seen = await observed_gone(workers, timeout=10)
        self.killed_at.update(seen)
        return t

    async def terminate_all(self, within: float) -> float:
        """SIGTERM every live process at once; returns how long until the last one exited (fails the
        scenario if one is still running after ``within`` seconds)."""
        procs = self.alive()
        t0 = time.monotonic()
        for p in procs:
            p.popen.send_signal(signal.SIGTERM)
        deadline = t0 + within
        late = []
        for p in procs:
            try:
                await asyncio.to_thread(p.popen.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                late.append(p)
        assert not late, f"still running {within:.0f}s after SIGTERM: {[p.log.name for p in late]}"
        return time.monotonic() - t0

    async def close(self, grace: float = 30.0) -> float:
        """SIGTERM every process, wait (drain), then SIGKILL what is left. Returns how long it took."""
        t0 = time.monotonic()
        for p in self.alive():
            p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(p.popen.wait, max(0.1, deadline - time.monotonic()))
        took = time.monotonic() - t0
        await self.watch.stop()
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.kill()
                await asyncio.to_thread(p.popen.wait, 10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        return took

    def ends_of_killed(self) -> dict[int, float]:
        """When each process that may have been killed mid-job ended: its observed exit, else the time
        the scenario killed it."""
        return {**self.killed_at, **self.watch.deaths}

    def logs_tail(self, n: int = 40) -> str:
        out = []
        for p in self.procs:
            lines = p.output().splitlines()[-n:]
            out.append(f"--- {p.log.name} (pid {p.pid}, rc {p.popen.poll()})\n" + "\n".join(lines))
        return "\n".join(out)


def demo_job(seconds: float, **kw: Any) -> q.NewJob:
    return q.NewJob(
        feature="demo",
        model=kw.pop("model", "demo.sleep"),
        inputs={"seconds": seconds, **kw.pop("inputs", {})},
        max_attempts=kw.pop("max_attempts", 20),
        **kw,
    )


@dataclass
class DbLoad:
    """Enqueues demo jobs straight into the database at a steady rate; remembers every accepted id."""

    dsn: str
    rate_hz: float = 8.0
    seconds: tuple[float, float] = (0.2, 1.0)
    make: Callable[[float], q.NewJob] = demo_job
    accepted: list[uuid.UUID] = field(default_factory=list)
    errors: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        conn: asyncpg.Connection | None = None
        rng = random.Random(0)
        try:
            while not stop.is_set():
                try:
                    if conn is None or conn.is_closed():
                        conn = await connect(self.dsn, connect_timeout_s=3)
                    row, _ = await q.enqueue(conn, self.make(round(rng.uniform(*self.seconds), 3)))
                    self.accepted.append(row["id"])
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                    self.errors += 1
                    if conn is not None:
                        conn.terminate()
                        conn = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0 / self.rate_hz)
        finally:
            if conn is not None:
                conn.terminate()


@dataclass
class HttpLoad:
    """Submits demo jobs over HTTP with an Idempotency-Key each, retrying a submission (same key) until
    the API accepts it: every submission ends known. Counts what the API answered meanwhile."""

    base_url: str
    rate_hz: float = 5.0
    seconds: tuple[float, float] = (0.2, 1.0)
    headers: dict[str, str] = field(default_factory=dict)
    accepted: list[uuid.UUID] = field(default_factory=list)
    answers: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0
    unresolved: int = 0

    async def submit(self, client: httpx.AsyncClient, body: dict[str, Any], deadline: float) -> None:
        key = uuid.uuid4().hex
        while True:
            try:
                r = await client.post(
                    "/api/v1/jobs", json=body, headers={**self.headers, "Idempotency-Key": key}
                )
                self.answers[r.status_code] = self.answers.get(r.status_code, 0) + 1
                if r.status_code in (200, 202):
                    self.accepted.append(uuid.UUID(r.json()["id"]))
                    return
                if r.status_code < 500:
                    raise AssertionError(f"the API refused a valid job: {r.status_code} {r.text}")
            except httpx.TransportError:
                self.transport_errors += 1
            if time.monotonic() > deadline:
                self.unresolved += 1
                return
            await asyncio.sleep(0.1)

    async def run(self, stop: asyncio.Event, settle_s: float = 60.0) -> None:
        rng = random.Random(1)
        pending: set[asyncio.Task[None]] = set()
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10.0) as client:
            while not stop.is_set():
                body = {
                    "model": "demo.sleep",
                    "inputs": {"seconds": round(rng.uniform(*self.seconds), 3)},
                    "max_attempts": 20,
                }
                task = asyncio.create_task(self.submit(client, body, time.monotonic() + settle_s))
                pending.add(task)
                task.add_done_callback(pending.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0 / self.rate_hz)
            if pending:
                await asyncio.gather(*pending)

    @property
    def server_errors(self) -> dict[int, int]:
        return {k: v for k, v in self.answers.items() if k >= 500 and k != 503}


@contextlib.asynccontextmanager
async def running(load: DbLoad | HttpLoad) -> AsyncIterator[asyncio.Event]:
    """Run a load driver in the background; leaving the block stops it and waits for it."""
    stop = asyncio.Event()
    task = asyncio.create_task(load.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await task


async def wait_http_ready(base_url: str, proc: Proc, timeout: float = 60.0) -> None:
    async def ready() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"the API exited early:\n{proc.output()[-3000:]}")
        try:
            async with httpx.AsyncClient(base_url=base_url, timeout=2.0) as c:
                r = await c.get("/readyz")
                return r.status_code == 200 and bool(r.json().get("listener", True))
        except httpx.TransportError:
            return False

    await wait_for(ready, timeout=timeout, interval=0.1, what=f"the API at {base_url} to be ready")


# -- a PostgreSQL of the scenario's own, that it may stop, restart and crash ---------------------------


class RestartablePg:
    """A throwaway embedded PostgreSQL on a TCP port, for scenarios that take the database down.

    Durable commits, as in production: with ``fast_unsafe`` (``synchronous_commit=off``) an immediate
    shutdown drops the last commits the server had already acknowledged, and this scenario would rightly
    report those jobs lost.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.server = EmbeddedServer(root, tcp_port=self.port, fast_unsafe=False)

    def start(self) -> None:
        self.server.start()

    def dsn(self, database: str = "postgres") -> str:
        return self.server.dsn(database)

    def restart(self, mode: str) -> None:
        """``pg_ctl restart -m fast|immediate`` (immediate: no checkpoint, crash recovery on start)."""
        res = self.server._pg_ctl("-m", mode, "-w", "-t", "60", "restart", timeout=90)
        assert res.returncode == 0, res.stderr

    def stop(self, mode: str) -> None:
        res = self.server._pg_ctl("-m", mode, "-w", "-t", "60", "stop", timeout=90)
        assert res.returncode == 0, res.stderr

    def start_again(self) -> None:
        self.server._start_server()

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


async def accepts_connections(dsn: str) -> bool:
    try:
        c = await connect(dsn, connect_timeout_s=2)
    except (OSError, asyncpg.PostgresError, TimeoutError, asyncpg.InterfaceError):
        return False
    await c.close()
    return True


# -- a TCP proxy that can stall ----------------------------------------------------------------------


class StallingProxy:
    """Forwards TCP connections to PostgreSQL until ``stall()``: then every connection, old and new,
    stops moving bytes in both directions while staying open (a half-open network path: no FIN, no
    RST). The proxy's own kernel still answers TCP keepalives on both sides."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def dsn_for(self, dsn: str) -> str:
        host, port = self.upstream
        return dsn.replace(f"@{host}:{port}/", f"@127.0.0.1:{self.port}/")

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        await self.flowing.wait()
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._writers.append(up_w)
        for src, dst in ((reader, up_w), (up_r, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self.flowing.wait()
                data = await src.read(65536)
                await self.flowing.wait()
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for w in self._writers:
            with contextlib.suppress(Exception):
                w.close()
        self._tasks.clear()
        self._writers.clear()


async def conclude(
    cluster: Cluster,
    db: asyncpg.Connection,
    row: Row,
    *,
    accepted: list[uuid.UUID],
    settle_timeout: float = 120.0,
    pools: tuple[str, ...] | None = None,
    check_ledger: bool = True,
) -> Verdict:
    """The end of every scenario: let the system settle, check the live ledger, stop everything, check
    that nothing survived, then check every job; the figures go into the scenario's report row."""
    try:
        await wait_settled(db, timeout=settle_timeout)
        if check_ledger:
            for pool in pools or (cluster.pool,):
                await assert_ledger_clean(db, pool)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs_tail()}") from None
    finally:
        await cluster.close()
    await assert_no_orphans(cluster.run_id)
    await assert_nothing_leased(db)
    verdict = await check_jobs(
        db, accepted=accepted, record_dir=cluster.records, killed_at=cluster.ends_of_killed()
    )
    row.accepted = len(set(accepted))
    row.lost = len(verdict.lost)
    row.duplicates = verdict.duplicates
    row.extra.update({"executions": verdict.executions, "reruns": verdict.reruns, **verdict.statuses})
    verdict.assert_ok()
    return verdict
