"""Settings come from VRAMQ_* variables (DATABASE_URL too); bad values fail once, readably, by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.settings import Settings, load_settings
from core.types import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("VRAMQ_") or name in {"DATABASE_URL", "ENABLE_SCHEDULER"}:
            monkeypatch.delenv(name)
    return monkeypatch


def config_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    return str(info.value)


def test_defaults() -> None:
    s = load_settings()
    assert s.database_url is None
    assert s.data_dir == Path(".vramq")
    assert s.files_dir == Path(".vramq") / "files"
    assert s.lease_ttl_s == 30.0 and s.lease_extend_interval_s == 5.0
    assert s.enable_scheduler == "auto" and s.scheduler_enabled
    assert s.auth == "required"
    assert s.pool  # the host name


def test_env_prefix(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("VRAMQ_LEASE_TTL_S", "12.5")
    clean_env.setenv("VRAMQ_LEASE_EXTEND_INTERVAL_S", "3")
    clean_env.setenv("VRAMQ_POOL", "gpu-host-1")
    clean_env.setenv("VRAMQ_DATA_DIR", "/srv/vramq")
    clean_env.setenv("VRAMQ_STORAGE_DIR", "/mnt/files")
    clean_env.setenv("VRAMQ_AUTH", "disabled")
    clean_env.setenv("LEASE_TTL_S", "999")  # without the prefix: not ours
    s = load_settings()
    assert s.lease_ttl_s == 12.5 and s.lease_extend_interval_s == 3.0
    assert s.pool == "gpu-host-1"
    assert s.data_dir == Path("/srv/vramq") and s.files_dir == Path("/mnt/files")
    assert s.auth == "disabled"


def test_database_url_alias_and_precedence(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DATABASE_URL", "postgresql://u@db:5432/plain")
    assert load_settings().database_url == "postgresql://u@db:5432/plain"
    clean_env.setenv("VRAMQ_DATABASE_URL", "postgresql+psycopg://u@db:5432/prefixed")
    assert load_settings().database_url == "postgresql+psycopg://u@db:5432/prefixed"
    clean_env.setenv("VRAMQ_DATABASE_URL", "")
    clean_env.delenv("DATABASE_URL")
    assert load_settings().database_url is None  # empty means the embedded server


def test_enable_scheduler_alias(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ENABLE_SCHEDULER", "false")
    s = load_settings()
    assert s.enable_scheduler == "false" and not s.scheduler_enabled


def test_negative_ttl_names_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    msg = config_error(clean_env, VRAMQ_LEASE_TTL_S="-1")
    assert "VRAMQ_LEASE_TTL_S" in msg and "> 0" in msg
    assert "Traceback" not in msg and "pydantic" not in msg.lower()


def test_not_a_number(clean_env: pytest.MonkeyPatch) -> None:
    msg = config_error(clean_env, VRAMQ_PORT="eighty")
    assert "VRAMQ_PORT" in msg


def test_extend_interval_must_be_at_most_half_the_ttl(clean_env: pytest.MonkeyPatch) -> None:
    msg = config_error(clean_env, VRAMQ_LEASE_TTL_S="10", VRAMQ_LEASE_EXTEND_INTERVAL_S="6")
    assert "VRAMQ_LEASE_EXTEND_INTERVAL_S" in msg and "VRAMQ_LEASE_TTL_S" in msg
    clean_env.setenv("VRAMQ_LEASE_EXTEND_INTERVAL_S", "5")
    assert load_settings().lease_extend_interval_s == 5


def test_backoff_max_below_base(clean_env: pytest.MonkeyPatch) -> None:
    msg = config_error(clean_env, VRAMQ_BACKOFF_BASE_S="10", VRAMQ_BACKOFF_MAX_S="5")
    assert "VRAMQ_BACKOFF_MAX_S" in msg


def test_bad_dsn_scheme(clean_env: pytest.MonkeyPatch) -> None:
    msg = config_error(clean_env, VRAMQ_DATABASE_URL="mysql://u@db/x")
    assert "DATABASE_URL" in msg and "postgresql://" in msg


def test_several_errors_in_one_message(clean_env: pytest.MonkeyPatch) -> None:
    msg = config_error(clean_env, VRAMQ_LEASE_TTL_S="0", VRAMQ_CLAIM_BATCH_MAX="-3", VRAMQ_AUTH="maybe")
    for name in ("VRAMQ_LEASE_TTL_S", "VRAMQ_CLAIM_BATCH_MAX", "VRAMQ_AUTH"):
        assert name in msg


def test_pool_name_length(clean_env: pytest.MonkeyPatch) -> None:
    assert "VRAMQ_POOL" in config_error(clean_env, VRAMQ_POOL="x" * 201)


def test_error_names_are_the_real_variables(clean_env: pytest.MonkeyPatch) -> None:
    msg = config_error(clean_env, VRAMQ_DATABASE_URL="mysql://u@db/x")
    assert "VRAMQ_VRAMQ_" not in msg
    msg = config_error(clean_env, VRAMQ_DATABASE_URL="", VRAMQ_LEASE_EXTEND_INTERVAL_S="60")
    assert "VRAMQ_SETTINGS" not in msg


def test_direct_construction_is_typed() -> None:
    s = Settings(lease_ttl_s=8, lease_extend_interval_s=2, pool="p")
    assert (s.lease_ttl_s, s.lease_extend_interval_s, s.pool) == (8.0, 2.0, "p")
