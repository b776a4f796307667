"""Shared workload definitions and result format for the queue benchmarks.

Every runner (the peers in ``bench/peers/``, the raw-SQL limit in ``bench/raw_sql/``
and vramq's own runner) imports this module, so that all systems run the same
workloads, are timed the same way and write the same result lines.

Standard library only (numpy is not needed); importable from any virtual
environment as long as ``bench/`` is on ``sys.path``.

Workloads
---------
``enqueue``       one client enqueues ``JOBS_ENQUEUE`` jobs one call at a time, each
                  call committed before the next; no worker runs.
                  value = jobs / (end of last call - start of first call), jobs/s.
``enqueue_bulk``  one client enqueues ``JOBS_ENQUEUE_BULK`` jobs in calls of
                  ``BULK_BATCH`` with the library's bulk API (skipped where none exists).
``drain``         ``JOBS_DRAIN`` no-op jobs are enqueued first (untimed), then the
                  worker starts. value = N / (last job body end - first job body start),
                  both read from the job bodies' own ``time.time()`` stamps.
``pickup``        an idle, warmed-up worker; jobs arrive open-loop at ``PICKUP_RATE``
                  jobs/s for ``PICKUP_SECONDS``. Latency of a job = its body's
                  ``time.time()`` at start - ``time.time()`` taken just before the
                  enqueue call (so the enqueue round trip and commit are included).
                  value = p50 in ms; p90/p99/max and the first job's latency are in
                  ``extra``. Nothing is excluded.

Job bodies
----------
A job carries one integer ``i`` (``PROBE`` marks a warm-up job that is not
counted). Its body calls ``Recorder.record(i, t_start)`` (or ``start()``/``done()``),
which appends ``"i t_start t_end"`` to a per-process file in the directory named
by the ``BENCH_RECORD_DIR`` environment variable. The runner reads those files
back with ``RecordReader``. No job does anything else, so every system pays only
for its own queue.

Result lines (JSON, one per line, appended to ``--out``)::

    {"system": "pgqueuer", "workload": "drain", "value": 12018.3, "unit": "jobs/s",
     "extra": {...}, "params": {"jobs": 20000, "concurrency": 100, ...},
     "run": {"id": "...", "repeat": 0, "at": "...", "host": "...", "cpus": 2, ...}}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import inspect
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------
# Workloads and their parameters (bounded so each one runs well under a minute on 2 cores)
# --------------------------------------------------------------------------------------

WORKLOADS = ("enqueue", "enqueue_bulk", "drain", "pickup")

JOBS_ENQUEUE = 10_000  # one-at-a-time enqueue, one client
JOBS_ENQUEUE_BULK = 20_000  # bulk enqueue, one client ...
BULK_BATCH = 1_000  # ... in calls of this many jobs
JOBS_DRAIN = 20_000  # pre-enqueued no-op jobs the worker drains
PICKUP_RATE = 100.0  # jobs/s arriving at an idle worker (open loop) ...
PICKUP_SECONDS = 10.0  # ... for this long (PICKUP_RATE * PICKUP_SECONDS jobs)
PICKUP_IDLE_S = 0.5  # idle time between the warm-up job and the first measured job
RAW_SQL_SECONDS = 10  # duration of each pgbench script

# Every wait is bounded. A workload that needs longer than this is reported as failed,
# except a drain, which is reported over the jobs done by then and flagged incomplete.
DEADLINE_S = 90.0

PROBE = -1  # job index of warm-up jobs (never counted)

DEFAULT_PG_DSN = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
DEFAULT_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
RECORD_DIR_ENV = "BENCH_RECORD_DIR"

DEFAULT_N = {
    "enqueue": JOBS_ENQUEUE,
    "enqueue_bulk": JOBS_ENQUEUE_BULK,
    "drain": JOBS_DRAIN,
    "pickup": int(PICKUP_RATE * PICKUP_SECONDS),
}

UNITS = {"enqueue": "jobs/s", "enqueue_bulk": "jobs/s", "drain": "jobs/s", "pickup": "ms"}

# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def percentiles(samples: Iterable[float]) -> dict[str, float]:
    """Return ``{p50, p90, p99, max, n}`` of ``samples`` (units unchanged)."""
    ordered = sorted(samples)
    if not ordered:
        return {"p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan, "n": 0}
    return {
        "p50": _quantile(ordered, 0.50),
        "p90": _quantile(ordered, 0.90),
        "p99": _quantile(ordered, 0.99),
        "max": ordered[-1],
        "n": len(ordered),
    }


# --------------------------------------------------------------------------------------
# Result format
# --------------------------------------------------------------------------------------


def _run_id() -> str:
    rid = os.environ.get("BENCH_RUN_ID")
    if rid:
        return rid
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"


def run_info(repeat: int = 0, **more: Any) -> dict[str, Any]:
    """Describe this run: id (``BENCH_RUN_ID`` groups several runners), host, cpus, python."""
    info: dict[str, Any] = {
        "id": _run_id(),
        "repeat": repeat,
        "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        # other load on the machine skews every number: keep it with the result
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    info.update(more)
    return info


def make_result(
    system: str,
    workload: str,
    value: float | None,
    unit: str,
    *,
    params: dict[str, Any],
    extra: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one result in the common schema (see the module docstring)."""
    return {
        "system": system,
        "workload": workload,
        "value": None if value is None else round(float(value), 3),
        "unit": unit,
        "extra": _clean(extra or {}),
        "params": _clean(params),
        "run": run or run_info(),
    }


