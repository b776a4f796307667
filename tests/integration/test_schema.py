"""The migrations produce exactly the SQLAlchemy metadata, and walk down and up again."""

from __future__ import annotations

import psycopg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, pool

from db import migrate
from db.dsn import sqlalchemy_url
from db.schema import metadata


def _diff(dsn: str) -> list[object]:
    engine = create_engine(sqlalchemy_url(dsn), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_server_default": True})
            return list(compare_metadata(ctx, metadata))
    finally:
        engine.dispose()


def _triggers(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as c:
        rows = c.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'jobs'::regclass AND NOT tgisinternal"
        ).fetchall()
    return {r[0] for r in rows}


def test_migrated_schema_equals_metadata(empty_dsn: str) -> None:
    migrate.upgrade(empty_dsn)
    assert migrate.is_current(empty_dsn)
    assert _diff(empty_dsn) == []
    assert _triggers(empty_dsn) == {"jobs_inserted", "jobs_updated"}


def test_downgrade_then_upgrade(empty_dsn: str) -> None:
    migrate.upgrade(empty_dsn)
    migrate.downgrade(empty_dsn, "base")
    assert migrate.current(empty_dsn) is None
    with psycopg.connect(empty_dsn) as c:
        left = c.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
        ).fetchall()
        assert left == []
    migrate.upgrade(empty_dsn)
    assert _diff(empty_dsn) == []
    assert _triggers(empty_dsn) == {"jobs_inserted", "jobs_updated"}
    migrate.downgrade(empty_dsn, "0001")
    assert len(_triggers(empty_dsn)) == 4
    migrate.upgrade(empty_dsn)


def test_jobs_table_is_tuned_for_churn(dsn: str) -> None:
    with psycopg.connect(dsn) as c:
        (opts,) = c.execute("SELECT reloptions FROM pg_class WHERE relname = 'jobs'").fetchone()  # type: ignore[misc]
    assert "fillfactor=70" in opts
    assert any(o.startswith("autovacuum_vacuum_scale_factor=") for o in opts)
