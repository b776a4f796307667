"""GPU worker subprocesses, seen from the scheduler: one ``WorkerHandle`` per process.

A handle owns one ``spawn``-context process that loads one model on one device and runs that model's jobs
one at a time (``workers.runtime``). ``run()`` hands an idle worker one job and waits for it;
``submit()`` may queue several jobs on a worker (the scheduler does so for models whose jobs take
milliseconds, so a worker never waits for the next job's round trip): they go out in one pipe message
and run in order. Everything here runs on the scheduler's asyncio loop, without
threads: the pipe and the process sentinel are watched with ``loop.add_reader``, so a worker that dies
is noticed within milliseconds. This module never touches the database; the scheduler loop turns what a
handle reports into job transitions.

States::

    spawning ──start()──▶ loading ──Ready──▶ idle ◀──result── busy
                             │                 │ ──run()──────▶ │
                             │                 ▼                │
                             └──────────▶ stopping ◀────────────┘
                                               │
          (process exit, from any state) ──▶  gone

- ``spawning``: created, ``start()`` not called yet.
- ``loading``: the process is importing and loading the adapter; ``wait_ready()`` returns its ``Ready``.
- ``idle``: loaded, no job; ``run()`` is allowed only here, ``submit()`` here and when busy.
- ``busy``: one or more jobs in flight (``inflight``); the first one (``job_id``) is running or about
  to; each job's future resolves when the worker answers for it or dies.
- ``stopping``: ``stop()`` was called; a running job may still finish and is reported.
- ``gone``: the process has exited (``exitcode`` is set); the handle is never used again.

Failure rules (what the scheduler should do with each outcome):

- The worker dies mid-job (crash, OOM killer, segfault): the running job resolves to
  ``Crashed(cause="crashed")`` at once; the job is retried as ``worker_crashed`` and the handle is gone.
  Start a new worker if the model still has work. Jobs queued behind it resolve to ``Unfinished``
  (never started, or finished with the outcome lost with the process): requeue them, they are not to
  blame. The worker tells which job was running through a word of shared memory, not a message.
- Loading fails: ``wait_ready()`` raises ``WorkerStartError`` with ``kind`` ``oom`` (correct the model's
  VRAM estimate, try elsewhere), ``model_error``, ``worker_crashed`` (died while loading) or ``timeout``
  (``wait_ready(timeout_s)`` ran out and killed it). Either way the handle ends up gone.
- Cancel: ``cancel(job_id, grace_s=cancel_grace_s)`` sends a cooperative ``Cancel``; a job that stops
  answers ``CancelledAck`` and the worker stays warm. If it has not answered after ``grace_s`` the worker
  gets SIGTERM, then SIGKILL ``kill_after_s`` (2 s) later, and ``run()`` resolves to
  ``Crashed(cause="cancelled")``.
- Timeout: ``run(..., timeout_s=...)`` kills the worker when the job overruns: ``Crashed(cause="timeout")``.
  A queued job's timeout and cancel grace count from when the job before it answered.
- ``kill()`` and ``stop()`` that has to escalate: a running job resolves to ``Crashed(cause="killed")``
  (the scheduler decides whether that job is retried, e.g. after losing leadership).
- Cancelling the task that awaits ``run()`` kills the worker: the job's result would have nowhere to go.

``Crashed.error_kind`` maps each cause to the job's ``ErrorKind``.

Workers die with their parent (``PR_SET_PDEATHSIG`` plus a watchdog thread in the child). On Linux the
death signal follows the *thread* that started the process: call ``start()`` from the event loop's
thread, which lives as long as the scheduler, not from a short-lived executor thread. Any worker still
alive when the interpreter exits is killed.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal

from core.registry import ModelSpec
from core.types import ErrorKind, VramqError
from scheduler.gpus import GpuProbe
from workers.protocol import (
    Cancel,
    CancelledAck,
    Done,
    Failed,
    Lease,
    LoadFailed,
    Progress,
    Ready,
    Run,
    Stop,
)
from workers.runtime import worker_main

__all__ = [
    "CancelledAck",
    "Crashed",
    "Done",
    "Failed",
    "Progress",
    "Ready",
    "RunResult",
    "Unfinished",
    "WorkerHandle",
    "WorkerStartError",
    "WorkerState",
    "WorkerStateError",
    "stop_all",
]

log = logging.getLogger(__name__)

WorkerState = Literal["spawning", "loading", "idle", "busy", "stopping", "gone"]
CrashCause = Literal["crashed", "killed", "timeout", "cancelled"]

KILL_AFTER_S = 2.0  # between SIGTERM and SIGKILL
_REAP_WAIT_S = 2.0  # how long to wait for the exit status once the sentinel fired


@dataclass(frozen=True, slots=True)
class Crashed:
    """The worker process ended before answering for the job."""

    job_id: str
    exitcode: int | None  # negative: killed by that signal (-9 SIGKILL, -15 SIGTERM)
    cause: CrashCause
    message: str

    @property
    def error_kind(self) -> ErrorKind:
        return {
            "crashed": ErrorKind.WORKER_CRASHED,
            "killed": ErrorKind.WORKER_CRASHED,
            "timeout": ErrorKind.TIMEOUT,
            "cancelled": ErrorKind.CANCELLED,
        }[self.cause]


@dataclass(frozen=True, slots=True)
class Unfinished:
    """The worker went away before this job's outcome arrived, and the job is not to blame: it was
    queued behind the running one (``started`` False), or it had finished and its outcome was still
    on its way (``started`` True). Requeue it without counting the attempt."""

    job_id: str
    started: bool
    message: str


RunResult = Done | Failed | Crashed | CancelledAck | Unfinished
ProgressCallback = Callable[[Progress], object]


@dataclass(slots=True)
class _Job:
    """A job handed to the worker and not answered yet."""

    job_id: str
    seq: int
    fut: asyncio.Future[RunResult]
    on_progress: ProgressCallback | None
    timeout_s: float | None
    cancel: tuple[float, float] | None = None  # (grace_s, kill_after_s) of a cancel that escalates
    running: bool = False  # first in line: its timeout and cancel grace are counting
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


class WorkerStartError(VramqError):
    """The worker did not become ready; ``kind`` says why (oom, model_error, worker_crashed, timeout)."""

    def __init__(self, kind: ErrorKind, message: str, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.exitcode = exitcode


class WorkerStateError(VramqError):
    """A handle was asked for something its state does not allow (e.g. ``run`` while busy)."""


def describe_exit(exitcode: int | None) -> str:
    """``exited with code 3``, ``was killed by SIGKILL``: how a worker ended, for error messages."""
    if exitcode is None:
        return "exited (status unknown)"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


# os.environ is process-wide: apply one worker's environment at a time around Process.start().
_ENV_LOCK = threading.Lock()
_LIVE: weakref.WeakSet[WorkerHandle] = weakref.WeakSet()
_SEQ = 0


def _consume(fut: asyncio.Future[Any]) -> None:
    # Nobody may be waiting on a failed ready/run future; reading the exception keeps asyncio quiet.
    if not fut.cancelled():
        fut.exception()


@contextlib.contextmanager
def _spawn_context(env: Mapping[str, str]) -> Iterator[None]:
    """Around ``Process.start()``: the worker's environment, and no main module for it to re-run.

    ``spawn`` copies ``os.environ`` when it starts the process, so the worker's variables are set just
    for that moment. ``spawn`` also re-imports the parent's ``__main__`` script in the child (the reason
    for the ``if __name__ == "__main__"`` idiom); a worker needs nothing from it (the CLI, the API), so
    a bare module stands in for ``__main__`` while the child's preparation data is taken.
    """
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in env}
        main = sys.modules.get("__main__")
        os.environ.update(env)
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            if main is not None:
                sys.modules["__main__"] = main
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class WorkerHandle:
    """One worker subprocess for one model on one device. See the module docstring for the life cycle.

    Public attributes (read-only for callers): ``spec``, ``gpu_id``, ``device`` (what the worker passes
    to ``load``), ``name``, ``state``, ``ready`` (the ``Ready`` message once loaded), ``job_id`` (the job
    running or next to run), ``inflight`` (jobs handed over and not answered), ``vram_mb`` (last VRAM
    the worker reported), ``jobs_run``, ``created_at``, ``last_used`` (``time.monotonic()`` of the last
    answer or state change to idle; for LRU eviction).
    """

    def __init__(
        self,
        spec: ModelSpec,
        gpu_id: str,
        probe: GpuProbe,
        *,
        extra_env: Mapping[str, str] | None = None,
        on_exit: Callable[[WorkerHandle], object] | None = None,
        name: str | None = None,
    ) -> None:
        global _SEQ
        _SEQ += 1
        self.spec = spec
        self.gpu_id = gpu_id
        self.probe = probe
        self.device = probe.device_for_worker(gpu_id)
        self.name = name or f"{spec.id}@{gpu_id}#{_SEQ}"
        self.state: WorkerState = "spawning"
        self.ready: Ready | None = None
        self.vram_mb: int | None = None
        self.jobs_run = 0
        self.created_at = time.monotonic()
        self.last_used = self.created_at
        self._env = {**probe.worker_env(gpu_id), **(extra_env or {})}
        self._on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._pid: int | None = None
        self._exitcode: int | None = None
        self._sentinel: int | None = None
        self._ready_fut: asyncio.Future[Ready] | None = None
        self._jobs: dict[str, _Job] = {}  # in the order handed over; the first one runs
        self._seq = 0
        self._outbox: list[Run] = []  # handed over in this loop iteration, sent together
        self._flush_soon = False
        self._position: Any = None  # shared memory: seq of the job the worker started last
        self._exited: asyncio.Event = asyncio.Event()
        self._load_failed: LoadFailed | None = None
        self._cause: CrashCause | None = None
        self._stop_task: asyncio.Task[int | None] | None = None

    def __repr__(self) -> str:
        return f"<WorkerHandle {self.name} pid={self._pid} {self.state}>"

    # --- properties --------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def job_id(self) -> str | None:
        """The job running (or next to run) on the worker."""
        return next(iter(self._jobs), None)

    @property
    def inflight(self) -> int:
        """Jobs handed to the worker that it has not answered for."""
        return len(self._jobs)

    @property
    def alive(self) -> bool:
        """True from ``start()`` until the process has been seen to exit."""
        return self._process is not None and self.state != "gone"

    @property
    def exitcode(self) -> int | None:
        """The process's exit status once gone (negative: the signal that killed it)."""
        return self._exitcode

    def measured_vram_mb(self) -> int | None:
        """VRAM the process holds now, from the probe (NVML) where it can tell, else the last report."""
        if self._pid is not None and self.state != "gone":
            from_probe = self.probe.process_memory_mb(self._pid)
            if from_probe is not None:
                return max(from_probe, self.vram_mb or 0)
        return self.vram_mb

    # --- life cycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the process (returns at once; ``wait_ready`` waits for the load). Call on the loop."""
        if self.state != "spawning":
            raise WorkerStateError(f"worker {self.name} was already started")
        loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self._position = ctx.RawValue("q", 0)
        process = ctx.Process(
            target=worker_main,
            args=(child_conn, self.spec.adapter, self.spec.id, self.device, os.getpid(), self._position),
            name=f"vramq-worker {self.name}",
            daemon=False,  # a daemon process may not start processes of its own (data loaders do)
        )
        try:
            with _spawn_context(self._env):
                process.start()
        except BaseException:
            parent_conn.close()
            child_conn.close()
            self.state = "gone"
            raise
        finally:
            # Our copy of the child's end must go, or the pipe never reports EOF when the child dies.
            child_conn.close()
        self._loop = loop
        self._process = process
        self._conn = parent_conn
        self._pid = process.pid
        self._sentinel = process.sentinel
        self._ready_fut = loop.create_future()
        self._ready_fut.add_done_callback(_consume)
        self.state = "loading"
        _LIVE.add(self)
        loop.add_reader(parent_conn.fileno(), self._on_readable)
        loop.add_reader(process.sentinel, self._on_sentinel)
        log.info("worker %s started (pid %s, device %s)", self.name, self._pid, self.device)

    async def wait_ready(self, timeout_s: float | None = None) -> Ready:
        """Wait for the load; raises ``WorkerStartError``, killing the worker after ``timeout_s``."""
        if self.ready is not None and self.state != "gone":
            return self.ready
        if self._ready_fut is None:
            raise WorkerStateError(f"worker {self.name} was not started")
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready_fut), timeout_s)
        except TimeoutError:
            if self._ready_fut.done():  # resolved in the same instant
                return self._ready_fut.result()
            self._signal("kill", "timeout")
            raise WorkerStartError(
                ErrorKind.TIMEOUT, f"worker {self.name} did not load within {timeout_s:g}s"
            ) from None

    async def run(
        self,
        job_id: str,
        attempt: int,
        inputs: dict[str, Any],
        output_dir: str | Path,
        on_progress: ProgressCallback | None = None,
        *,
        timeout_s: float | None = None,
    ) -> RunResult:
        """Run one job on an idle worker and return how it ended.

        ``inputs`` must be picklable, with uploaded files given as ``{"file": id, "path": ..., "name":
        ..., "size": ...}`` (the worker turns them into ``InputFile``). ``on_progress`` is called on the
        loop for every ``Progress`` message. ``timeout_s`` kills the worker when the job overruns.
        Cancelling the awaiting task kills the worker (the result would have nowhere to go).
        """
        if self.state != "idle" or self._loop is None:
            raise WorkerStateError(f"worker {self.name} is {self.state}, not idle")
        fut = self.submit(job_id, attempt, inputs, output_dir, on_progress, timeout_s=timeout_s)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if not fut.done():
                log.warning(
                    "worker %s: the task awaiting job %s was cancelled; killing it", self.name, job_id
                )
                self._signal("kill", "killed")
            raise

    def submit(
        self,
        job_id: str,
        attempt: int,
        inputs: dict[str, Any],
        output_dir: str | Path,
        on_progress: ProgressCallback | None = None,
        *,
        timeout_s: float | None = None,
    ) -> asyncio.Future[RunResult]:
        """Hand the worker a job, behind any it has already; the future resolves to how it ended.

        Allowed when idle or busy. Jobs handed over in one loop iteration travel in one message. The
        job's ``timeout_s`` counts from when the job before it answered.
        """
        if self.state not in ("idle", "busy") or self._loop is None:
            raise WorkerStateError(f"worker {self.name} is {self.state}, not idle or busy")
        if job_id in self._jobs:
            raise WorkerStateError(f"job {job_id} is already on worker {self.name}")
        self._seq += 1
        fut: asyncio.Future[RunResult] = self._loop.create_future()
        fut.add_done_callback(_consume)
        job = _Job(job_id, self._seq, fut, on_progress, timeout_s)
        self._jobs[job_id] = job
        self.state = "busy"
        self._outbox.append(Run(job_id, attempt, inputs, str(output_dir), job.seq))
        if not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self._flush_outbox)
        if len(self._jobs) == 1:
            self._start_clock(job)
        return fut

    def cancel(self, job_id: str, grace_s: float | None = None, kill_after_s: float = KILL_AFTER_S) -> bool:
        """Ask the worker to cancel ``job_id``. With ``grace_s``, escalate to SIGTERM then SIGKILL.

        Returns False (and does nothing) when the worker does not have that job. A job still queued
        behind another is dropped by the worker when its turn comes; its grace counts from then.
        """
        job = self._jobs.get(job_id)
        if job is None or self.state not in ("busy", "stopping") or self._loop is None:
            return False
        self._send(Cancel(job_id))
        if grace_s is not None and job.cancel is None:
            job.cancel = (grace_s, kill_after_s)
            if job.running:
                job.timers.append(self._loop.call_later(grace_s, self._escalate_cancel, job_id, kill_after_s))
        return True

    async def stop(self, grace_s: float = 10.0, kill_after_s: float = KILL_AFTER_S) -> int | None:
        """Stop the worker and wait until it is gone; returns its exit code. Idempotent.

        An idle worker exits at once. A busy one may finish its job within ``grace_s``; after that it
        gets SIGTERM, and SIGKILL ``kill_after_s`` later. A loading worker is terminated right away.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop(grace_s, kill_after_s))
        return await asyncio.shield(self._stop_task)

    def grant_lease(self, until: float) -> None:
        """Tell the worker the scheduler's leases hold until ``until`` (``time.monotonic()``); a job still
        running past it makes the worker exit (the self-fence of a frozen or cut-off scheduler)."""
        if self._conn is not None and self.state in ("loading", "idle", "busy"):
            self._send(Lease(until))

    def kill(self) -> None:
        """SIGKILL the worker now. A job in flight resolves to ``Crashed(cause="killed")``."""
        self._signal("kill", "killed")

    async def wait_exit(self, timeout_s: float | None = None) -> int | None:
        """Wait until the process is gone; returns its exit code. Raises TimeoutError."""
        if self._process is None:
            return None
        await asyncio.wait_for(self._exited.wait(), timeout_s)
        return self._exitcode

    # --- internals ---------------------------------------------------------------------------------

    async def _stop(self, grace_s: float, kill_after_s: float) -> int | None:
        if self._process is None:
            self.state = "gone"
            return None
        if self.state == "gone":
            return self._exitcode
        was = self.state
        self.state = "stopping"
        if was == "loading":
            self._signal("terminate", "killed")
        else:
            self._send(Stop())
        steps: tuple[tuple[Literal["terminate", "kill"] | None, float | None], ...] = (
            ("terminate", grace_s),
            ("kill", kill_after_s),
            (None, None),
        )
        for action, wait_s in steps:
            try:
                await asyncio.wait_for(self._exited.wait(), wait_s)
                break
            except TimeoutError:
                if action is not None:
                    log.warning(
                        "worker %s did not stop in %.1fs; sending SIG%s",
                        self.name,
                        wait_s,
                        "TERM" if action == "terminate" else "KILL",
                    )
                    self._signal(action, "killed")
        return self._exitcode

    def _flush_outbox(self) -> None:
        self._flush_soon = False
        if self._outbox:
            batch = self._outbox
            self._outbox = []
            self._send(batch[0] if len(batch) == 1 else batch)

    def _send(self, msg: object) -> None:
        if self._outbox and not isinstance(msg, list | Run):
            # Keep the pipe in call order: jobs handed over earlier go first, in the same message.
            batch: list[object] = [*self._outbox, msg]
            self._outbox = []
            msg = batch
        if self._conn is None or self._conn.closed:
            return
        try:
            self._conn.send(msg)
        except (OSError, ValueError) as exc:
            # The worker is going away; its sentinel will resolve whatever is pending.
            log.debug("worker %s: send %s failed: %s", self.name, type(msg).__name__, exc)

    def _signal(self, action: Literal["terminate", "kill"], cause: CrashCause) -> None:
        process = self._process
        if process is None or self.state == "gone":
            return
        if self._cause is None or cause != "killed":
            self._cause = cause
        # Popen only signals a child it has not reaped, so a recycled pid is never hit.
        if action == "terminate":
            process.terminate()
        else:
            process.kill()

    def _start_clock(self, job: _Job) -> None:
        """``job`` is first in line now: its timeout (and the grace of a cancel asked earlier) start."""
        assert self._loop is not None
        job.running = True
        if job.timeout_s is not None:
            job.timers.append(self._loop.call_later(job.timeout_s, self._on_job_timeout, job.job_id))
        if job.cancel is not None:
            grace_s, kill_after_s = job.cancel
            job.timers.append(self._loop.call_later(grace_s, self._escalate_cancel, job.job_id, kill_after_s))

    def _on_job_timeout(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is not None and not job.fut.done():
            log.warning("worker %s: job %s timed out; killing the worker", self.name, job_id)
            self._signal("kill", "timeout")

    def _escalate_cancel(self, job_id: str, kill_after_s: float) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.fut.done():
            return
        log.warning("worker %s ignored the cancel of job %s; sending SIGTERM", self.name, job_id)
        self._signal("terminate", "cancelled")
        assert self._loop is not None
        job.timers.append(self._loop.call_later(kill_after_s, self._signal, "kill", "cancelled"))

    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while not conn.closed and conn.poll():
                self._dispatch(conn.recv())
        except (EOFError, OSError):
            self._close_pipe()
        except Exception:
            # A message that cannot be read leaves the job's outcome unknown: end the worker, so the
            # job resolves as crashed instead of waiting forever.
            log.exception("worker %s: unreadable message; killing the worker", self.name)
            self._close_pipe()
            self._signal("kill", "crashed")

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, list):
            for one in msg:
                self._dispatch(one)
        elif isinstance(msg, Progress):
            job = self._jobs.get(msg.job_id)
            if job is not None and job.on_progress is not None:
                try:
                    job.on_progress(msg)
                except Exception:
                    log.exception("worker %s: progress callback failed", self.name)
        elif isinstance(msg, Done | Failed | CancelledAck):
            job = self._jobs.get(msg.job_id)
            if job is None or job.fut.done():
                log.warning("worker %s: stray %s for job %s", self.name, type(msg).__name__, msg.job_id)
                return
            if isinstance(msg, Done) and msg.vram_mb is not None:
                self.vram_mb = msg.vram_mb
            self.jobs_run += 1
            self._finish_job(job, msg)
        elif isinstance(msg, Ready):
            self.ready = msg
            self.vram_mb = msg.vram_mb
            if self.state == "loading":
                self.state = "idle"
                self.last_used = time.monotonic()
            if self._ready_fut is not None and not self._ready_fut.done():
                self._ready_fut.set_result(msg)
            log.info("worker %s ready in %.2fs (vram %s MiB)", self.name, msg.load_s, msg.vram_mb)
        elif isinstance(msg, LoadFailed):
            self._load_failed = msg
            if self._ready_fut is not None and not self._ready_fut.done():
                self._ready_fut.set_exception(WorkerStartError(ErrorKind(msg.kind), msg.message))
        else:
            log.warning("worker %s: unexpected message %r", self.name, msg)

    def _finish_job(self, job: _Job, result: RunResult) -> None:
        self._jobs.pop(job.job_id, None)
        for timer in job.timers:
            timer.cancel()
        job.timers.clear()
        if self._jobs:
            first = next(iter(self._jobs.values()))
            if not first.running and self.state != "gone":
                self._start_clock(first)
        elif self.state == "busy":
            self.state = "idle"
        self.last_used = time.monotonic()
        if not job.fut.done():
            job.fut.set_result(result)

    def _close_pipe(self) -> None:
        if self._conn is None:
            return
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._conn.fileno())
        self._conn.close()
        self._conn = None

    def _on_sentinel(self) -> None:
        assert self._loop is not None and self._sentinel is not None
        self._loop.remove_reader(self._sentinel)
        self._on_readable()  # what the worker sent before it died still counts (a last Done)
        self._reap(time.monotonic() + _REAP_WAIT_S, 0.0005)

    def _reap(self, deadline: float, delay: float) -> None:
        # The sentinel fires when the child closes its fds; its exit status can lag by a moment.
        assert self._process is not None and self._loop is not None
        code = self._process.exitcode
        if code is None and time.monotonic() < deadline:
            self._loop.call_later(delay, self._reap, deadline, min(delay * 2, 0.05))
            return
        self._gone(code)

    def _gone(self, exitcode: int | None) -> None:
        self._exitcode = exitcode
        self._close_pipe()
        was = self.state
        self.state = "gone"
        _LIVE.discard(self)
        cause: CrashCause = self._cause or "crashed"
        # Which job was running: the worker wrote its seq to shared memory before starting it.
        position = int(self._position.value) if self._position is not None else 0
        how = describe_exit(exitcode)
        for job in list(self._jobs.values()):
            result: RunResult
            if job.seq == position:
                result = Crashed(job.job_id, exitcode, cause, f"worker {self.name} {how} during the job")
            elif job.seq < position:
                result = Unfinished(
                    job.job_id, True, f"worker {self.name} {how} before the job's outcome arrived"
                )
            else:
                result = Unfinished(job.job_id, False, f"worker {self.name} {how} before the job started")
            self._finish_job(job, result)
        if self._ready_fut is not None and not self._ready_fut.done():
            if self._load_failed is not None:
                err = WorkerStartError(ErrorKind(self._load_failed.kind), self._load_failed.message, exitcode)
            elif cause == "timeout":
                err = WorkerStartError(
                    ErrorKind.TIMEOUT, f"worker {self.name} did not load in time", exitcode
                )
            else:
                err = WorkerStartError(
                    ErrorKind.WORKER_CRASHED,
                    f"worker {self.name} {describe_exit(exitcode)} while loading",
                    exitcode,
                )
            self._ready_fut.set_exception(err)
        if self._process is not None and exitcode is not None:
            with contextlib.suppress(ValueError):
                self._process.close()
        self._exited.set()
        level = logging.INFO if was == "stopping" and exitcode == 0 else logging.WARNING
        log.log(level, "worker %s (pid %s) %s while %s", self.name, self._pid, describe_exit(exitcode), was)
        if self._on_exit is not None:
            try:
                self._on_exit(self)
            except Exception:
                log.exception("worker %s: on_exit callback failed", self.name)


async def stop_all(handles: Iterable[WorkerHandle], grace_s: float = 10.0) -> None:
    """Stop many workers at once (each with the same grace) and wait until all are gone."""
    await asyncio.gather(*(h.stop(grace_s) for h in list(handles)))


@atexit.register
def _kill_leftovers() -> None:
    # Registered after multiprocessing's own exit hook, so it runs first: without it, the interpreter
    # would wait forever at exit for workers nobody told to stop.
    for handle in list(_LIVE):
        process = handle._process
        if process is not None:
            with contextlib.suppress(Exception):
                process.kill()
