"""One settings class for every vramq process (API replica, scheduler candidate, CLI).

Environment variables carry the ``VRAMQ_`` prefix (``DATABASE_URL`` is accepted too). Units are in the
names. Invalid values fail at start-up with one message naming the variable.
"""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.types import ConfigError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VRAMQ_", extra="ignore", populate_by_name=True)

    # Where the data lives. No database_url means an embedded PostgreSQL under data_dir.
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("VRAMQ_DATABASE_URL", "DATABASE_URL", "database_url")
    )
    data_dir: Path = Path(".vramq")
    storage_dir: Path | None = None  # uploads and outputs; default <data_dir>/files
    models_file: Path | None = None  # default: the bundled registry (core/models.yaml)

    # Scheduler.
    enable_scheduler: Literal["auto", "true", "false"] = Field(
        default="auto",
        validation_alias=AliasChoices("VRAMQ_ENABLE_SCHEDULER", "ENABLE_SCHEDULER", "enable_scheduler"),
    )
    pool: str = Field(default_factory=socket.gethostname)
    gpus: str = "auto"  # auto | nvml | cpu | cpu:<slots> | fake:<n>x<size>
    lease_ttl_s: float = 30.0
    lease_extend_interval_s: float = 5.0
    heartbeat_interval_s: float = 2.0
    poll_interval_s: float = 1.0
    claim_batch_max: int = 64
    vram_reserve_mb: int = 512
    starvation_s: float = 30.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    progress_min_interval_s: float = 0.25
    cancel_grace_s: float = 2.0
    worker_start_timeout_s: float = 300.0
    shutdown_grace_s: float = 30.0
    lock_keepalive_idle_s: int = 5
    retention_days: float = 30.0

    # API.
    host: str = "127.0.0.1"
    port: int = 8000
    auth: Literal["required", "disabled"] = "required"
    max_upload_bytes: int = 512 * 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    sse_poll_interval_s: float = 2.0
    db_pool_min: int = 1
    db_pool_max: int = 10
    db_connect_timeout_s: float = 5.0
    db_command_timeout_s: float = 30.0

    @field_validator("pool")
    @classmethod
    def _pool_name(cls, v: str) -> str:
        if not v or len(v) > 200:
            raise ValueError("must be 1..200 characters")
        return v

    @field_validator(
        "lease_ttl_s",
        "lease_extend_interval_s",
        "heartbeat_interval_s",
        "poll_interval_s",
        "backoff_base_s",
        "backoff_max_s",
        "cancel_grace_s",
        "shutdown_grace_s",
        "retention_days",
        "db_connect_timeout_s",
        "db_command_timeout_s",
        "sse_poll_interval_s",
    )
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("claim_batch_max", "max_upload_bytes", "max_body_bytes", "db_pool_max")
    @classmethod
    def _positive_int(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("database_url")
    @classmethod
    def _dsn(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not v.startswith(("postgresql://", "postgres://", "postgresql+")):
            raise ValueError("must be a postgresql:// URL")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.lease_extend_interval_s * 2 > self.lease_ttl_s:
            raise ValueError(
                "VRAMQ_LEASE_EXTEND_INTERVAL_S must be at most half of VRAMQ_LEASE_TTL_S, "
                "or leases expire between two extensions"
            )
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("VRAMQ_BACKOFF_MAX_S must be >= VRAMQ_BACKOFF_BASE_S")
        return self

    @property
    def files_dir(self) -> Path:
        return self.storage_dir if self.storage_dir is not None else self.data_dir / "files"

    @property
    def scheduler_enabled(self) -> bool:
        return self.enable_scheduler != "false"


def load_settings() -> Settings:
    """Read settings from the environment, turning validation errors into one readable ConfigError."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]).upper()
            msg = str(err["msg"]).removeprefix("Value error, ")
            if not loc:  # a rule across several settings: its message names them
                lines.append(msg)
                continue
            name = loc if loc.startswith(("VRAMQ_", "DATABASE_URL", "ENABLE_SCHEDULER")) else f"VRAMQ_{loc}"
            lines.append(f"{name}: {msg}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
