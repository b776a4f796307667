"""vramq through the common workloads (bench/common.py), plus the figures only vramq has.

    .venv/bin/python -m bench.vramq_bench --workload drain --out results.jsonl
    .venv/bin/python -m bench.vramq_bench --workload drain --set max_workers=8
    .venv/bin/python -m bench.vramq_bench --workload http_enqueue --workload api_submit --workload sse_push
    .venv/bin/python -m bench.vramq_bench --workload failover --workload claim

Common workloads (``system: "vramq"``), each on a fresh, migrated database:

``enqueue``       ``db.queue.enqueue`` one job per call on one asyncpg connection (the library call
                  an API replica makes for ``POST /api/v1/jobs``).
``enqueue_bulk``  ``db.queue.enqueue_many`` in calls of ``--batch`` jobs.
``drain``         ``JOBS_DRAIN`` jobs preloaded, then one ``python -m scheduler`` candidate starts
                  (``VRAMQ_GPUS=fake:1x80GiB``, the bench model with ``max_workers`` workers) and
                  becomes leader; jobs/s from the job bodies' own stamps.
``pickup``        the same candidate, warmed up, one job every 10 ms into its idle worker.

vramq-only workloads:

``http_enqueue``  ``system: "vramq-http"``, workload ``enqueue``: one client (httpx, keep-alive) POSTs
                  /api/v1/jobs one at a time to ``uvicorn api.main:app --workers 2``.
``api_submit``    ``system: "vramq-http"``: ``--clients`` concurrent clients POST /api/v1/jobs;
                  requests/s and per-request p50/p99.
``sse_push``      status change written through ``db.queue`` -> the event on
                  ``GET /api/v1/jobs/{id}/events``; p50/p99 over ``--sse-jobs`` x 4 changes.
``failover``      ``bench.scheduler_bench.failover``: SIGKILL the leader of two candidates, time
                  until the next job starts on the new leader's worker.
``claim``         ``bench.db_bench``: ``db.queue.claim`` latency (n=1, n=32) with 100,000 queued
                  and 1,000,000 finished rows.

Job bodies are ``bench.vramq_adapter:BenchAdapter``. Worker settings (``--set``): ``max_workers``
(default 4), ``poll_interval_s`` (the scheduler's slow poll, default the product's 1.0).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench import common

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "vramq"
HTTP_SYSTEM = "vramq-http"
MODEL, FEATURE, POOL = "bench.noop", "bench", "bench"
ADAPTER = "bench.vramq_adapter:BenchAdapter"
DEFAULT_MAX_WORKERS = 4
WORKER_CONFIG: dict[str, Any] = {
    "max_workers": DEFAULT_MAX_WORKERS,
    "poll_interval_s": None,  # None: the product default
    "gpus": "fake:1x80GiB",
}
EXTRA_WORKLOADS = ("http_enqueue", "api_submit", "sse_push", "failover", "claim")
ALL_WORKLOADS = (*common.WORKLOADS, *EXTRA_WORKLOADS)
DEFAULT_WORKLOADS = common.WORKLOADS


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vramq")
    except Exception:
        return "dev"


def system_name(max_workers: int) -> str:
    """``vramq`` at the default worker count; a sweep point is its own column (``vramq[w=8]``)."""
    return SYSTEM if max_workers == DEFAULT_MAX_WORKERS else f"{SYSTEM}[w={max_workers}]"


def write_models_file(directory: Path, max_workers: int) -> Path:
    """A registry holding only the bench model (no input schema beyond an object)."""
    path = directory / f"models-bench-{max_workers}.yaml"
    spec = {
        "id": MODEL,
        "feature": FEATURE,
        "adapter": ADAPTER,
        "vram_mb": 256,
        "max_workers": max_workers,
        "timeout_s": 600,
        "idle_evict_s": 3600,
        "inputs": {"type": "object", "properties": {"i": {"type": "integer"}}},
    }
    path.write_text(yaml.safe_dump({"models": [spec]}), encoding="utf-8")
    return path


def migrate_db(dsn: str) -> None:
    from db import migrate

    migrate.upgrade(dsn)


def scheduler_env(dsn: str, rdir: Path, cfg: dict[str, Any]) -> dict[str, str]:
    env = common.worker_env(rdir)
    env.update(
        VRAMQ_DATABASE_URL=dsn,
        VRAMQ_POOL=POOL,
        VRAMQ_GPUS=str(cfg["gpus"]),
        VRAMQ_MODELS_FILE=str(write_models_file(rdir, int(cfg["max_workers"]))),
        VRAMQ_DATA_DIR=str(rdir / "data"),
        VRAMQ_SHUTDOWN_GRACE_S="2",
        VRAMQ_VRAM_RESERVE_MB="512",
    )
    if cfg.get("poll_interval_s"):
        env["VRAMQ_POLL_INTERVAL_S"] = str(cfg["poll_interval_s"])
    return env


def spawn_scheduler(dsn: str, rdir: Path, cfg: dict[str, Any], name: str = "scheduler") -> common.Worker:
    return common.Worker(
        [sys.executable, "-m", "scheduler"],
        env=scheduler_env(dsn, rdir, cfg),
        log_path=rdir / f"{name}.log",
        cwd=str(ROOT),
    )


class Client:
    """One asyncpg connection making vramq's own enqueue calls."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def __aenter__(self) -> Client:
        from db.connect import connect

        self.conn = await connect(self.dsn)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    @staticmethod
    def job(i: int) -> Any:
        from db import queue as q

        return q.NewJob(feature=FEATURE, model=MODEL, inputs={"i": i})

    async def enqueue_one(self, i: int) -> None:
        from db import queue as q

        await q.enqueue(self.conn, self.job(i))

    async def enqueue_many(self, ids: list[int]) -> None:
        from db import queue as q

        await q.enqueue_many(self.conn, [self.job(i) for i in ids])

    async def wait_succeeded(self, n: int, timeout_s: float = 15.0) -> int:
        """Rows marked succeeded (the writer batches: wait briefly for the last flush)."""
        deadline = time.monotonic() + timeout_s
        done = 0
        while time.monotonic() < deadline:
            done = int(await self.conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'succeeded'"))
            if done >= n:
                break
            await asyncio.sleep(0.1)
        return done


def _record_files(rdir: Path) -> int:
    """Worker processes that ran at least one job (one record file each)."""
    return len(list(rdir.glob("rec-*.txt")))


async def _run_common(
    workload: str, dsn: str, args: argparse.Namespace, rdir: Path, cfg: dict[str, Any]
) -> tuple[float | None, dict[str, Any], dict[str, Any]]:
    n = common.jobs_for(args, workload)
    params: dict[str, Any] = {"jobs": n, "version": _version(), "client": "asyncpg, one connection"}
    async with Client(dsn) as c:
        if workload == "enqueue":
            params["call"] = "db.queue.enqueue"
            value, extra = await common.measure_enqueue(c.enqueue_one, n)
            return value, extra, params
        if workload == "enqueue_bulk":
            params.update(call="db.queue.enqueue_many", batch=args.batch)
            value, extra = await common.measure_enqueue_bulk(c.enqueue_many, n, args.batch)
            return value, extra, params
        params.update(cfg)
        params.update(scheduler_processes=1, worker_processes=cfg["max_workers"], adapter=ADAPTER)
        if workload == "drain":
            pre = await common.preload(None, c.enqueue_many, n)
            reader = common.RecordReader(rdir)
            with spawn_scheduler(dsn, rdir, cfg) as w:
                value, extra = await common.measure_drain(reader, n, w)
                extra["db_succeeded"] = await c.wait_succeeded(n)
                extra["workers_used"] = _record_files(rdir)
            extra["preload_s"] = pre
            return value, extra, params
        if workload == "pickup":
            params["rate"] = args.rate
            reader = common.RecordReader(rdir)
            with spawn_scheduler(dsn, rdir, cfg) as w:
                warm = await common.warm_up(c.enqueue_one, reader, w)
                value, extra = await common.measure_pickup(c.enqueue_one, reader, w, rate=args.rate, n=n)
                extra["workers_used"] = _record_files(rdir)
            extra["warm_up_s"] = warm
            return value, extra, params
    raise ValueError(workload)


def run_common(args: argparse.Namespace, workload: str, rep: int, cfg: dict[str, Any]) -> int:
    name = common.db_name(SYSTEM, workload)
    try:
        with common.fresh_db(args.dsn, name, keep=args.keep_db) as dsn, common.record_dir(SYSTEM) as rdir:
            migrate_db(dsn)
            value, extra, params = asyncio.run(_run_common(workload, dsn, args, rdir, cfg))
            run = common.run_info(rep, postgres=common.pg_server_info(dsn))
    except common.BenchError as exc:
        print(f"{SYSTEM} {workload}: FAILED: {exc}", file=sys.stderr)
        return 1
    system = system_name(int(cfg["max_workers"])) if workload in ("drain", "pickup") else SYSTEM
    common.write_result(
        args.out,
        common.make_result(
            system, workload, value, common.UNITS[workload], params=params, extra=extra, run=run
        ),
    )
    return 0


# ------------------------------------------------------------------ vramq-only workloads


def run_http(args: argparse.Namespace, workload: str, rep: int) -> int:
    from bench import api_bench

    name = common.db_name("vramqhttp", workload)
    try:
        with common.fresh_db(args.dsn, name, keep=args.keep_db) as dsn, common.record_dir(SYSTEM) as rdir:
            migrate_db(dsn)
            models = write_models_file(rdir, DEFAULT_MAX_WORKERS)
            with api_bench.ApiServer(dsn, models, rdir, workers=args.api_workers) as server:
                if workload == "http_enqueue":
                    n = args.jobs or common.JOBS_ENQUEUE
                    value, extra, params = api_bench.run_http_enqueue(server.base_url, n)
                    system, wl, unit = HTTP_SYSTEM, "enqueue", "jobs/s"
                elif workload == "api_submit":
                    n = args.jobs or api_bench.API_REQUESTS
                    value, extra, params = asyncio.run(api_bench.api_submit(server.base_url, n, args.clients))
                    system, wl, unit = HTTP_SYSTEM, "api_submit", "requests/s"
                else:
                    n = args.sse_jobs
                    value, extra, params = asyncio.run(api_bench.sse_push(dsn, server.base_url, n))
                    system, wl, unit = SYSTEM, "sse_push", "ms"
                params["uvicorn_workers"] = args.api_workers
            run = common.run_info(rep, postgres=common.pg_server_info(dsn))
    except (common.BenchError, TimeoutError, OSError) as exc:
        print(f"{SYSTEM} {workload}: FAILED: {exc!r}", file=sys.stderr)
        return 1
    common.write_result(
        args.out, common.make_result(system, wl, value, unit, params=params, extra=extra, run=run)
    )
    return 0


def run_failover(args: argparse.Namespace, rep: int) -> int:
    from bench import scheduler_bench

    with tempfile.TemporaryDirectory(prefix="bench-vramq-failover-") as tmp:
        b = scheduler_bench.Bench(args.dsn, Path(tmp))
        try:
            out = asyncio.run(scheduler_bench.failover(b, args.kills))
        except Exception as exc:
            logs = sorted(Path(tmp).glob("*.log"))
            tail = logs[-1].read_text(errors="replace")[-2000:] if logs else ""
            print(f"{SYSTEM} failover: FAILED: {exc!r}\n{tail}", file=sys.stderr)
            return 1
    extra = {f"{k}_ms" if k not in ("n", "workload") else k: v for k, v in out.items() if k != "workload"}
    params = {
        "kills": args.kills,
        "candidates": 2,
        "measure": "SIGKILL of the leader -> next job's body start on the new leader (worker spawn included)",
        "lease_ttl_s": 10,
        "heartbeat_interval_s": 0.5,
        "code": "bench.scheduler_bench.failover",
    }
    common.write_result(
        args.out,
        common.make_result(
            SYSTEM, "failover", out.get("p50"), "ms", params=params, extra=extra, run=common.run_info(rep)
        ),
    )
    return 0


def run_claim(args: argparse.Namespace, rep: int) -> int:
    from bench import db_bench

    ns = argparse.Namespace(
        dsn=args.dsn,
        queued=args.claim_queued,
        finished=args.claim_finished > 0,
        finished_rows=args.claim_finished,
        seconds=args.claim_seconds,
        batch=common.BULK_BATCH,
        json=None,
    )
    try:
        out = asyncio.run(db_bench.amain(ns))
    except Exception as exc:
        print(f"{SYSTEM} claim: FAILED: {exc!r}", file=sys.stderr)
        return 1
    run = common.run_info(rep)
    params = {
        "queued_rows": out["queued_at_start"],
        "finished_rows": out["finished_rows"],
        "seconds": args.claim_seconds,
        "server_version": out["server_version"],
        "code": "bench.db_bench",
    }
    res = out["results"]
    for key in ("claim_n1", "claim_n32"):
        s = res[key]
        extra = {
            "p50_ms": s["p50_ms"],
            "p90_ms": s["p90_ms"],
            "p99_ms": s["p99_ms"],
            "max_ms": s["max_ms"],
            "mean_ms": s["mean_ms"],
            "n": s["count"],
            "setup": out["setup"],
        }
        common.write_result(
            args.out,
            common.make_result(
                SYSTEM, key, s["p50_ms"], "ms", params=dict(params, n=int(key[7:])), extra=extra, run=run
            ),
        )
    rates = {k: res[k]["rows_per_s"] for k in ("enqueue_single", "enqueue_batch", "enqueue_single_x8")}
    common.write_result(
        args.out,
        common.make_result(
            SYSTEM,
            "enqueue_deep_table",
            rates["enqueue_single"],
            "rows/s",
            params=params,
            extra=rates,
            run=run,
        ),
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = common.runner_parser(SYSTEM, __doc__)
    for action in p._actions:
        if action.dest == "workload":
            action.choices = ALL_WORKLOADS
            action.help = f"which workload to run (repeatable; default: {', '.join(DEFAULT_WORKLOADS)})"
    p.add_argument("--clients", type=int, default=16, help="concurrent clients for api_submit")
    p.add_argument("--api-workers", type=int, default=2, help="uvicorn worker processes")
    p.add_argument("--sse-jobs", type=int, default=60, help="jobs followed for sse_push (4 changes each)")
    p.add_argument("--kills", type=int, default=20, help="leader kills for failover")
    p.add_argument("--claim-queued", type=int, default=100_000)
    p.add_argument("--claim-finished", type=int, default=1_000_000)
    p.add_argument("--claim-seconds", type=float, default=5.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = dict(WORKER_CONFIG)
    cfg.update(common.parse_sets(args.set, WORKER_CONFIG))
    rc = 0
    for workload in args.workload or list(DEFAULT_WORKLOADS):
        for rep in range(args.repeat):
            if workload in common.WORKLOADS:
                rc |= run_common(args, workload, rep, cfg)
            elif workload in ("http_enqueue", "api_submit", "sse_push"):
                rc |= run_http(args, workload, rep)
            elif workload == "failover":
                rc |= run_failover(args, rep)
            elif workload == "claim":
                rc |= run_claim(args, rep)
    return rc


if __name__ == "__main__":
    sys.exit(main())
