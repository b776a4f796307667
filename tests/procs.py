"""Helpers for tests that run real vramq processes: start them, wait on conditions, read executions."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

DEMO = "workers.adapters.demo:SleepAdapter"


def models_file(path: Path, extra: list[dict[str, Any]] | None = None, **demo: Any) -> Path:
    """A registry with demo.sleep (overridable fields) plus extra demo-backed models."""
    base = {
        "id": "demo.sleep",
        "feature": "demo",
        "adapter": DEMO,
        "vram_mb": 256,
        "max_workers": 2,
        "timeout_s": 600,
        "idle_evict_s": 600,
        "inputs": {
            "type": "object",
            "properties": {
                "seconds": {"type": "number", "minimum": 0},
                "steps": {"type": "integer", "minimum": 0},
                "fail": {"type": "boolean"},
            },
            "required": ["seconds"],
        },
    }
    base.update(demo)
    models = [base]
    for m in extra or []:
        models.append({**{k: v for k, v in base.items() if k != "id"}, **m})
    path.write_text(yaml.safe_dump({"models": models}))
    return path


async def wait_for(
    check: Callable[[], Awaitable[T]], *, timeout: float, interval: float = 0.02, what: str = "condition"
) -> T:
    """Poll an async check until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 30) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


def base_env(dsn: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("VRAMQ_") and k not in ("DATABASE_URL", "ENABLE_SCHEDULER")
    }
    env.update(
        {
            "VRAMQ_DATABASE_URL": dsn,
            "VRAMQ_DATA_DIR": str(data_dir),
            "VRAMQ_AUTH": "disabled",
            "VRAMQ_POLL_INTERVAL_S": "0.5",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def spawn(args: list[str], env: dict[str, str], log: Path) -> Proc:
    fh = log.open("ab")
    popen = subprocess.Popen(
        args, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
    )
    fh.close()
    return Proc(popen, log)


def start_scheduler(dsn: str, data_dir: Path, log: Path, **env: str) -> Proc:
    return spawn([sys.executable, "-m", "scheduler"], base_env(dsn, data_dir, **env), log)


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    """Collects started processes; on exit kills what is left (and their process groups)."""
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in procs:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(5)
        for p in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)


def executions(record_dir: Path) -> list[dict[str, Any]]:
    """demo.sleep's execution records, merged into one entry per execution (start, end or None)."""
    runs: dict[tuple[str, int, int], dict[str, Any]] = {}
    for f in sorted(record_dir.glob("executions-*.jsonl")):
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            e = json.loads(line)
            key = (e["job_id"], e["attempt"], e["pid"])
            run = runs.setdefault(key, {"job_id": e["job_id"], "attempt": e["attempt"], "pid": e["pid"]})
            run["start"] = e["start"]
            if e["event"] == "end":
                run["end"] = e["end"]
                run["outcome"] = e["outcome"]
    for run in runs.values():
        run.setdefault("end", None)
    return list(runs.values())


def overlapping(
    runs: list[dict[str, Any]], killed_at: dict[int, float] | None = None
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs of executions of one job that overlap in time.

    An execution without an end record was killed; ``killed_at`` maps the pids the test killed (or whose
    leader it killed) to when, and that counts as its end. Any other unfinished execution followed by
    another one of the same job counts as an overlap.
    """
    killed_at = killed_at or {}
    by_job: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_job.setdefault(r["job_id"], []).append(r)
    bad = []
    for rs in by_job.values():
        rs.sort(key=lambda r: r["start"])
        for a, b in itertools.pairwise(rs):
            a_end = a["end"] if a["end"] is not None else killed_at.get(a["pid"])
            if a_end is None or a_end > b["start"]:
                bad.append((a, b))
    return bad


def pid_gone(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_api(env: dict[str, str], log: Path, *extra_args: str) -> tuple[Proc, str]:
    """``uvicorn api.main:app`` on a free port, waited on until ``/readyz`` answers 200 (sync: for
    fixtures). Returns the process and its base URL; the caller stops it."""
    import httpx

    port = free_port()
    proc = spawn(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "api.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra_args,
        ],
        env,
        log,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.popen.poll() is not None:
            raise AssertionError(f"uvicorn exited:\n{proc.output()[-3000:]}")
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"uvicorn did not become ready:\n{proc.output()[-3000:]}")
        time.sleep(0.05)
