"""``demo.sleep``: an adapter that only sleeps, for demos, load tests and the scheduler's own tests.

Inputs: ``seconds`` (how long to sleep; 0 returns at once), ``steps`` (how many progress updates; the
default gives about 20 a second), ``fail`` (raise a model error instead of finishing).

Environment knobs, read when the worker loads (all optional, meant for tests):

- ``VRAMQ_DEMO_LOAD_S``: ``load()`` sleeps this long.
- ``VRAMQ_DEMO_VRAM_MB``: the VRAM the worker reports after loading and after each job.
- ``VRAMQ_DEMO_LOAD_FAIL``: ``oom`` | ``error`` | ``crash``: ``load()`` raises an out-of-memory error,
  raises a plain error, or kills the process (exit code 3).
- ``VRAMQ_DEMO_STUBBORN``: ``1`` ignores cancellation and SIGTERM (to exercise SIGKILL escalation).
- ``VRAMQ_DEMO_RECORD_DIR``: append one JSON line when each execution starts and one when it ends to
  ``<dir>/executions-<pid>.jsonl`` (fields: event, job_id, attempt, pid, start, end, outcome), each
  flushed to disk at once, so a worker killed mid-job leaves a start without an end.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

from workers.adapter import Adapter, Cancelled, Context, InvalidInput

SLICE_S = 0.05  # the longest uninterrupted sleep: a cancel is noticed within this


def _env_float(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


class SleepAdapter(Adapter):
    def __init__(self) -> None:
        self.device = "cpu"
        self.vram_mb: int | None = None
        self.stubborn = False
        self.record_dir: Path | None = None

    def load(self, device: str) -> None:
        self.device = device
        load_s = _env_float("VRAMQ_DEMO_LOAD_S")
        if load_s:
            time.sleep(load_s)
        how = os.environ.get("VRAMQ_DEMO_LOAD_FAIL", "").strip().lower()
        if how == "oom":
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated by demo.sleep)")
        if how == "error":
            raise RuntimeError("demo.sleep was told to fail while loading")
        if how == "crash":
            os._exit(3)
        vram = _env_float("VRAMQ_DEMO_VRAM_MB")
        self.vram_mb = None if vram is None else int(vram)
        self.stubborn = os.environ.get("VRAMQ_DEMO_STUBBORN", "") in {"1", "true", "yes"}
        if self.stubborn:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        record = os.environ.get("VRAMQ_DEMO_RECORD_DIR", "")
        self.record_dir = Path(record) if record else None
        if self.record_dir is not None:
            self.record_dir.mkdir(parents=True, exist_ok=True)

    def measured_vram_mb(self) -> int | None:
        return self.vram_mb

    def _record(self, entry: dict[str, Any]) -> None:
        if self.record_dir is None:
            return
        path = self.record_dir / f"executions-{os.getpid()}.jsonl"
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def run(self, inputs: dict[str, Any], ctx: Context) -> dict[str, Any]:
        try:
            seconds = float(inputs.get("seconds", 0))
            steps_raw = inputs.get("steps")
            steps = int(steps_raw) if steps_raw else max(1, math.ceil(seconds / SLICE_S))
        except (TypeError, ValueError):
            raise InvalidInput("seconds must be a number and steps an integer") from None
        if not math.isfinite(seconds) or seconds < 0 or steps < 1:
            raise InvalidInput("seconds must be >= 0 and steps >= 1")
        pid = os.getpid()
        start = time.time()
        base = {"job_id": ctx.job_id, "attempt": ctx.attempt, "pid": pid, "start": start}
        self._record({"event": "start", **base})
        outcome = "failed"
        try:
            self._sleep(seconds, steps, ctx)
            if inputs.get("fail"):
                raise RuntimeError("demo.sleep was asked to fail")
            outcome = "ok"
        except Cancelled:
            outcome = "cancelled"
            raise
        finally:
            self._record({"event": "end", **base, "end": time.time(), "outcome": outcome})
        return {"slept_s": round(time.time() - start, 6), "pid": pid}

    def _sleep(self, seconds: float, steps: int, ctx: Context) -> None:
        if seconds <= 0:
            ctx.progress(1.0)
            return
        t0 = time.monotonic()
        for i in range(1, steps + 1):
            step_end = t0 + seconds * i / steps
            while (left := step_end - time.monotonic()) > 0:
                time.sleep(min(SLICE_S, left))
                if not self.stubborn:
                    ctx.check_cancelled()
            ctx.progress(i / steps, f"step {i}/{steps}")
