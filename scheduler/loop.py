"""One leadership term: claim what can start now, run it on warm GPU workers, record how it ended.

The loop is a single asyncio task woken by NOTIFY (new jobs, cancels), by workers (ready, free, gone)
and by a slow poll (notifications can be lost). Each round:

1. hands queued jobs to warm workers with room (one claim statement for all models): one job to an
   idle worker, or, for models whose jobs take milliseconds, up to ``PIPELINE_DEPTH`` queued on each
   worker so that it never waits for the next claim (they travel to it in one message);
2. peeks at the queue heads of models that could use more workers and asks ``scheduler.placement`` for
   starts, evictions and an anti-starvation reservation;
3. fails jobs that can never run here (a model bigger than every GPU) instead of letting them wait.

The claim itself moves a job to running on the worker chosen for it. Writes that do not gate dispatch
(progress, results, failures, releases) go through one writer task that batches whatever accumulated,
one statement per kind of write, in order. Side tasks renew leases (one statement),
heartbeat the term row on the lock connection, rescue expired leases, and prune old jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from core.processes import pid_alive
from core.registry import ModelSpec, Registry
from core.settings import Settings
from core.types import ErrorKind
from db import queue as q
from db import sql
from scheduler import placement
from scheduler.gpus import GpuProbe
from scheduler.leader import DB_ERRORS, LeadershipLost
from scheduler.workerpool import (
    CancelledAck,
    Crashed,
    Done,
    Failed,
    Progress,
    Unfinished,
    WorkerHandle,
    WorkerStartError,
)

log = logging.getLogger("vramq.scheduler")

SELF_FENCE_FRACTION = 0.6  # of lease_ttl_s without a renewal: stop everything before leases expire
PEEK_MIN_INTERVAL_S = 0.05
LOAD_RETRY_BASE_S = 1.0
PRUNE_INTERVAL_S = 3600.0
PIPELINE_MAX_RUN_S = 0.05  # queue jobs on busy workers only for models whose jobs average less than this
PIPELINE_DEPTH = 32  # jobs queued on one worker at most (the running one included)
PIPELINE_WINDOW_S = 0.05  # ... and at most this much expected work
# Claim nothing while this many finished jobs wait for their outcome to be written: workers must not
# run ahead of the database (a leader that dies loses those outcomes, and their jobs run again).
MAX_UNRECORDED = 1024


@dataclass
class ActiveJob:
    id: uuid.UUID
    model: str
    attempt: int
    worker: WorkerHandle
    fut: asyncio.Future[Any] | None = None
    cancel_requested: bool = False
    lost: bool = False


@dataclass
class _Pending:
    progress: dict[uuid.UUID, tuple[float, str]] = field(default_factory=dict)
    completes: list[tuple[uuid.UUID, dict[str, Any]]] = field(default_factory=list)
    outputs: list[q.Output] = field(default_factory=list)
    fails: list[q.Failure] = field(default_factory=list)
    cancels: list[uuid.UUID] = field(default_factory=list)
    releases: list[tuple[uuid.UUID, str]] = field(default_factory=list)  # (job, why)

    def ids(self) -> set[uuid.UUID]:
        """Jobs whose outcome this batch holds (still leased to the term until it is written)."""
        return (
            {c[0] for c in self.completes}
            | {f.job_id for f in self.fails}
            | set(self.cancels)
            | {r[0] for r in self.releases}
        )

    def outcomes(self) -> int:
        return len(self.completes) + len(self.fails) + len(self.cancels) + len(self.releases)

    def empty(self) -> bool:
        return not (self.progress or self.completes or self.fails or self.cancels or self.releases)


def _pid_matches(pid: int, create_time: float | None) -> bool:
    try:
        proc = psutil.Process(pid)
        return create_time is None or abs(proc.create_time() - create_time) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return False


class Leader:
    """Runs one term: ``run(stop)`` returns after draining when stopped, raises when leadership is lost."""

    def __init__(
        self,
        *,
        settings: Settings,
        registry: Registry,
        probe: GpuProbe,
        lock_conn: asyncpg.Connection,
        pool: asyncpg.Pool,
        outcomes: asyncpg.Pool | None = None,
        host: str,
        host_key: str,
        own_terms: list[int] | None = None,
    ) -> None:
        self.s = settings
        self.registry = registry
        self.probe = probe
        self.lock_conn = lock_conn
        self.pool = pool  # commits asynchronously: claims, progress, renewals
        self.outcomes = outcomes if outcomes is not None else pool  # durable commits: job outcomes
        self.host = host
        self.host_key = host_key
        self.own_terms = list(own_terms or [])
        self.term: int | None = None
        self.workers: dict[str, WorkerHandle] = {}
        self.active: dict[uuid.UUID, ActiveJob] = {}
        self.estimates: dict[str, int] = {m.id: m.vram_mb for m in registry}
        self.load_backoff: dict[str, tuple[int, float]] = {}
        self.reservation: placement.Reservation | None = None
        self.dirty: set[str] = {m.id for m in registry}  # queues to look at for placement
        # Models whose queue may hold jobs to claim: set by NOTIFY and the poll, cleared by a claim
        # that came back short. A worker that frees up claims only for these, so an empty queue
        # costs no statement per finished job (and no delay for the next job's claim).
        self.claimable: set[str] = {m.id for m in registry}
        self._wake = asyncio.Event()
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._pending = _Pending()
        self._write_wake = asyncio.Event()
        self._writer_idle = asyncio.Event()
        self._writer_idle.set()
        self._last_peek = 0.0
        self._last_poll = 0.0
        self._last_lease_ok = time.monotonic()
        self._draining = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        # Jobs leased to this term but not in `active`: claimed and being dispatched, or finished with
        # their outcome not yet written. Anything else the lease renewal finds is an orphan.
        self._claiming: set[uuid.UUID] = set()
        self._inflight = _Pending()  # the batch the writer is flushing now
        self._orphans: set[uuid.UUID] = set()
        self.run_ema: dict[str, float] = {}
        self._files_dir = Path(settings.files_dir).resolve()

    # ----------------------------------------------------------------------------------------------
    # Life cycle
    # ----------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self.lock_conn.add_termination_listener(self._on_lock_closed)
        self.term = await q.open_term(
            self.lock_conn, pool=self.s.pool, host=self.host, pid=os.getpid(), snapshot=self.snapshot()
        )
        log.info("pool %s: leading as term %s (pid %s)", self.s.pool, self.term, os.getpid())
        try:
            await self._rescue_earlier_terms()
            await self.lock_conn.add_listener(sql.CHANNEL_NEW, self._on_notify_new)
            await self.lock_conn.add_listener(sql.CHANNEL_CANCEL, self._on_notify_cancel)
            self._tasks = [
                asyncio.create_task(self._writer(), name="vramq-writer"),
                asyncio.create_task(self._lease_keeper(), name="vramq-leases"),
                asyncio.create_task(self._heartbeat(), name="vramq-heartbeat"),
                asyncio.create_task(self._janitor(), name="vramq-janitor"),
            ]
            stop_task = asyncio.create_task(stop.wait())
            lost_task = asyncio.create_task(self._lost.wait())
            try:
                while True:
                    if self._lost.is_set():
                        raise LeadershipLost(self._lost_reason)
                    if stop.is_set():
                        break
                    for t in self._tasks:
                        if t.done() and t.exception() is not None:
                            raise LeadershipLost(f"{t.get_name()} failed: {t.exception()!r}")
                    self._wake.clear()
                    try:
                        await self._round()
                    except (*DB_ERRORS, asyncpg.PostgresError) as exc:
                        # Leadership is judged by the lock connection and lease renewals, not by one
                        # failed statement; a claim whose answer was lost is released as an orphan.
                        log.warning("term %s: round failed: %s", self.term, exc)
                        await asyncio.sleep(0.2)
                    timeout = max(0.0, self.s.poll_interval_s - (time.monotonic() - self._last_poll))
                    wake_task = asyncio.create_task(self._wake.wait())
                    await asyncio.wait(
                        {wake_task, stop_task, lost_task, *self._tasks},
                        timeout=timeout,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    wake_task.cancel()
            finally:
                stop_task.cancel()
                lost_task.cancel()
            await self._drain()
        except LeadershipLost as exc:
            log.error("pool %s: term %s lost leadership: %s", self.s.pool, self.term, exc)
            await self._step_down()
            raise
        except BaseException:
            await self._step_down()
            raise
        finally:
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                with contextlib.suppress(BaseException):
                    await t

    def _on_lock_closed(self, conn: object) -> None:
        self._lose("the lock connection closed")

    def _lose(self, reason: str) -> None:
        if not self._lost.is_set():
            self._lost_reason = reason
            self._lost.set()
            # Stop dispatching at once: nothing this term starts from now on may run.
            for w in list(self.workers.values()):
                w.kill()

    def _background(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def wake(self) -> None:
        self._wake.set()

    async def _rescue_earlier_terms(self) -> None:
        assert self.term is not None
        rescued: list[int] = []
        for t in await q.earlier_terms(self.lock_conn, pool=self.s.pool, term=self.term):
            if not t["active"]:
                continue
            snap = t["snapshot"] or {}
            same_host = snap.get("host_key") == self.host_key
            stopped = bool(snap.get("stopped")) or (t["term"] in self.own_terms and same_host)
            dead = same_host and not pid_alive(int(t["pid"]))
            if same_host and dead:
                for w in snap.get("workers", []):
                    pid = w.get("pid")
                    if isinstance(pid, int) and _pid_matches(pid, w.get("pid_create_time")):
                        log.warning("killing worker pid %s left by dead term %s", pid, t["term"])
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, 9)
            if stopped or dead:
                rescued.append(int(t["term"]))
        if rescued:
            rows = await q.rescue_terms(self.lock_conn, rescued)
            log.info("term %s rescued %d jobs of dead terms %s", self.term, len(rows), rescued)
        await q.end_earlier_terms(self.lock_conn, pool=self.s.pool, term=self.term)

    async def _drain(self) -> None:
        """Graceful stop: claim nothing more, let running jobs finish within the grace, requeue the rest."""
        self._draining = True
        deadline = time.monotonic() + self.s.shutdown_grace_s
        log.info("term %s draining %d running jobs", self.term, len(self.active))
        while self.active and time.monotonic() < deadline and not self._lost.is_set():
            futs = [a.fut for a in self.active.values() if a.fut is not None]
            if not futs:
                break
            await asyncio.wait(futs, timeout=max(0.0, deadline - time.monotonic()))
        leftover = list(self.active.values())
        for a in leftover:
            a.lost = True
            a.worker.kill()
        futs = [a.fut for a in leftover if a.fut is not None]
        if futs:
            await asyncio.wait(futs, timeout=10)
        self._pending.releases.extend((a.id, "its scheduler stopped") for a in leftover)
        await self._stop_workers(grace_s=2.0)
        await self._flush_until_empty(limit_s=10.0)
        await self._final_snapshot()

    async def _step_down(self) -> None:
        """Lost leadership: kill every worker now, then requeue this term's jobs if the database lets us."""
        self._draining = True
        for a in self.active.values():
            a.lost = True  # requeued with the term's other jobs below
        for w in list(self.workers.values()):
            w.kill()
        await asyncio.gather(*(w.wait_exit(5) for w in list(self.workers.values())), return_exceptions=True)
        self.workers.clear()
        await self._final_snapshot()

    async def _cancel_side_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t

    async def _final_snapshot(self) -> None:
        """Requeue what is left, record that this term's workers are stopped (a successor may rescue
        at once), and end the term. Best effort: if the database is unreachable, leases expire."""
        await self._cancel_side_tasks()
        if self.term is None:
            return
        try:
            async with asyncio.timeout(3):
                await q.rescue_terms(self.pool, [self.term])
                await q.heartbeat(self.pool, term=self.term, snapshot={**self.snapshot(), "stopped": True})
                await q.end_term(self.pool, term=self.term)
        except Exception as exc:
            log.warning("term %s: could not record its end: %s", self.term, exc)

    async def _stop_workers(self, grace_s: float) -> None:
        workers = list(self.workers.values())
        await asyncio.gather(*(w.stop(grace_s) for w in workers), return_exceptions=True)
        self.workers.clear()

    # ----------------------------------------------------------------------------------------------
    # Notifications
    # ----------------------------------------------------------------------------------------------

    def _on_notify_new(self, conn: object, pid: int, channel: str, payload: str) -> None:
        if payload.startswith("*"):
            feature = payload[1:]
            self.dirty.update(m.id for m in self.registry.by_feature(feature))
            self.claimable.update(m.id for m in self.registry.by_feature(feature))
        elif payload in self.registry:
            self.dirty.add(payload)
            self.claimable.add(payload)
        self.wake()

    def _on_notify_cancel(self, conn: object, pid: int, channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self._request_cancel(uuid.UUID(payload))

    def _request_cancel(self, job_id: uuid.UUID) -> None:
        active = self.active.get(job_id)
        if active is None:
            return
        if active.cancel_requested:
            return
        active.cancel_requested = True
        log.info("cancelling job %s on worker %s", job_id, active.worker.name)
        if not active.worker.cancel(str(job_id), grace_s=self.s.cancel_grace_s):
            active.worker.kill()

    # ----------------------------------------------------------------------------------------------
    # The round
    # ----------------------------------------------------------------------------------------------

    def _gpus(self) -> list[placement.Gpu]:
        return [placement.Gpu(id=d.id, total_mb=d.total_mb, free_mb=d.free_mb) for d in self.probe.devices()]

    def _pworkers(self) -> list[placement.Worker]:
        out = []
        for w in self.workers.values():
            if w.state == "gone":
                continue
            state = {"spawning": "loading", "loading": "loading", "idle": "idle", "busy": "busy"}.get(
                w.state, "stopping"
            )
            vram = w.vram_mb if w.vram_mb is not None else self.estimates.get(w.spec.id, w.spec.vram_mb)
            out.append(
                placement.Worker(
                    id=w.name,
                    model=w.spec.id,
                    gpu_id=w.gpu_id,
                    state=state,  # type: ignore[arg-type]
                    vram_mb=int(vram),
                    last_used=w.last_used,
                )
            )
        return out

    def _depth(self, model: str) -> int:
        """Jobs one worker of ``model`` may hold: 1, or a short queue for models whose jobs take
        milliseconds (it hides the claim round trip between two jobs). Long jobs are never held back
        from other workers or pools."""
        ema = self.run_ema.get(model)
        if ema is None or ema > PIPELINE_MAX_RUN_S:
            return 1
        return max(2, min(PIPELINE_DEPTH, int(PIPELINE_WINDOW_S / max(ema, 1e-6))))

    def _warm_by_model(self) -> dict[str, list[WorkerHandle]]:
        """Warm workers (idle or busy) per model, minus those on a GPU reserved for another model."""
        warm: dict[str, list[WorkerHandle]] = {}
        res = self.reservation
        for w in self.workers.values():
            if w.state not in ("idle", "busy"):
                continue
            if res is not None and w.gpu_id == res.gpu_id and w.spec.id != res.model:
                continue  # a reserved GPU serves only the starving model
            warm.setdefault(w.spec.id, []).append(w)
        return warm

    async def _round(self) -> None:
        if self._draining or self._lost.is_set():
            return
        now = time.monotonic()
        poll = now - self._last_poll >= self.s.poll_interval_s
        if poll:
            self._last_poll = now
            self.dirty.update(m.id for m in self.registry)
            self.claimable.update(m.id for m in self.registry)
            await self._check_cancels()

        # 1. Warm reuse: one claim filling the free slots of every claimable model's warm workers
        #    (none while the writer is behind: it wakes the loop when it has caught up).
        if self._pending.outcomes() + self._inflight.outcomes() < MAX_UNRECORDED:
            warm = self._warm_by_model()
            await self._claim_and_dispatch(
                {m: self._slots(ws, m) for m, ws in warm.items() if m in self.claimable}
            )

        # 2. Idle expiry.
        expired = placement.idle_expired(
            self._pworkers(), {m.id: m.idle_evict_s for m in self.registry}, time.monotonic()
        )
        for wid in expired:
            self._stop_worker(wid, "idle for longer than its model's idle_evict_s")

        # 3. Starts, evictions, reservations for models that might need more workers.
        if self.dirty and (poll or now - self._last_peek >= PEEK_MIN_INTERVAL_S):
            await self._place()

    async def _claim_and_dispatch(self, slots: Mapping[str, list[tuple[str, str]]]) -> None:
        """Claim one job per slot (``slots[model]``: (worker, gpu) in claim order, from ``_slots``) and
        hand each to its slot's worker; the claim itself moves the jobs to running on them."""
        assert self.term is not None
        wants = [
            q.Want(model=m, feature=self.registry.get(m).feature, n=len(lst))  # type: ignore[union-attr]
            for m, lst in slots.items()
            if lst and m in self.registry
        ]
        if not wants:
            return
        # Cleared before the statement: a NOTIFY that arrives while it runs marks the model again.
        self.claimable.difference_update(w.model for w in wants)
        try:
            rows = await q.claim(
                self.pool,
                term=self.term,
                wants=wants,
                pool=self.s.pool,
                lease_ttl_s=self.s.lease_ttl_s,
                slots=slots,
            )
        except BaseException:
            self.claimable.update(w.model for w in wants)
            raise
        self._claiming.update(r["id"] for r in rows)
        got: dict[str, int] = {}
        for r in rows:
            got[r["model"]] = got.get(r["model"], 0) + 1
        for w in wants:
            if got.get(w.model, 0) < w.n:
                self.dirty.discard(w.model)  # the queue of this model is empty for now
            else:
                self.claimable.add(w.model)  # there may be more
        try:
            if rows:
                await self._dispatch(rows)
        finally:
            self._claiming.difference_update(r["id"] for r in rows)

    async def _dispatch(self, rows: list[Any]) -> None:
        files = await self._resolve_files(rows)
        for r in rows:
            job_id: uuid.UUID = r["id"]
            spec = self.registry.get(r["model"])
            if spec is None:
                self._pending.releases.append((job_id, "no such model on this scheduler"))
                continue
            inputs, bad = self._worker_inputs(r, spec, files)
            if bad is not None:
                self._pending.fails.append(q.Failure(job_id, ErrorKind.INVALID_INPUT, bad, retry=False))
                continue
            worker = self.workers.get(r["worker"]) if r["worker"] is not None else None
            if worker is not None and worker.state in ("idle", "busy"):
                self._start_job(r, spec, inputs, worker)
            else:  # the worker went away while the claim ran
                self._pending.releases.append((job_id, "its worker went away before it started"))
        self._write_wake.set()

    def _slots(
        self, workers: Iterable[WorkerHandle], model: str, n: int | None = None
    ) -> list[tuple[str, str]]:
        """Free slots of ``workers`` for the next jobs of ``model`` (at most ``n``), in claim order:
        each job to the worker with the fewest jobs at that point, so a claim spreads evenly."""
        depth = self._depth(model)
        load = {w.name: w.inflight for w in workers if w.state in ("idle", "busy")}
        gpus = {w.name: w.gpu_id for w in workers}
        out: list[tuple[str, str]] = []
        while load and (n is None or len(out) < n):
            name = min(load, key=load.__getitem__)
            if load[name] >= depth:
                break
            load[name] += 1
            out.append((name, gpus[name]))
        return out

    def _start_job(self, r: Any, spec: ModelSpec, inputs: dict[str, Any], worker: WorkerHandle) -> None:
        job_id: uuid.UUID = r["id"]
        timeout = float(r["timeout_s"] or spec.timeout_s)
        out_dir = self._files_dir / "outputs" / str(job_id)
        active = ActiveJob(id=job_id, model=spec.id, attempt=int(r["attempts"]), worker=worker)
        self.active[job_id] = active
        last_progress = 0.0

        def on_progress(p: Progress) -> None:
            nonlocal last_progress
            now = time.monotonic()
            if p.fraction >= 1.0 or now - last_progress >= self.s.progress_min_interval_s:
                last_progress = now
                self._pending.progress[job_id] = (p.fraction, p.message)
                self._write_wake.set()

        fut = worker.submit(str(job_id), active.attempt, inputs, out_dir, on_progress, timeout_s=timeout)
        active.fut = fut
        fut.add_done_callback(lambda f: self._job_ended(active, spec, out_dir, timeout, f))
        if r["cancel_requested_at"] is not None:
            self._request_cancel(job_id)

    async def _resolve_files(self, rows: list[Any]) -> dict[uuid.UUID, Mapping[str, Any]]:
        """Look up the uploads named by the jobs' file inputs (only the job's own tenant's files)."""
        wanted: dict[str, set[uuid.UUID]] = {}
        for r in rows:
            spec = self.registry.get(r["model"])
            if spec is None:
                continue
            for key in spec.file_inputs:
                ref = (r["inputs"] or {}).get(key)
                if isinstance(ref, dict) and isinstance(ref.get("file"), str):
                    with contextlib.suppress(ValueError):
                        wanted.setdefault(r["tenant"], set()).add(uuid.UUID(ref["file"]))
        out: dict[uuid.UUID, Mapping[str, Any]] = {}
        for tenant, ids in wanted.items():
            for f in await q.input_files(self.pool, list(ids), tenant=tenant):
                out[f["id"]] = f
        return out

    def _worker_inputs(
        self, row: Any, spec: ModelSpec, files: Mapping[uuid.UUID, Mapping[str, Any]]
    ) -> tuple[dict[str, Any], str | None]:
        inputs = dict(row["inputs"] or {})
        for key in spec.file_inputs:
            if key not in inputs:
                continue
            ref = inputs[key]
            try:
                fid = uuid.UUID(ref["file"])
                f = files[fid]
            except (KeyError, TypeError, ValueError):
                return inputs, f"inputs.{key}: no such uploaded file"
            path = (self._files_dir / f["path"]).resolve()
            if not path.is_relative_to(self._files_dir) or not path.is_file():
                return inputs, f"inputs.{key}: the uploaded file is no longer available"
            inputs[key] = {"file": str(fid), "path": str(path), "name": f["name"], "size": int(f["size"])}
        return inputs, None

    async def _place(self) -> None:
        assert self.term is not None
        self._last_peek = time.monotonic()
        models = [m for m in self.registry if m.id in self.dirty]
        self.dirty.clear()
        if not models:
            return
        wants = [q.Want(model=m.id, feature=m.feature, n=max(m.max_workers, 1)) for m in models]
        rows = await q.peek(self.pool, wants, pool=self.s.pool)
        now = time.monotonic()
        demands = []
        for r in rows:
            if r["queued"] <= 0:
                continue
            spec = self.registry.get(r["model"])
            if spec is None:
                continue
            _, not_before = self.load_backoff.get(spec.id, (0, 0.0))
            if now < not_before:
                self.dirty.add(spec.id)
                continue
            demands.append(
                placement.Demand(
                    model=spec.id,
                    vram_mb=self.estimates.get(spec.id, spec.vram_mb),
                    max_workers=spec.max_workers,
                    queued=int(r["queued"]),
                    priority=int(r["priority"]),
                    oldest_wait_s=float(r["oldest_wait_s"]),
                )
            )
        if not demands:
            return
        gpus = self._gpus()
        plan = placement.plan(
            gpus,
            self._pworkers(),
            demands,
            reserve_mb=self.s.vram_reserve_mb,
            now=now,
            starvation_s=self.s.starvation_s,
            reservation=self.reservation,
        )
        if plan.reservation != self.reservation:
            log.info("reservation: %s", plan.reservation)
        self.reservation = plan.reservation
        freeing = set()
        for wid in plan.evictions:
            handle = self.workers.get(wid)
            if handle is not None:
                freeing.add(handle.gpu_id)
            self._stop_worker(wid, "evicted to make room")
        for model, gpu_id in plan.starts:
            if gpu_id in freeing:
                # Start once the evicted workers have exited and their memory is really free; their
                # exit wakes the loop and the next round places this start again.
                self.dirty.add(model)
                continue
            self._start_worker(model, gpu_id)
        if plan.claims:
            warm = self._warm_by_model()
            await self._claim_and_dispatch(
                {m: self._slots(warm.get(m, ()), m, n) for m, n in plan.claims.items()}
            )
        for model in plan.unplaceable:
            largest = max((g.total_mb for g in gpus), default=0)
            await self._fail_one(
                model,
                ErrorKind.OOM,
                f"model {model} needs {self.estimates.get(model)} MB of VRAM plus a reserve of "
                f"{self.s.vram_reserve_mb} MB; the largest GPU of pool {self.s.pool} has {largest} MB",
                retry=False,
                n=64,
            )

    async def _fail_one(self, model: str, kind: ErrorKind, message: str, *, retry: bool, n: int = 1) -> None:
        """Claim up to n queued jobs of a model that cannot run here and record the failure on them."""
        assert self.term is not None
        spec = self.registry.get(model)
        if spec is None:
            return
        rows = await q.claim(
            self.pool,
            term=self.term,
            wants=[q.Want(model=model, feature=spec.feature, n=n)],
            pool=self.s.pool,
            lease_ttl_s=self.s.lease_ttl_s,
        )
        for r in rows:
            self._pending.fails.append(q.Failure(r["id"], kind, message, retry=retry))
        if rows:
            self._write_wake.set()

    # ----------------------------------------------------------------------------------------------
    # Workers
    # ----------------------------------------------------------------------------------------------

    def _start_worker(self, model: str, gpu_id: str) -> None:
        spec = self.registry.get(model)
        if spec is None:
            return
        handle = WorkerHandle(spec, gpu_id, self.probe, on_exit=self._on_worker_exit)
        try:
            handle.start()
        except Exception as exc:
            log.error("could not start a worker for %s: %s", model, exc)
            return
        self.workers[handle.name] = handle
        self._background(self._await_ready(handle), f"ready-{handle.name}")

    async def _await_ready(self, handle: WorkerHandle) -> None:
        model = handle.spec.id
        try:
            ready = await handle.wait_ready(self.s.worker_start_timeout_s)
        except WorkerStartError as exc:
            self.workers.pop(handle.name, None)
            await self._on_load_failed(handle, exc)
            return
        except Exception as exc:
            self.workers.pop(handle.name, None)
            log.error("worker %s failed while loading: %r", handle.name, exc)
            return
        self.load_backoff.pop(model, None)
        handle.grant_lease(self._last_lease_ok + self.s.lease_ttl_s * SELF_FENCE_FRACTION)
        measured = ready.vram_mb
        if measured is not None and measured > self.estimates.get(model, 0):
            log.info("model %s measured %d MB (declared %d MB)", model, measured, handle.spec.vram_mb)
            self.estimates[model] = measured
        log.info("worker %s ready in %.2fs (%s MB)", handle.name, ready.load_s, measured)
        self.dirty.add(model)
        self.claimable.add(model)
        self.wake()

    async def _on_load_failed(self, handle: WorkerHandle, exc: WorkerStartError) -> None:
        model = handle.spec.id
        fails, _ = self.load_backoff.get(model, (0, 0.0))
        fails += 1
        delay = min(LOAD_RETRY_BASE_S * 2 ** (fails - 1), 60.0)
        self.load_backoff[model] = (fails, time.monotonic() + delay)
        log.error(
            "worker %s failed to load (%s): %s; retrying in %.0fs", handle.name, exc.kind, exc.message, delay
        )
        if exc.kind == ErrorKind.OOM:
            # The declared figure was too small: raise the estimate so placement looks elsewhere.
            current = self.estimates.get(model, handle.spec.vram_mb)
            largest = max((g.total_mb for g in self._gpus()), default=current)
            self.estimates[model] = min(max(int(current * 1.5), current + 1024), largest)
        # A model that cannot load must not leave its jobs waiting for ever: each failure costs one
        # queued job an attempt, so they end failed with the reason once their attempts are spent.
        spec = handle.spec
        await self._fail_one(
            model,
            exc.kind if exc.kind in (ErrorKind.OOM, ErrorKind.TIMEOUT) else ErrorKind.MODEL_ERROR,
            f"the worker failed to load: {exc.message}",
            retry=spec.retries(exc.kind) or spec.retries(ErrorKind.MODEL_ERROR),
        )
        self.dirty.add(model)
        self.wake()

    def _on_worker_exit(self, handle: WorkerHandle) -> None:
        if self.workers.get(handle.name) is handle:
            del self.workers[handle.name]
        self.dirty.add(handle.spec.id)
        self.wake()

    def _stop_worker(self, worker_id: str, why: str) -> None:
        handle = self.workers.get(worker_id)
        if handle is None or handle.state in ("busy", "stopping", "gone"):
            return
        log.info("stopping worker %s: %s", worker_id, why)
        self._background(handle.stop(grace_s=5.0), f"stop-{worker_id}")

    def _job_ended(
        self, active: ActiveJob, spec: ModelSpec, out_dir: Path, timeout_s: float, fut: asyncio.Future[Any]
    ) -> None:
        """A job's worker answered (or died): queue the outcome for the writer."""
        job_id = active.id
        self.active.pop(job_id, None)
        self.wake()
        if fut.cancelled():
            return
        result = fut.result()
        if isinstance(result, Done):
            prev = self.run_ema.get(spec.id, result.run_s)
            self.run_ema[spec.id] = 0.8 * prev + 0.2 * result.run_s
        if active.lost:
            return  # no longer ours (leadership or lease lost): the successor decides
        if isinstance(result, Done):
            self._pending.completes.append((job_id, result.result))
            for o in result.outputs:
                self._pending.outputs.append(
                    q.Output(
                        job_id=job_id,
                        name=o.name,
                        size=o.size,
                        sha256=o.sha256,
                        content_type=o.content_type,
                        path=str((out_dir / o.name).relative_to(self._files_dir)),
                    )
                )
        elif isinstance(result, CancelledAck):
            self._pending.cancels.append(job_id)
        elif isinstance(result, Failed):
            kind = (
                ErrorKind(result.kind)
                if result.kind in ErrorKind._value2member_map_
                else ErrorKind.MODEL_ERROR
            )
            if kind == ErrorKind.CANCELLED:
                self._pending.cancels.append(job_id)
            else:
                self._pending.fails.append(q.Failure(job_id, kind, result.message, retry=spec.retries(kind)))
        elif isinstance(result, Unfinished):
            if active.cancel_requested:
                self._pending.cancels.append(job_id)
            else:
                self._pending.releases.append((job_id, result.message))
        elif isinstance(result, Crashed):
            if active.cancel_requested:
                self._pending.cancels.append(job_id)
            else:
                kind = result.error_kind
                if kind == ErrorKind.TIMEOUT:
                    msg = f"the job ran past its timeout of {timeout_s:g}s; its worker was stopped"
                else:
                    msg = result.message or f"the worker exited with code {result.exitcode}"
                self._pending.fails.append(q.Failure(job_id, kind, msg, retry=spec.retries(kind)))
        self._write_wake.set()

    async def _check_cancels(self) -> None:
        """The slow path for cancel requests whose NOTIFY was lost."""
        if not self.active or self.term is None:
            return
        for job_id in await q.cancel_requests(self.pool, term=self.term):
            self._request_cancel(job_id)

    # ----------------------------------------------------------------------------------------------
    # Side tasks
    # ----------------------------------------------------------------------------------------------

    async def _writer(self) -> None:
        """Batch the loop's writes into one transaction per flush, in order of the state machine."""
        while True:
            await self._write_wake.wait()
            self._write_wake.clear()
            if self._pending.empty():
                continue
            self._writer_idle.clear()
            batch, self._pending = self._pending, _Pending()
            self._inflight = batch
            try:
                await self._flush(batch)
                if batch.outcomes() >= MAX_UNRECORDED // 2:
                    self.wake()  # the round may have held claims back for this flush
            except DB_ERRORS as exc:
                log.warning("writer: database unavailable (%s); retrying", exc)
                self._merge_back(batch)
                await asyncio.sleep(0.2)
                self._write_wake.set()
            finally:
                self._inflight = _Pending()
                if self._pending.empty():
                    self._writer_idle.set()

    def _merge_back(self, batch: _Pending) -> None:
        p = self._pending
        p.progress = {**batch.progress, **p.progress}
        p.completes[:0] = batch.completes
        p.outputs[:0] = batch.outputs
        p.fails[:0] = batch.fails
        p.cancels[:0] = batch.cancels
        p.releases[:0] = batch.releases

    async def _flush(self, b: _Pending) -> None:
        """Write one batch, in the order of the state machine, one statement per kind of write.

        Every statement is fenced on the term and idempotent, so a batch that failed half-way is simply
        written again. Progress goes through the asynchronously committing pool; outcomes
        through the durable one, since a job's outcome is what a client acts on.
        """
        assert self.term is not None
        term = self.term
        finishing = b.ids()
        for job_id, (fraction, message) in b.progress.items():
            if job_id in finishing:
                continue  # its final state is written below; a progress row would be noise
            await q.progress(
                self.pool,
                term=term,
                job_id=job_id,
                fraction=fraction,
                message=message or None,
                min_interval_s=0.0,
            )
        if b.completes:
            if b.outputs:
                async with self.outcomes.acquire() as conn, conn.transaction():
                    await q.complete_many(conn, term=term, results=b.completes, outputs=b.outputs)
            else:
                await q.complete_many(self.outcomes, term=term, results=b.completes)
        if b.fails:
            await q.fail_many(
                self.outcomes,
                term=term,
                failures=b.fails,
                backoff=q.Backoff(self.s.backoff_base_s, self.s.backoff_max_s),
            )
        for job_id in b.cancels:
            await q.mark_cancelled(self.outcomes, term=term, job_id=job_id)
        by_reason: dict[str, list[uuid.UUID]] = {}
        for job_id, why in b.releases:
            by_reason.setdefault(why, []).append(job_id)
        for why, ids in by_reason.items():
            await q.release(self.outcomes, term=term, job_ids=ids, reason=why)

    async def _flush_until_empty(self, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self._pending.empty() and self._writer_idle.is_set():
                return
            self._write_wake.set()
            await asyncio.sleep(0.01)
        # The writer may be gone (cancelled): flush directly as a last resort.
        if not self._pending.empty():
            batch, self._pending = self._pending, _Pending()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush(batch), 5)

    async def _lease_keeper(self) -> None:
        """Renew every lease of the term in one statement; fence ourselves if renewals stop working."""
        assert self.term is not None
        interval = self.s.lease_extend_interval_s
        fence_after = self.s.lease_ttl_s * SELF_FENCE_FRACTION
        while True:
            started = time.monotonic()
            # Only jobs that were ours before the statement ran can be judged by its answer: one
            # claimed while it ran is missing from it without having been taken from us.
            before = set(self.active)
            try:
                async with asyncio.timeout(max(1.0, interval)):
                    ours = await q.extend_leases(self.pool, term=self.term, lease_ttl_s=self.s.lease_ttl_s)
                self._last_lease_ok = started
                self._grant_leases()
                self._release_orphans(ours)
                for job_id in before - ours:
                    active = self.active.get(job_id)
                    if active is not None and not active.lost:
                        # Taken from us (expired and rescued elsewhere): stop running it now.
                        log.error(
                            "job %s is no longer leased to term %s; stopping its worker", job_id, self.term
                        )
                        active.lost = True
                        active.worker.kill()
            except DB_ERRORS as exc:
                log.warning("lease renewal failed: %s", exc)
            if time.monotonic() - self._last_lease_ok > fence_after:
                self._lose(f"leases not renewed for {fence_after:.0f}s")
                return
            await asyncio.sleep(max(0.05, min(interval, fence_after / 4)))

    def _grant_leases(self) -> None:
        """Workers fence themselves too: a job still running when the leader's self-fence deadline
        passes without a renewal (the leader froze) makes its worker exit before the database lease
        expires and the job is rescued elsewhere."""
        until = self._last_lease_ok + self.s.lease_ttl_s * SELF_FENCE_FRACTION
        for w in list(self.workers.values()):
            w.grant_lease(until)

    def _release_orphans(self, ours: set[uuid.UUID]) -> None:
        """Jobs leased to us that nothing here runs (a claim whose answer was lost): give them back.
        Only after two renewals in a row saw them, so a dispatch or a write in flight is never hit."""
        writing = self._pending.ids() | self._inflight.ids()
        orphans = ours - set(self.active) - self._claiming - writing
        again = orphans & self._orphans
        self._orphans = orphans - again
        if again:
            log.warning("releasing %d jobs leased to term %s that no worker runs", len(again), self.term)
            self._pending.releases.extend((j, "no worker of its scheduler ran it") for j in again)
            self._write_wake.set()

    async def _heartbeat(self) -> None:
        """Refresh the term row (and its snapshot) over the lock connection: proves that connection works."""
        assert self.term is not None
        interval = self.s.heartbeat_interval_s
        while True:
            try:
                # As long as the server's idle_session_timeout on this session: a slow answer under
                # load is not a lost lock (a closed connection is noticed at once, not by this).
                async with asyncio.timeout(max(5.0, interval * 4)):
                    alive = await q.heartbeat(self.lock_conn, term=self.term, snapshot=self.snapshot())
            except DB_ERRORS as exc:
                self._lose(f"heartbeat on the lock connection failed: {exc!r}")
                return
            if not alive:
                self._lose("the term was ended by someone else")
                return
            await asyncio.sleep(interval)

    async def _janitor(self) -> None:
        """Rescue expired leases of any scheduler, and prune old finished jobs."""
        last_prune = 0.0
        while True:
            await asyncio.sleep(self.s.lease_extend_interval_s)
            try:
                rows = await q.rescue_expired(self.pool)
                if rows:
                    log.warning("requeued %d jobs whose lease expired", len(rows))
                if time.monotonic() - last_prune > PRUNE_INTERVAL_S:
                    last_prune = time.monotonic()
                    await self._prune()
            except DB_ERRORS as exc:
                log.warning("janitor: %s", exc)

    async def _prune(self) -> None:
        retention_s = self.s.retention_days * 86400
        while True:
            n, paths = await q.prune(self.pool, retention_s=retention_s, batch=1000)
            for p in paths:
                full = (self._files_dir / p).resolve()
                if full.is_relative_to(self._files_dir):
                    with contextlib.suppress(OSError):
                        full.unlink()
            if n < 1000:
                return

    # ----------------------------------------------------------------------------------------------
    # Status
    # ----------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        devices = self.probe.devices()
        pw = self._pworkers()
        gpus = []
        for d in devices:
            g = d.public()
            g["ledger_mb"] = placement.used_mb(d.id, pw)
            gpus.append(g)
        workers = []
        for w in self.workers.values():
            if w.state == "gone":
                continue
            create_time = None
            if w.pid is not None:
                with contextlib.suppress(psutil.Error):
                    create_time = psutil.Process(w.pid).create_time()
            workers.append(
                {
                    "id": w.name,
                    "model": w.spec.id,
                    "gpu": w.gpu_id,
                    "state": w.state,
                    "vram_mb": w.vram_mb if w.vram_mb is not None else self.estimates.get(w.spec.id),
                    "pid": w.pid,
                    "pid_create_time": create_time,
                    "jobs_done": w.jobs_run,
                    "job": w.job_id,
                }
            )
        res = self.reservation
        return {
            "host_key": self.host_key,
            "gpus": gpus,
            "workers": workers,
            "estimates_mb": dict(self.estimates),
            "reservation": {"gpu": res.gpu_id, "model": res.model} if res else None,
            "running": len(self.active),
        }
