"""The interface a model implements to run under vramq.

An adapter is a small class named ``module:Class`` in the model registry. A worker subprocess creates
one instance, calls ``load(device)`` once, ``warmup()`` if defined, then ``run(inputs, ctx)`` for each
job, one at a time, and ``unload()`` (if defined) before it exits::

    class Upscale(Adapter):
        def load(self, device: str) -> None:
            self.model = build_model().to(device)

        def run(self, inputs: dict[str, Any], ctx: Context) -> dict[str, Any]:
            image: InputFile = inputs["image"]
            for i, tile in enumerate(tiles(image.path)):
                ctx.check_cancelled()
                ...
                ctx.progress((i + 1) / n)
            save(ctx.output_dir / "out.png")
            return {"tiles": n}

Subclassing ``Adapter`` is optional: any class with ``load`` and ``run`` works. Optional methods:

- ``warmup()``: run once after ``load``, before the worker reports ready (compile kernels, first batch).
- ``unload()``: release what ``load`` took, when the worker stops.
- ``measured_vram_mb() -> int | None``: what the model really holds on its device. When it returns a
  number the worker reports it instead of its own measurement (torch's reserved memory plus an estimate
  of the CUDA context).

``run`` returns a JSON-serialisable dict (the job's ``result``); files it writes to ``ctx.output_dir``
become the job's outputs. ``device`` is ``"cuda:0"`` on a GPU (the worker only sees its own GPU) and
``"cpu"`` otherwise.

Uploaded files arrive as ``InputFile`` values in place of the ``{"file": "<id>"}`` objects the client
sent. Raise ``InvalidInput`` for inputs the model cannot use (the job fails with ``invalid_input`` and is
not retried). CUDA out-of-memory errors are reported as ``oom``; ``Cancelled`` (from
``ctx.check_cancelled()``) ends the job as cancelled; any other exception is a ``model_error``.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

MIN_PROGRESS_INTERVAL_S = 0.05  # at most about 20 progress messages a second


class InvalidInput(ValueError):
    """The job's inputs cannot be used by this model (bad file, impossible parameters)."""


class Cancelled(Exception):
    """The job was cancelled; raised by ``Context.check_cancelled``."""


@dataclass(frozen=True, slots=True)
class InputFile:
    """An uploaded file the job may read: ``path`` is on local disk, ``name`` is the uploaded name."""

    id: str
    name: str
    path: Path
    size: int

    @property
    def suffix(self) -> str:
        """The lower-case extension without its dot, from the uploaded name, else from the path."""
        for candidate in (self.name, self.path.name):
            ext = Path(candidate).suffix
            if ext:
                return ext[1:].lower()
        return ""


class Context:
    """What a running job may use besides its inputs: where to write, progress, cancellation."""

    def __init__(
        self,
        job_id: str,
        attempt: int,
        output_dir: Path,
        device: str,
        *,
        send_progress: Callable[[float, str], None] | None = None,
        cancel_event: threading.Event | None = None,
        min_interval_s: float = MIN_PROGRESS_INTERVAL_S,
        prepare_output_dir: Callable[[Path], None] | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self._output_dir = output_dir
        self._prepare = prepare_output_dir
        self.output_dir_used = False
        self.device = device
        self._send = send_progress
        self._cancel = cancel_event if cancel_event is not None else threading.Event()
        self._min_interval_s = min_interval_s
        self._last_sent = -math.inf
        self._lock = threading.Lock()

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress in [0, 1]. Cheap to call often: updates are throttled, 1.0 always goes out."""
        if self._send is None or math.isnan(fraction):
            return
        fraction = min(1.0, max(0.0, float(fraction)))
        now = time.monotonic()
        with self._lock:
            if fraction < 1.0 and now - self._last_sent < self._min_interval_s:
                return
            self._last_sent = now
        self._send(fraction, message)

    @property
    def output_dir(self) -> Path:
        """Where the job writes its output files; created on first use (most jobs of a load test write
        nothing, and a directory per job would be left behind for nothing)."""
        if not self.output_dir_used:
            if self._prepare is not None:
                self._prepare(self._output_dir)
            self._output_dir.mkdir(parents=True, exist_ok=True)
            self.output_dir_used = True
        return self._output_dir

    @property
    def cancelled(self) -> bool:
        """True once the job has been asked to stop."""
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raise ``Cancelled`` if the job has been asked to stop. Call it between steps."""
        if self._cancel.is_set():
            raise Cancelled(f"job {self.job_id} was cancelled")

    def cancel(self) -> None:
        """Ask the job to stop (the worker runtime calls this when the scheduler cancels the job)."""
        self._cancel.set()


class Adapter:
    """Base class for adapters; see the module docstring. Only ``run`` must be overridden."""

    def load(self, device: str) -> None:
        """Load the model onto ``device`` (``"cuda:0"`` or ``"cpu"``)."""

    def run(self, inputs: dict[str, Any], ctx: Context) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}.run is not implemented")

    def warmup(self) -> None:
        """Optional: prepare for the first job after ``load``."""

    def unload(self) -> None:
        """Optional: release what ``load`` took."""

    def measured_vram_mb(self) -> int | None:
        """Optional: the device memory the model holds, in MiB; None lets the worker measure it."""
        return None


ErrorClass = Literal["invalid_input", "oom", "model_error", "cancelled"]


def classify_exception(exc: BaseException) -> ErrorClass:
    """Map an exception raised by an adapter to the error kind the job fails with."""
    if isinstance(exc, Cancelled):
        return "cancelled"
    if isinstance(exc, InvalidInput):
        return "invalid_input"
    if isinstance(exc, MemoryError):
        return "oom"
    torch = sys.modules.get("torch")  # only a module that already imported torch can raise its errors
    if torch is not None:
        oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
        if isinstance(oom_type, type) and isinstance(exc, oom_type):
            return "oom"
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
        return "oom"
    return "model_error"


def resolve_inputs(value: Any) -> Any:
    """Replace every ``{"file": id, "path": ...}`` object (resolved by the scheduler) by an InputFile."""
    if isinstance(value, dict):
        if "file" in value and "path" in value:
            path = Path(str(value["path"]))
            name = str(value.get("name") or path.name)
            size = value.get("size")
            if not isinstance(size, int):
                try:
                    size = path.stat().st_size
                except OSError:
                    size = -1
            return InputFile(id=str(value["file"]), name=name, path=path, size=size)
        return {k: resolve_inputs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_inputs(v) for v in value]
    return value
