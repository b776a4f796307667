"""The promise every reliability scenario ends by checking.

A job the system accepted reaches exactly one terminal state, runs at most once at any moment, and no
fault loses or corrupts anything. Concretely, after the load stops and the system settles:

- every accepted job exists (none lost) and is terminal;
- each job's ``job_events`` form one legal path (``core.types.LEGAL_TRANSITIONS``, each event starting
  where the previous one ended, the last one ending in the row's status);
- no two executions of one job overlap in time (the demo adapter records each execution; a killed one
  ends when the scenario killed it), and a succeeded job's result comes from an execution that ended ok;
- no worker process of the run survives its schedulers, and a live leader's snapshot lists no dead
  worker and books no GPU beyond its total.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from core.types import LEGAL_TRANSITIONS, TERMINAL_STATUSES
from tests.procs import executions, overlapping, wait_for

TERMINAL = {s.value for s in TERMINAL_STATUSES}
RUN_MARK = "VRAMQ_RELIABILITY_RUN"  # in the environment of every process a scenario starts


@dataclass
class Verdict:
    accepted: int = 0
    jobs: int = 0
    lost: list[str] = field(default_factory=list)
    not_terminal: list[str] = field(default_factory=list)
    illegal: list[str] = field(default_factory=list)
    overlaps: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    bad_results: list[str] = field(default_factory=list)
    executions: int = 0
    reruns: int = 0  # executions beyond one per job (legitimate after a fault, if they never overlap)
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        """Executions that broke "at most once at a time", plus results no ok execution produced."""
        return len(self.overlaps) + len(self.bad_results)

    def problems(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"{len(self.lost)} accepted jobs lost: {self.lost[:5]}")
        if self.not_terminal:
            out.append(f"{len(self.not_terminal)} jobs not terminal: {self.not_terminal[:5]}")
        out += self.illegal[:10]
        for a, b in self.overlaps[:5]:
            out.append(f"overlapping executions of job {a['job_id']}: {a} and {b}")
        out += self.bad_results[:5]
        return out

    def assert_ok(self) -> None:
        problems = self.problems()
        assert not problems, "invariants broken:\n  " + "\n  ".join(problems)


async def wait_settled(
    conn: asyncpg.Connection, *, timeout: float, ids: Iterable[uuid.UUID] | None = None
) -> None:
    """Wait until no job (or none of ``ids``) is queued, leased or running."""
    wanted = list(ids) if ids is not None else None

    async def settled() -> bool:
        if wanted is None:
            n = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE status NOT IN ('succeeded', 'failed', 'cancelled')"
            )
        else:
            n = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) "
                "AND status NOT IN ('succeeded', 'failed', 'cancelled')",
                wanted,
            )
        return bool(n == 0)

    await wait_for(settled, timeout=timeout, interval=0.2, what="every job to reach a terminal status")


def _path_problems(job: asyncpg.Record, events: list[asyncpg.Record]) -> list[str]:
    jid = job["id"]
    if not events:
        return [f"job {jid}: no events"]
    out = []
    prev: str | None = None
    for e in events:
        edge = (e["from_status"], e["to_status"])
        if edge not in LEGAL_TRANSITIONS:
            out.append(f"job {jid}: illegal transition {edge} (event {e['id']})")
        if e["from_status"] != prev:
            out.append(
                f"job {jid}: event {e['id']} starts at {e['from_status']!r}, the previous ended at {prev!r}"
            )
        prev = e["to_status"]
    if prev != job["status"]:
        out.append(f"job {jid}: events end at {prev!r} but the row says {job['status']!r}")
    return out


async def check_jobs(
    conn: asyncpg.Connection,
    *,
    accepted: Iterable[uuid.UUID],
    record_dir: Path,
    killed_at: dict[int, float] | None = None,
    require_terminal: bool = True,
) -> Verdict:
    """Check every job in the database (and every id the driver was told was accepted)."""
    acc = set(accepted)
    v = Verdict(accepted=len(acc))
    rows = await conn.fetch("SELECT id, status, result, attempts FROM jobs")
    by_id = {r["id"]: r for r in rows}
    v.jobs = len(rows)
    v.lost = sorted(str(j) for j in acc - by_id.keys())
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
        if require_terminal and r["status"] not in TERMINAL:
            v.not_terminal.append(f"{r['id']} ({r['status']})")
    v.statuses = dict(counts)
    events: dict[uuid.UUID, list[asyncpg.Record]] = defaultdict(list)
    for e in await conn.fetch("SELECT id, job_id, from_status, to_status FROM job_events ORDER BY id"):
        events[e["job_id"]].append(e)
    for r in rows:
        v.illegal += _path_problems(r, events.get(r["id"], []))
    orphans = set(events) - by_id.keys()
    if orphans:
        v.illegal.append(f"events of {len(orphans)} jobs that do not exist: {sorted(map(str, orphans))[:3]}")

    runs = executions(record_dir) if record_dir.exists() else []
    v.executions = len(runs)
    per_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        per_job[run["job_id"]].append(run)
    v.reruns = sum(len(rs) - 1 for rs in per_job.values() if len(rs) > 1)
    v.overlaps = overlapping(runs, killed_at=killed_at or {})
    for r in rows:
        if r["status"] != "succeeded" or not isinstance(r["result"], dict) or "pid" not in r["result"]:
            continue
        ok_pids = {run["pid"] for run in per_job.get(str(r["id"]), []) if run.get("outcome") == "ok"}
        if r["result"]["pid"] not in ok_pids:
            v.bad_results.append(
                f"job {r['id']}: result from pid {r['result']['pid']}, but ok executions were on {ok_pids}"
            )
    return v


def worker_pids(parent: int) -> set[int]:
    """The GPU worker processes under ``parent`` (``multiprocessing`` spawn children; not its
    resource tracker, which lives as long as the parent anyway)."""
    out: set[int] = set()
    try:
        children = psutil.Process(parent).children(recursive=True)
    except psutil.Error:
        return out
    for c in children:
        try:
            if any("spawn_main" in part for part in c.cmdline()):
                out.add(c.pid)
        except psutil.Error:
            continue
    return out


def run_processes(run_id: str) -> list[psutil.Process]:
    """Live (non-zombie) processes started for this run: they carry its mark in their environment."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(RUN_MARK) == run_id and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


