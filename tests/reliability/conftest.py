"""Fixtures of the reliability scenarios, and the table printed at the end of the run.

``VRAMQ_CHAOS=full`` (``make chaos``) runs every scenario with its full number of faults; without it the
same scenarios run with a few faults each, small enough for every ``make test``.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from db import migrate
from db.dsn import with_database
from tests.reliability.harness import Cluster, RestartablePg
from tests.reliability.report import REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT.rows:
        return
    terminalreporter.section("vramq reliability")
    for line in REPORT.table().splitlines():
        terminalreporter.write_line(line)
    target = os.environ.get("VRAMQ_CHAOS_REPORT")
    if target:
        REPORT.write_json(Path(target))
        terminalreporter.write_line(f"(written to {target})")


@pytest.fixture
async def cluster(dsn: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(dsn=dsn, root=tmp_path / "cluster")
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def db(conn: asyncpg.Connection) -> asyncpg.Connection:
    """The scenarios' name for the suite-wide ``conn`` fixture."""
    return conn


@pytest.fixture(scope="session")
def own_pg() -> Iterator[RestartablePg]:
    """A PostgreSQL on TCP that the scenarios may restart, crash or cut off (shared by them)."""
    # A short path: the server's unix socket lives under it.
    root = Path(tempfile.mkdtemp(prefix="vramq-rel-"))
    root.chmod(0o755)  # run as root, the server runs as its own user: it must reach its directory
    pg = RestartablePg(root)
    pg.start()
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
def own_dsn(own_pg: RestartablePg) -> Iterator[str]:
    """A fresh migrated database on ``own_pg``."""
    name = f"vramq_r_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(own_pg.dsn("postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = with_database(own_pg.dsn("postgres"), name)
    migrate.upgrade(dsn)
    try:
        yield dsn
    finally:
        try:
            with psycopg.connect(own_pg.dsn("postgres"), autocommit=True, connect_timeout=10) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.OperationalError:
            pass