def _clean(obj: Any) -> Any:
    """Round floats and turn NaN into null so the output is strict JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else round(obj, 4)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_result(path: str | os.PathLike[str] | None, result: dict[str, Any]) -> None:
    """Append ``result`` as one JSON line to ``path`` (and echo it to stdout)."""
    line = json.dumps(result, sort_keys=False)
    print(line, flush=True)
    if path:
        p = Path(path)
        if p.parent and not p.parent.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read back a JSON-lines results file (blank lines ignored)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


# --------------------------------------------------------------------------------------
# PostgreSQL: a fresh database per run
# --------------------------------------------------------------------------------------

_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def dsn_for(base_dsn: str, dbname: str) -> str:
    """``base_dsn`` (a ``postgresql://`` URL) with its database replaced by ``dbname``."""
    parts = urllib.parse.urlsplit(base_dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + dbname))


def pg_execute(dsn: str, statements: Sequence[str], fetch: bool = False) -> list[tuple]:
    """Run statements in autocommit mode; psycopg 3 or psycopg2 when importable, else psql."""
    try:
        import psycopg  # type: ignore

        with psycopg.connect(dsn, autocommit=True) as conn:
            rows: list[tuple] = []
            for stmt in statements:
                cur = conn.execute(stmt)
                if fetch and cur.description is not None:
                    rows.extend(cur.fetchall())
            return rows
    except ImportError:
        pass
    try:
        import psycopg2  # type: ignore

        conn = psycopg2.connect(dsn)
        try:
            conn.autocommit = True
            rows = []
            with conn.cursor() as cur:
                for stmt in statements:
                    cur.execute(stmt)
                    if fetch and cur.description is not None:
                        rows.extend(cur.fetchall())
            return rows
        finally:
            conn.close()
    except ImportError:
        pass
    psql = shutil.which("psql") or "/usr/lib/postgresql/15/bin/psql"
    rows = []
    for stmt in statements:
        proc = subprocess.run(
            [psql, dsn, "-X", "-v", "ON_ERROR_STOP=1", "-At", "-F", "\t", "-c", stmt],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed on {stmt!r}: {proc.stderr.strip()}")
        if fetch:
            rows.extend(tuple(line.split("\t")) for line in proc.stdout.splitlines() if line)
    return rows


def create_db(base_dsn: str, name: str) -> str:
    """Drop (if present) and create database ``name`` on the server of ``base_dsn``."""
    if not _DB_NAME.match(name):
        raise ValueError(f"unsafe database name {name!r}")
    pg_execute(base_dsn, [f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}"])
    return dsn_for(base_dsn, name)


def drop_db(base_dsn: str, name: str) -> None:
    if not _DB_NAME.match(name):
        raise ValueError(f"unsafe database name {name!r}")
    pg_execute(base_dsn, [f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"])


@contextlib.contextmanager
def fresh_db(base_dsn: str, name: str, keep: bool = False) -> Iterator[str]:
    """Create an empty database ``name`` for one run; yield its DSN; drop it afterwards.

    Call it outside any running event loop (it connects synchronously).
    """
    dsn = create_db(base_dsn, name)
    try:
        yield dsn
    finally:
        if not keep:
            with contextlib.suppress(Exception):
                drop_db(base_dsn, name)


def pg_server_info(dsn: str) -> dict[str, str]:
    """The server version and the settings that change queue throughput the most."""
    names = (
        "server_version",
        "synchronous_commit",
        "fsync",
        "shared_buffers",
        "max_connections",
        "wal_level",
    )
    in_list = ", ".join(f"'{n}'" for n in names)
    try:
        rows = pg_execute(
            dsn,
            [f"SELECT name, current_setting(name) FROM pg_settings WHERE name IN ({in_list})"],
            fetch=True,
        )
    except Exception as exc:  # informational only
        return {"error": str(exc)}
    return {str(k): str(v) for k, v in rows}


# --------------------------------------------------------------------------------------
# Job-body timestamps
# --------------------------------------------------------------------------------------


class Recorder:
    """Used inside job bodies: append ``i t_start t_end`` to this process's record file."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self._fh = None
        self._pid = None

    @classmethod
    def from_env(cls) -> Recorder:
        d = os.environ.get(RECORD_DIR_ENV)
        if not d:
            raise RuntimeError(f"{RECORD_DIR_ENV} is not set")
        return cls(d)

    def _file(self):
        pid = os.getpid()
        if self._fh is None or self._pid != pid:  # reopen after a fork
            self._pid = pid
            self._fh = open(self.directory / f"rec-{pid}.txt", "a", buffering=1, encoding="ascii")  # noqa: SIM115
        return self._fh

    @staticmethod
    def now() -> float:
        return time.time()

    def record(self, i: int, t_start: float, t_end: float | None = None) -> None:
        """Record one job: ``t_start`` taken first thing in the body, ``t_end`` last."""
        if t_end is None:
            t_end = time.time()
        self._file().write(f"{int(i)} {t_start!r} {t_end!r}\n")


class RecordReader:
    """Used by the runner: reads the record files incrementally."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self._offsets: dict[Path, int] = {}
        self.records: dict[int, tuple[float, float]] = {}  # i -> (t_start, t_end), first run
        self.duplicates = 0
        self.probes = 0

    def poll(self) -> int:
        """Read what was appended since the last call; return the number of counted jobs."""
        for path in sorted(self.directory.glob("rec-*.txt")):
            off = self._offsets.get(path, 0)
            with open(path, "rb") as fh:
                fh.seek(off)
                data = fh.read()
            end = data.rfind(b"\n")
            if end < 0:
                continue
            self._offsets[path] = off + end + 1
            for line in data[: end + 1].splitlines():
                parts = line.split()
                if len(parts) != 3:
                    continue
                i, ts, te = int(parts[0]), float(parts[1]), float(parts[2])
                if i < 0:
                    self.probes += 1
                elif i in self.records:
                    self.duplicates += 1
                else:
                    self.records[i] = (ts, te)
        return len(self.records)

    def has(self, i: int) -> bool:
        return i in self.records


# --------------------------------------------------------------------------------------
# Worker subprocesses and bounded waits
# --------------------------------------------------------------------------------------


class BenchError(RuntimeError):
    pass


class Worker:
    """A worker subprocess in its own session, its output going to a log file."""

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        cwd: str | None = None,
    ):
        self.argv = list(argv)
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="bench-worker-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        full_env = dict(os.environ)
        full_env.update(env or {})
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv,
            env=full_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            data = self.log_path.read_bytes()
            return data[-n:].decode("utf-8", "replace")
        return ""

    def check(self) -> None:
        if not self.alive():
            raise BenchError(f"worker exited early (rc={self.proc.returncode}):\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the worker's process group, then SIGKILL after ``grace`` seconds."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # stray children of the group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def worker_env(record_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Environment for a worker subprocess: where to record, unbuffered output."""
    return {RECORD_DIR_ENV: str(record_dir), "PYTHONUNBUFFERED": "1"}


async def wait_until(
    cond: Callable[[], bool],
    deadline: float,
    what: str,
    worker: Worker | None = None,
    interval: float = 0.01,
) -> None:
    """Poll ``cond`` until true; raise ``BenchError`` at ``deadline`` (a ``time.monotonic()``)."""
    while not cond():
        if worker is not None:
            worker.check()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    res = fn(*args)
    if inspect.isawaitable(res):
        res = await res
    return res


# --------------------------------------------------------------------------------------
# The workloads, driven through a system's own enqueue calls
# --------------------------------------------------------------------------------------
# ``enqueue_one(i)`` and ``enqueue_many(list_of_i)`` may be plain or async functions;
# they must return only once the job is durably queued (committed / acknowledged).


async def measure_enqueue(enqueue_one: Callable[[int], Any], n: int) -> tuple[float, dict[str, Any]]:
    """One client, one job per call, sequential. Returns (jobs/s, extra)."""
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        a = time.perf_counter()
        await _call(enqueue_one, i)
        lat.append((time.perf_counter() - a) * 1000.0)
    elapsed = time.perf_counter() - t0
    return n / elapsed, {"elapsed_s": elapsed, "call_ms": percentiles(lat)}


async def measure_enqueue_bulk(
    enqueue_many: Callable[[list[int]], Any], n: int, batch: int
) -> tuple[float, dict[str, Any]]:
    """One client, ``batch`` jobs per call. Returns (jobs/s, extra)."""
    lat = []
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        ids = list(range(start, min(n, start + batch)))
        a = time.perf_counter()
        await _call(enqueue_many, ids)
        lat.append((time.perf_counter() - a) * 1000.0)
    elapsed = time.perf_counter() - t0
    return n / elapsed, {"elapsed_s": elapsed, "batch_ms": percentiles(lat), "batches": len(lat)}


async def preload(
    enqueue_one: Callable[[int], Any] | None,
    enqueue_many: Callable[[list[int]], Any] | None,
    n: int,
    batch: int = BULK_BATCH,
) -> float:
    """Enqueue jobs 0..n-1 before a drain (untimed for the result). Returns seconds taken."""
    t0 = time.perf_counter()
    if enqueue_many is not None:
        for start in range(0, n, batch):
            await _call(enqueue_many, list(range(start, min(n, start + batch))))
    elif enqueue_one is not None:
        for i in range(n):
            await _call(enqueue_one, i)
    else:
        raise ValueError("need enqueue_one or enqueue_many")
    return time.perf_counter() - t0


async def measure_drain(
    reader: RecordReader, n: int, worker: Worker | None, deadline_s: float = DEADLINE_S
) -> tuple[float, dict[str, Any]]:
    """Wait until the worker has run jobs 0..n-1. Returns (jobs/s, extra).

    jobs/s = n / (last body end - first body start), from the job bodies' clocks.
    ``observed_s`` adds the runner's view: worker spawn to all n recorded. Past
    ``deadline_s`` the rate covers the jobs done so far and ``extra.incomplete`` is true.
    """
    spawned = time.time()
    incomplete = False
    try:
        await wait_until(
            lambda: reader.poll() >= n, time.monotonic() + deadline_s, f"{n} jobs to drain", worker, 0.02
        )
    except BenchError:
        # Too slow to finish in time: report the rate over the jobs that did run,
        # flagged, rather than nothing. A worker that ran nothing is a failure.
        reader.poll()
        if len(reader.records) < 2 or (worker is not None and not worker.alive()):
            raise
        incomplete = True
    observed = time.time()
    done = len(reader.records)
    starts = [ts for ts, _ in reader.records.values()]
    ends = [te for _, te in reader.records.values()]
    first, last = min(starts), max(ends)
    elapsed = last - first
    return done / elapsed, {
        "elapsed_s": elapsed,
        "spawn_to_first_start_s": first - spawned,
        "observed_s": observed - spawned,
        "duplicates": reader.duplicates,
        "completed": done,
        "incomplete": incomplete,
    }


async def warm_up(
    enqueue_one: Callable[[int], Any],
    reader: RecordReader,
    worker: Worker | None,
    deadline_s: float = 60.0,
    count: int = 3,
) -> float:
    """Send ``count`` probe jobs one after another and wait for each; returns seconds until ready."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + deadline_s
    for _ in range(count):
        target = reader.probes + 1
        await _call(enqueue_one, PROBE)

        def done(target: int = target) -> bool:
            reader.poll()
            return reader.probes >= target

        await wait_until(done, deadline, "the worker to run a warm-up job", worker, 0.005)
    return time.perf_counter() - t0


async def measure_pickup(
    enqueue_one: Callable[[int], Any],
    reader: RecordReader,
    worker: Worker | None,
    rate: float = PICKUP_RATE,
    n: int = DEFAULT_N["pickup"],
    idle_s: float = PICKUP_IDLE_S,
    deadline_s: float = DEADLINE_S,
) -> tuple[float, dict[str, Any]]:
    """Open-loop arrivals at ``rate`` into a warmed-up idle worker. Returns (p50 ms, extra).

    Call ``warm_up`` first. Latency = body start - time.time() just before the enqueue call.
    """
    await asyncio.sleep(idle_s)
    sent: dict[int, float] = {}
    interval = 1.0 / rate
    begin = time.perf_counter()
    behind = 0
    for i in range(n):
        target = begin + i * interval
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -interval:
            behind += 1
        # poll the records now and then so the tail wait is short; cheap
        if i % 50 == 0:
            reader.poll()
            if worker is not None:
                worker.check()
        sent[i] = time.time()
        await _call(enqueue_one, i)
    send_elapsed = time.perf_counter() - begin
    await wait_until(
        lambda: reader.poll() >= n, time.monotonic() + deadline_s, f"{n} pickup jobs", worker, 0.01
    )
    lat = [(reader.records[i][0] - sent[i]) * 1000.0 for i in range(n)]
    stats = percentiles(lat)
    return stats["p50"], {
        **{f"{k}_ms" if k != "n" else k: v for k, v in stats.items()},
        "first_ms": lat[0],
        "mean_ms": sum(lat) / len(lat),
        "achieved_rate": n / send_elapsed if send_elapsed > 0 else None,
        "sends_behind_schedule": behind,
        "duplicates": reader.duplicates,
    }


# --------------------------------------------------------------------------------------
# Runner plumbing
# --------------------------------------------------------------------------------------


def runner_parser(system: str, description: str | None = None) -> argparse.ArgumentParser:
    """The command line every runner accepts (runners may add their own options)."""
    p = argparse.ArgumentParser(
        prog=f"{system}_bench", description=description or f"{system} queue benchmark"
    )
    p.add_argument(
        "--workload", choices=WORKLOADS, help="which workload to run (default: all)", action="append"
    )
    p.add_argument("--out", default=None, help="append result lines (JSON) to this file")
    p.add_argument(
        "--dsn", default=DEFAULT_PG_DSN, help="PostgreSQL server (a fresh database is created on it)"
    )
    p.add_argument(
        "--redis", default=DEFAULT_REDIS_URL, help="Redis server (a dedicated db number is flushed)"
    )
    p.add_argument("--jobs", type=int, default=None, help="override the workload's job count")
    p.add_argument("--rate", type=float, default=PICKUP_RATE, help="pickup arrival rate, jobs/s")
    p.add_argument("--batch", type=int, default=BULK_BATCH, help="jobs per bulk enqueue call")
    p.add_argument("--repeat", type=int, default=1, help="run each workload this many times")
    p.add_argument("--keep-db", action="store_true", help="keep the fresh database after the run")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one worker setting (VALUE parsed as JSON when it can be), e.g. --set batch_size=50",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: be the worker
    p.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)  # internal: JSON
    return p


def parse_sets(items: Iterable[str], allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """Turn ``["k=v", ...]`` into a dict, values parsed as JSON where possible."""
    out: dict[str, Any] = {}
    known = set(allowed) if allowed is not None else None
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        if known is not None and key not in known:
            raise SystemExit(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def jobs_for(args: argparse.Namespace, workload: str) -> int:
    return args.jobs if args.jobs else DEFAULT_N[workload]


def db_name(system: str, workload: str) -> str:
    return f"bench_{system}_{workload}_{os.getpid()}"[:63]


@contextlib.contextmanager
def record_dir(system: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=f"bench-{system}-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def this_python() -> str:
    return sys.executable


def redis_url_with_db(url: str, db: int) -> str:
    """``url`` as given when it names a db number, else with ``/db`` appended."""
    parts = urllib.parse.urlsplit(url)
    if parts.path.strip("/"):
        return url
    return urllib.parse.urlunsplit(parts._replace(path=f"/{db}"))


# --------------------------------------------------------------------------------------
# The part every runner shares: one workload against a client, and the workload x repeat loop
# --------------------------------------------------------------------------------------


async def run_workload(
    workload: str,
    args: argparse.Namespace,
    rdir: Path,
    params: dict[str, Any],
    *,
    enqueue_one: Callable[[int], Any],
    enqueue_many: Callable[[Sequence[int]], Any] | None,
    spawn: Callable[[], Worker],
    worker_params: dict[str, Any],
    bulk_client: str | None = None,
) -> tuple[float | None, dict[str, Any], dict[str, Any]]:
    """Run one of WORKLOADS the same way for every system; returns (value, extra, params).

    ``enqueue_many`` None means the system has no bulk API: drain then preloads one job at a time.
    ``spawn`` starts the system's worker process (a context manager).
    """
    n = jobs_for(args, workload)
    params = {"jobs": n, **params}
    if workload == "enqueue":
        value, extra = await measure_enqueue(enqueue_one, n)
        return value, extra, params
    if workload == "enqueue_bulk":
        if enqueue_many is None:
            raise BenchError("no bulk enqueue API")
        params["batch"] = args.batch
        if bulk_client:
            params["client"] = bulk_client
        value, extra = await measure_enqueue_bulk(enqueue_many, n, args.batch)
        return value, extra, params
    params.update(worker_params)
    params["worker_processes"] = 1
    reader = RecordReader(rdir)
    if workload == "drain":
        if enqueue_many is None:
            pre = await preload(enqueue_one, None, n)
        else:
            pre = await preload(None, enqueue_many, n)
        with spawn() as w:
            value, extra = await measure_drain(reader, n, w)
        extra["preload_s"] = pre
        if enqueue_many is None:
            extra["preload"] = "one at a time (no bulk API)"
        return value, extra, params
    if workload == "pickup":
        params["rate"] = args.rate
        with spawn() as w:
            warm = await warm_up(enqueue_one, reader, w)
            value, extra = await measure_pickup(enqueue_one, reader, w, rate=args.rate, n=n)
        extra["warm_up_s"] = warm
        return value, extra, params
    raise ValueError(workload)


def run_all(
    system: str,
    args: argparse.Namespace,
    run_one: Callable[[str, int], tuple[float | None, dict[str, Any], dict[str, Any], dict[str, Any]]],
    *,
    unsupported: Sequence[str] = (),
) -> int:
    """Every requested workload ``args.repeat`` times: ``run_one(workload, repeat)`` returns (value,
    extra, params, run info); each becomes a result line. Returns the exit code (1 if any failed)."""
    rc = 0
    for workload in args.workload or list(WORKLOADS):
        if workload in unsupported:
            print(f"{system}: {workload} is not supported, skipped", file=sys.stderr)
            continue
        for rep in range(args.repeat):
            try:
                value, extra, params, run = run_one(workload, rep)
            except BenchError as exc:
                print(f"{system} {workload}: FAILED: {exc}", file=sys.stderr)
                rc = 1
                continue
            write_result(
                args.out,
                make_result(system, workload, value, UNITS[workload], params=params, extra=extra, run=run),
            )
    return rc