async def assert_no_orphans(run_id: str, timeout: float = 15.0) -> None:
    """After every scheduler stopped, no worker (or any other process of the run) may survive."""

    async def gone() -> bool:
        return not run_processes(run_id)

    try:
        await wait_for(gone, timeout=timeout, interval=0.2, what="the run's processes to exit")
    except AssertionError:
        left = []
        for p in run_processes(run_id):
            try:
                left.append(f"{p.pid}: {' '.join(p.cmdline())[:160]}")
            except psutil.Error:
                continue
        raise AssertionError(f"orphan processes survived their schedulers: {left}") from None


def _alive(pid: Any, create_time: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return not isinstance(create_time, int | float) or abs(p.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


def ledger_problems(snapshot: dict[str, Any]) -> list[str]:
    """A live leader's snapshot: every worker it books is alive; no GPU is booked beyond its total."""
    out = []
    workers = [w for w in snapshot.get("workers", []) if isinstance(w, dict)]
    for w in workers:
        if w.get("pid") is not None and not _alive(w.get("pid"), w.get("pid_create_time")):
            out.append(f"worker {w.get('id')} (pid {w.get('pid')}) is gone but still booked")
    for g in snapshot.get("gpus", []):
        total = g.get("total_mb")
        booked = sum(int(w.get("vram_mb") or 0) for w in workers if w.get("gpu") == g.get("id"))
        if isinstance(total, int) and booked > total:
            out.append(f"gpu {g.get('id')}: workers book {booked} MB of {total} MB")
        ledger = g.get("ledger_mb")
        if isinstance(total, int) and isinstance(ledger, int) and ledger > total:
            out.append(f"gpu {g.get('id')}: ledger {ledger} MB exceeds its {total} MB")
    return out


async def live_snapshot(conn: asyncpg.Connection, pool: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT snapshot FROM schedulers WHERE pool = $1 AND ended_at IS NULL "
        "AND heartbeat_at > now() - interval '5 seconds' ORDER BY term DESC LIMIT 1",
        pool,
    )
    if row is None or not isinstance(row["snapshot"], dict):
        return None
    snap: dict[str, Any] = row["snapshot"]
    return snap


async def assert_ledger_clean(conn: asyncpg.Connection, pool: str, timeout: float = 15.0) -> None:
    """Within a few heartbeats, the live leader's snapshot books only live workers."""
    last: list[str] = []

    async def clean() -> bool:
        nonlocal last
        snap = await live_snapshot(conn, pool)
        if snap is None:
            last = [f"no live leader in pool {pool}"]
            return False
        last = ledger_problems(snap)
        return not last

    try:
        await wait_for(clean, timeout=timeout, interval=0.2, what="a clean VRAM ledger")
    except AssertionError:
        raise AssertionError(f"pool {pool}: {last}") from None


async def assert_nothing_leased(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch("SELECT id, status, lease_owner FROM jobs WHERE status IN ('leased', 'running')")
    assert not rows, f"jobs still leased after every scheduler stopped: {[dict(r) for r in rows[:5]]}"


async def observed_gone(pids: Iterable[int], timeout: float = 10.0) -> dict[int, float]:
    """Wait until each pid has exited (or become a zombie); returns when each was seen gone."""
    left = set(pids)
    seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for pid in list(left):
            if not _alive(pid, None):
                seen[pid] = time.time()
                left.discard(pid)
        if left:
            await asyncio.sleep(0.005)
    return seen
