"""Run alembic migrations from code (``vramq migrate``, tests), serialised by an advisory lock."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool, text

from db.dsn import sqlalchemy_url

MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK = "SELECT pg_advisory_lock(hashtext('vramq'), hashtext('migrate'))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtext('vramq'), hashtext('migrate'))"


def alembic_config(dsn: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if dsn:
        cfg.attributes["url"] = dsn
    return cfg


def head() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1, f"migrations must have one head, found {heads}"
    return heads[0]


def _run(dsn: str, fn: str, revision: str) -> None:
    engine = create_engine(sqlalchemy_url(dsn), poolclass=pool.NullPool)
    try:
        with engine.connect() as lock_conn:
            lock_conn.execute(text(_LOCK))
            try:
                with engine.begin() as conn:
                    cfg = alembic_config(dsn)
                    cfg.attributes["connection"] = conn
                    getattr(command, fn)(cfg, revision)
            finally:
                lock_conn.execute(text(_UNLOCK))
    finally:
        engine.dispose()


def upgrade(dsn: str, revision: str = "head") -> None:
    _run(dsn, "upgrade", revision)


def downgrade(dsn: str, revision: str = "base") -> None:
    _run(dsn, "downgrade", revision)


def current(dsn: str) -> str | None:
    engine = create_engine(sqlalchemy_url(dsn), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            rev: str | None = MigrationContext.configure(conn).get_current_revision()
            return rev
    finally:
        engine.dispose()


def is_current(dsn: str) -> bool:
    return current(dsn) == head()
