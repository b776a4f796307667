"""The worker subprocess: load one adapter, then run jobs sent by the scheduler over a pipe.

``worker_main`` is the target of a ``spawn``-context ``multiprocessing.Process`` (see
``scheduler.workerpool``). The message protocol is in ``workers.protocol``.

Threads in the child:

- main: imports and loads the adapter, then runs jobs one at a time, in the order they arrived;
- reader (daemon): receives ``Run``/``Cancel``/``Stop`` (or a list of them); a ``Cancel`` sets the
  running job's flag at once;
- flusher (daemon): sends outcomes held back while more jobs were queued (see ``_Worker.reply``);
- fence (daemon): exits the process when a job outlives the scheduler's lease;
- watchdog (daemon): exits the process when its parent is gone.

The scheduler may send several jobs ahead (short jobs only). While more jobs wait here, outcomes are
held back for at most ``HOLD_S`` and go out together, one pipe message for many jobs. Before each job
the worker writes the job's ``seq`` into a word of shared memory (``position``), so that when the
process dies the scheduler knows which job was running, which ones had finished (their outcomes may
have died with it) and which ones never started.

A worker never outlives the scheduler that started it: on Linux the kernel sends it SIGKILL when the
parent thread that spawned it exits (``PR_SET_PDEATHSIG``), and the watchdog covers other systems and the
short race before that is set. SIGTERM keeps its default action (exit at once); SIGINT is ignored, so
Ctrl-C in a terminal reaches the scheduler, which then stops its workers in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import json
import mimetypes
import os
import queue
import shutil
import signal
import stat
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

from workers.adapter import Context, classify_exception, resolve_inputs
from workers.protocol import (
    Cancel,
    CancelledAck,
    Done,
    Failed,
    Lease,
    LoadFailed,
    OutputFile,
    Progress,
    Ready,
    Run,
    Stop,
    one_line,
)

PR_SET_PDEATHSIG = 1
WATCHDOG_INTERVAL_S = 0.25
HOLD_S = 0.002  # the longest an outcome waits for the next ones while more jobs are queued
HOLD_MAX = 256  # outcomes per message at most
CUDA_CONTEXT_ESTIMATE_MB = 500  # what a CUDA context costs beyond torch's allocator, roughly

CONTENT_TYPES = {
    ".glb": "model/gltf-binary",
    ".gltf": "model/gltf+json",
    ".obj": "model/obj",
    ".mtl": "model/mtl",
    ".ply": "application/ply",
    ".stl": "model/stl",
    ".json": "application/json",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".txt": "text/plain",
}


def content_type(name: str) -> str:
    """The content type of an output file, from its extension."""
    ext = Path(name).suffix.lower()
    if ext in CONTENT_TYPES:
        return CONTENT_TYPES[ext]
    guessed, _ = mimetypes.guess_type(name, strict=True)
    return guessed or "application/octet-stream"


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError) as exc:
            print(f"vramq worker: prctl(PR_SET_PDEATHSIG) failed: {exc}", file=sys.stderr)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_INTERVAL_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="vramq-watchdog", daemon=True).start()


def _measure_vram_mb(adapter: Any) -> int | None:
    hook = getattr(adapter, "measured_vram_mb", None)
    if callable(hook):
        try:
            value = hook()
        except Exception:
            traceback.print_exc()
            value = None
        if value is not None:
            return int(value)
    torch = sys.modules.get("torch")  # never import torch here: a CPU-only adapter must stay light
    if torch is None:
        return None
    try:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None
        reserved = int(torch.cuda.memory_reserved()) // (1024 * 1024)
    except Exception:
        traceback.print_exc()
        return None
    return reserved + CUDA_CONTEXT_ESTIMATE_MB


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_outputs(output_dir: Path) -> list[OutputFile]:
    """Every regular file under ``output_dir`` (recursively), with size, sha256 and content type."""
    files: list[OutputFile] = []
    if not output_dir.is_dir():
        return files
    for path in sorted(output_dir.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue  # a link could point anywhere on the server; outputs are what the job wrote
        name = path.relative_to(output_dir).as_posix()
        files.append(
            OutputFile(
                name=name, size=path.stat().st_size, sha256=_sha256(path), content_type=content_type(name)
            )
        )
    return files


def _prepare_output_dir(output_dir: Path) -> None:
    """Remove what an earlier attempt left; the context creates the directory when the job uses it."""
    try:
        st = output_dir.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(output_dir)  # a previous attempt's partial outputs must not leak into this one
    else:
        output_dir.unlink()


class _Worker:
    """State shared by the main thread (jobs) and the reader thread (messages)."""

    def __init__(self, conn: Connection, model_id: str, device: str, position: Any = None) -> None:
        self.conn = conn
        self.model_id = model_id
        self.device = device
        self.position = position  # shared c_longlong: seq of the job started last (0: none yet)
        self.send_lock = threading.Lock()
        self.held: list[object] = []  # outcomes not sent yet (guarded by send_lock)
        self.held_since = 0.0
        self.held_cond = threading.Condition(self.send_lock)
        self.jobs: queue.Queue[Run | Stop] = queue.Queue()
        self.state_lock = threading.Lock()
        self.current: Context | None = None
        self.cancelled_ids: set[str] = set()
        self.lease_until: float | None = None

    def fence(self) -> None:
        """Runs in a daemon thread: end the process if a job outlives the scheduler's lease."""
        while True:
            time.sleep(WATCHDOG_INTERVAL_S)
            until = self.lease_until
            if until is not None and self.current is not None and time.monotonic() > until:
                print(
                    f"vramq worker {self.model_id}: the scheduler's lease ran out during job "
                    f"{self.current.job_id}; stopping so that it is not run twice at once",
                    file=sys.stderr,
                )
                os._exit(75)

    def send(self, msg: object) -> None:
        """Send one message now, after any held outcomes (the order of the pipe is the job order)."""
        with self.send_lock:
            if self.held:
                self.held.append(msg)
                self._send_held()
            else:
                self.conn.send(msg)

    def reply(self, msg: object) -> None:
        """Send a job's outcome: at once when nothing else is queued here, else held for ``HOLD_S``
        so that the outcomes of a run of short jobs travel in one message."""
        with self.send_lock:
            self.held.append(msg)
            if self.jobs.empty() or len(self.held) >= HOLD_MAX:
                self._send_held()
            elif len(self.held) == 1:  # the flusher's clock starts with the first held outcome
                self.held_since = time.monotonic()
                self.held_cond.notify()

    def flush(self) -> None:
        with self.send_lock:
            if self.held:
                self._send_held()

    def _send_held(self) -> None:  # with send_lock held
        batch = self.held
        self.held = []
        self.conn.send(batch[0] if len(batch) == 1 else batch)

    def flush_loop(self) -> None:
        """Daemon thread: send held outcomes once they are ``HOLD_S`` old (the next job may be long)."""
        with self.send_lock:
            while True:
                if not self.held:
                    self.held_cond.wait()
                    continue
                wait = self.held_since + HOLD_S - time.monotonic()
                if wait > 0:
                    self.held_cond.wait(wait)
                    continue
                try:
                    self._send_held()
                except (OSError, ValueError):
                    os._exit(0)  # the scheduler is gone

    def read_loop(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                # The scheduler closed the pipe: nobody can receive results any more.
                os._exit(0)
            for one in msg if isinstance(msg, list) else (msg,):
                self.handle(one)

    def handle(self, msg: object) -> None:
        if isinstance(msg, Run | Stop):
            self.jobs.put(msg)
        elif isinstance(msg, Cancel):
            with self.state_lock:
                self.cancelled_ids.add(msg.job_id)
                if self.current is not None and self.current.job_id == msg.job_id:
                    self.current.cancel()
        elif isinstance(msg, Lease):
            self.lease_until = msg.until
        else:
            print(
                f"vramq worker {self.model_id}: ignoring unknown message {type(msg).__name__}",
                file=sys.stderr,
            )

    def run_job(self, adapter: Any, msg: Run) -> None:
        output_dir = Path(msg.output_dir)
        job_id = msg.job_id

        # A final 100% is held back: the job's outcome follows at once in most cases and implies it
        # (the scheduler records progress 1 with the result), so it would only cost a message.
        held: list[Progress] = []

        def send_progress(fraction: float, message: str) -> None:
            update = Progress(job_id, fraction, message[:500])
            if fraction >= 1.0:
                held[:] = [update]
                return
            held.clear()
            self.send(update)

        # What an earlier attempt left in the output directory is removed before this attempt writes
        # there (on first use of ctx.output_dir); a retry clears it up front.
        ctx = Context(
            msg.job_id,
            msg.attempt,
            output_dir,
            self.device,
            send_progress=send_progress,
            prepare_output_dir=_prepare_output_dir,
        )
        with self.state_lock:
            self.current = ctx
            if job_id in self.cancelled_ids:
                ctx.cancel()
        if self.position is not None:
            self.position.value = msg.seq
        t0 = time.perf_counter()
        try:
            ctx.check_cancelled()
            if msg.attempt > 1:
                _prepare_output_dir(output_dir)
            result = adapter.run(resolve_inputs(msg.inputs), ctx)
            if not isinstance(result, dict):
                raise TypeError(f"run() must return a dict, got {type(result).__name__}")
            # The result is stored as JSON (PostgreSQL jsonb has no NaN): fail here, where it is clear why.
            try:
                json.dumps(result, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"run() returned a result that is not plain JSON: {exc}") from None
            outputs = list_outputs(output_dir) if ctx.output_dir_used else []
            reply: object = Done(
                job_id, result, outputs, vram_mb=_measure_vram_mb(adapter), run_s=time.perf_counter() - t0
            )
        except Exception as exc:
            kind = classify_exception(exc)
            if kind == "cancelled":
                reply = CancelledAck(job_id)
            else:
                if kind == "invalid_input":  # the caller's mistake, not a bug: one line is enough
                    print(f"vramq worker {self.model_id}: job {job_id}: {one_line(exc)}", file=sys.stderr)
                else:
                    traceback.print_exc()
                reply = Failed(job_id, kind, one_line(exc))
        finally:
            with self.state_lock:
                self.current = None
                self.cancelled_ids.discard(job_id)
        self.reply(reply)


def _load(adapter_path: str, device: str) -> Any:
    module_name, _, class_name = adapter_path.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    adapter = cls()
    adapter.load(device)
    warmup = getattr(adapter, "warmup", None)
    if callable(warmup):
        warmup()
    return adapter


def worker_main(
    conn: Connection,
    adapter_path: str,
    model_id: str,
    device: str,
    parent_pid: int,
    position: Any = None,
) -> None:
    """Entry point of a worker subprocess. Never returns: it ends the process when told to stop."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = _Worker(conn, model_id, device, position)
    t0 = time.perf_counter()
    try:
        adapter = _load(adapter_path, device)
    except BaseException as exc:
        print(f"vramq worker {model_id}: loading {adapter_path} on {device} failed", file=sys.stderr)
        traceback.print_exc()
        kind = classify_exception(exc)
        worker.send(LoadFailed("model_error" if kind == "cancelled" else kind, one_line(exc)))
        _exit(1)
    load_s = time.perf_counter() - t0
    worker.send(Ready(os.getpid(), device, _measure_vram_mb(adapter), load_s))
    threading.Thread(target=worker.read_loop, name="vramq-reader", daemon=True).start()
    threading.Thread(target=worker.fence, name="vramq-fence", daemon=True).start()
    threading.Thread(target=worker.flush_loop, name="vramq-flusher", daemon=True).start()
    while True:
        msg = worker.jobs.get()
        if isinstance(msg, Stop):
            break
        worker.run_job(adapter, msg)
    worker.flush()
    unload = getattr(adapter, "unload", None)
    if callable(unload):
        try:
            unload()
        except Exception:
            traceback.print_exc()
    _exit(0)


def _exit(code: int) -> NoReturn:
    # os._exit, not sys.exit: a thread an adapter left running must not keep the process (and its
    # memory) alive after the scheduler asked it to go.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
