"""Messages between the scheduler (parent) and one GPU worker subprocess (child).

They travel over a ``multiprocessing`` Pipe, pickled. Each is a small frozen dataclass; nothing in them
is bigger than a job's inputs or result (files stay on disk, only their names and digests travel).
Either side may send a ``list`` of messages instead of one: they are handled in order, as if sent one
by one (the parent sends the jobs it hands out in one go, the child the outcomes of short jobs).

Parent -> child
    ``Run``     run one job; the child answers any number of ``Progress``, then exactly one of ``Done``,
                ``Failed`` or ``CancelledAck``. A worker runs one job at a time, in the order received;
                the parent may send more ``Run`` messages before the answer (they wait in the child).
                ``seq`` numbers a worker's jobs from 1; the child stores the running job's ``seq`` in
                shared memory, so the parent can tell, after a crash, which job was running.
    ``Cancel``  ask the running job to stop at its next ``ctx.check_cancelled()``. A cancel for a job the
                child is not running is ignored. Cooperative only: the parent escalates with signals.
    ``Stop``    finish the running job (if any), unload, exit 0.

Child -> parent
    ``Ready``       sent once, after the adapter loaded and warmed up; ``vram_mb`` is what the worker
                    measured (None where it cannot tell, e.g. on CPU).
    ``LoadFailed``  sent instead of ``Ready`` when importing or loading the adapter failed; the child
                    exits right after.
    ``Progress``    fraction in [0, 1], throttled by the child (a final 1.0 is implied by ``Done``).
    ``Done``        ``result`` is a JSON-serialisable dict; ``outputs`` lists the files written to the job's
                    output directory; ``vram_mb`` is the measurement after the job.
    ``Failed``      ``kind`` is an ``ErrorKind`` value: ``invalid_input``, ``oom`` or ``model_error``;
                    ``message`` is one line (exception type and text), never a traceback.
    ``CancelledAck`` the job stopped because it was cancelled.

A child that dies sends nothing: the parent sees its pipe close and its process sentinel fire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Error kinds a worker itself can report (values of core.types.ErrorKind).
WorkerErrorKind = Literal["invalid_input", "oom", "model_error"]


# --- parent -> child -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    job_id: str
    attempt: int
    inputs: dict[str, Any]
    output_dir: str
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Cancel:
    job_id: str


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class Lease:
    """The scheduler's leases are good until ``until`` (``time.monotonic()``, one clock per host). A
    worker still running a job past it kills itself: a leader that froze (or lost the database) can no
    longer stop its workers, and the job is about to be rescued and run elsewhere."""

    until: float


ToWorker = Run | Cancel | Stop | Lease


# --- child -> parent -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputFile:
    name: str  # path relative to the job's output directory, '/'-separated
    size: int
    sha256: str
    content_type: str


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int
    device: str
    vram_mb: int | None
    load_s: float


@dataclass(frozen=True, slots=True)
class LoadFailed:
    kind: WorkerErrorKind
    message: str


@dataclass(frozen=True, slots=True)
class Progress:
    job_id: str
    fraction: float
    message: str = ""


@dataclass(frozen=True, slots=True)
class Done:
    job_id: str
    result: dict[str, Any]
    outputs: list[OutputFile] = field(default_factory=list)
    vram_mb: int | None = None
    run_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Failed:
    job_id: str
    kind: WorkerErrorKind
    message: str


@dataclass(frozen=True, slots=True)
class CancelledAck:
    job_id: str


FromWorker = Ready | LoadFailed | Progress | Done | Failed | CancelledAck

MAX_MESSAGE_CHARS = 2000


def one_line(exc: BaseException, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``Type: text`` on one line, cut to ``limit`` characters: what a job's error message shows."""
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
