"""The embedded PostgreSQL is shared by the local processes that use it and stopped by the last one.

One cluster (one initdb) serves the whole module. The second user of the server is a real process (a
child Python that joins through its own handle), since the users file counts processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from db.connect import connect
from db.embedded import EmbeddedServer

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 90.0

# A second process joining the server: prints its DSN, then leaves cleanly on "release", or is killed.
CHILD = """
import sys
from db.embedded import EmbeddedServer
server = EmbeddedServer(sys.argv[1])
print(server.start(), flush=True)
if sys.stdin.readline().strip() == "release":
    server.release()
    print("released", flush=True)
"""


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    """One cluster for the module, in its own temporary directory.

    Not under pytest's base temp dir: every pytest session resets that to mode 0700, and when the tests
    run as root the server runs as a system user that must be able to reach its data directory.
    """
    path = Path(tempfile.mkdtemp(prefix="vramq-embedded-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        EmbeddedServer(path).stop()
        shutil.rmtree(path, ignore_errors=True)


class Child:
    """A process that holds its own handle on the server."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    @classmethod
    async def join(cls, data_dir: Path) -> tuple[Child, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            str(data_dir),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        child = cls(proc)
        return child, await child.line()

    async def line(self) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), DEADLINE_S)
        assert raw, "the child exited early"
        return raw.decode().strip()

    async def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"release\n")
        await self.proc.stdin.drain()
        assert await self.line() == "released"
        assert await asyncio.wait_for(self.proc.wait(), DEADLINE_S) == 0

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), DEADLINE_S)

    async def close(self) -> None:
        if self.proc.returncode is None:
            await self.kill()


@pytest.fixture
async def child_slot() -> AsyncIterator[list[Child]]:
    """Children started by a test, killed afterwards whatever happened."""
    children: list[Child] = []
    try:
        yield children
    finally:
        for c in children:
            await c.close()


def users(data_dir: Path) -> list[int]:
    loaded: list[int] = json.loads((data_dir / "pg.users").read_text())
    return loaded


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "pg" / "postmaster.pid").read_text().splitlines()[0])


async def answers(dsn: str) -> bool:
    conn = await connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT current_database() = 'vramq'"))
    finally:
        await conn.close()


async def test_handles_share_one_server_until_the_last_leaves(
    data_dir: Path, child_slot: list[Child]
) -> None:
    child, child_dsn = await Child.join(data_dir)
    child_slot.append(child)
    first_postmaster = postmaster_pid(data_dir)

    ours = EmbeddedServer(data_dir)
    assert ours.start() == child_dsn  # joined, not started again
    assert postmaster_pid(data_dir) == first_postmaster
    assert sorted(users(data_dir)) == sorted([child.pid, os.getpid()])
    assert await answers(ours.dsn())

    ours.release()
    assert ours.running(), "released by one user, but another still uses it"
    assert users(data_dir) == [child.pid]
    assert await answers(child_dsn)
    ours.release()  # a second release is a no-op
    assert ours.running()

    await child.release()
    assert not ours.running(), "the last user left: the server stops"
    assert users(data_dir) == []


async def test_a_dead_user_does_not_keep_it_alive(data_dir: Path, child_slot: list[Child]) -> None:
    child, _ = await Child.join(data_dir)
    child_slot.append(child)
    postmaster = postmaster_pid(data_dir)
    await child.kill()  # no release: its pid stays in the users file
    assert child.pid in users(data_dir)

    ours = EmbeddedServer(data_dir)
    assert ours.running(), "a server left by a crashed process keeps running ..."
    ours.start()
    assert postmaster_pid(data_dir) == postmaster, "... and is reused"
    assert users(data_dir) == [os.getpid()], "the dead pid is pruned"
    assert await answers(ours.dsn())
    ours.release()
    assert not ours.running()


async def test_start_after_stop_restarts_the_same_cluster(data_dir: Path) -> None:
    ours = EmbeddedServer(data_dir)
    ours.start()
    conn = await connect(ours.dsn())
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS kept (x int)")
        await conn.execute("INSERT INTO kept VALUES (1)")
    finally:
        await conn.close()
    ours.stop()
    assert not ours.running()
    ours.start()
    conn = await connect(ours.dsn())
    try:
        assert await conn.fetchval("SELECT count(*) FROM kept") >= 1
    finally:
        await conn.close()
    ours.release()
    assert not ours.running()
