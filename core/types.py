"""Shared vocabulary: job states, error kinds and the errors vramq raises on purpose."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_STATUSES = frozenset({JobStatus.LEASED, JobStatus.RUNNING})

# Every legal edge of the job state machine; job_events must only ever show these.
LEGAL_TRANSITIONS: frozenset[tuple[str | None, str]] = frozenset(
    {
        (None, "queued"),
        ("queued", "leased"),
        ("queued", "running"),  # claimed straight onto a warm worker chosen before the claim
        ("queued", "cancelled"),
        ("leased", "running"),
        ("leased", "queued"),
        ("leased", "succeeded"),
        ("leased", "failed"),
        ("leased", "cancelled"),
        ("running", "queued"),
        ("running", "succeeded"),
        ("running", "failed"),
        ("running", "cancelled"),
    }
)


class ErrorKind(StrEnum):
    INVALID_INPUT = "invalid_input"
    MODEL_ERROR = "model_error"
    WORKER_CRASHED = "worker_crashed"
    TIMEOUT = "timeout"
    OOM = "oom"
    LEASE_LOST = "lease_lost"
    CANCELLED = "cancelled"


# Which failures are worth another attempt unless a model says otherwise. Bad input never gets better by
# retrying; a timeout usually repeats and costs a whole timeout each time; a cancel is a decision.
DEFAULT_RETRY_ON = frozenset(
    {ErrorKind.MODEL_ERROR, ErrorKind.WORKER_CRASHED, ErrorKind.OOM, ErrorKind.LEASE_LOST}
)
NEVER_RETRY = frozenset({ErrorKind.INVALID_INPUT, ErrorKind.CANCELLED})


class VramqError(Exception):
    """Base of the errors vramq raises on purpose (as opposed to bugs)."""


class ConfigError(VramqError):
    """Settings or the model registry are wrong; raised at start-up with a message a person can act on."""


class InputError(VramqError):
    """A job's inputs do not match its model's schema."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path
