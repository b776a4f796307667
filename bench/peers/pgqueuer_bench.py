"""pgqueuer on PostgreSQL: the common workloads (see bench/common.py).

    bench/.venv-peers/bin/python bench/peers/pgqueuer_bench.py --workload drain --out results.jsonl

Worker: one process running ``QueueManager.run(batch_size=100)`` over an asyncpg
connection (LISTEN/NOTIFY wake-ups; claims up to 100 rows per dequeue query and
batches the completion writes), the way ``pgq run`` starts it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

SYSTEM = "pgqueuer"
ENTRYPOINT = "noop"
WORKER_CONFIG = {
    "batch_size": 100,  # pgqueuer's throughput knob; its default is 10
    "dequeue_timeout_s": 30.0,  # library default; idle wake-ups come from NOTIFY
    "max_concurrent_tasks": None,  # unlimited (default)
    "driver": "asyncpg",
}


def _version() -> str:
    import pgqueuer

    return getattr(pgqueuer, "__version__", "?")


# ---------------------------------------------------------------- worker process


async def _worker(dsn: str, cfg: dict) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries, QueueManager

    rec = common.Recorder.from_env()
    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint(ENTRYPOINT)
    async def noop(job) -> None:  # the job body
        t = time.time()
        rec.record(int(job.payload), t)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, qm.shutdown.set)
    await qm.run(
        batch_size=cfg["batch_size"],
        dequeue_timeout=timedelta(seconds=cfg["dequeue_timeout_s"]),
        max_concurrent_tasks=cfg["max_concurrent_tasks"],
    )


# ---------------------------------------------------------------- runner


class Client:
    def __init__(self, dsn: str):
        self.dsn = dsn

    async def __aenter__(self) -> Client:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        self.conn = await asyncpg.connect(self.dsn)
        self.queries = Queries(AsyncpgDriver(self.conn))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.conn.close()

    async def install(self) -> None:
        await self.queries.install()

    async def enqueue_one(self, i: int) -> None:
        await self.queries.enqueue(ENTRYPOINT, str(i).encode(), 0)

    async def enqueue_many(self, ids: list[int]) -> None:
        await self.queries.enqueue([ENTRYPOINT] * len(ids), [str(i).encode() for i in ids], [0] * len(ids))


def _spawn(dsn: str, rdir: Path) -> common.Worker:
    argv = [sys.executable, __file__, "--worker", "--dsn", dsn, "--worker-config", json.dumps(WORKER_CONFIG)]
    return common.Worker(argv, env=common.worker_env(rdir), log_path=rdir / "worker.log")


async def _run(workload: str, dsn: str, args, rdir: Path) -> tuple[float | None, dict, dict]:
    params: dict = {"version": _version(), "client": "asyncpg, one connection"}
    async with Client(dsn) as c:
        await c.install()
        return await common.run_workload(
            workload,
            args,
            rdir,
            params,
            enqueue_one=c.enqueue_one,
            enqueue_many=c.enqueue_many,
            spawn=lambda: _spawn(dsn, rdir),
            worker_params=WORKER_CONFIG,
        )


def main() -> int:
    args = common.runner_parser(SYSTEM, __doc__).parse_args()
    if args.worker_config:
        WORKER_CONFIG.update(json.loads(args.worker_config))
    WORKER_CONFIG.update(common.parse_sets(args.set, WORKER_CONFIG))
    if args.worker:
        asyncio.run(_worker(args.dsn, json.loads(args.worker_config)))
        return 0

    def run_one(workload: str, rep: int) -> tuple[float | None, dict, dict, dict]:
        with (
            common.fresh_db(args.dsn, common.db_name(SYSTEM, workload), keep=args.keep_db) as dsn,
            common.record_dir(SYSTEM) as rdir,
        ):
            value, extra, params = asyncio.run(_run(workload, dsn, args, rdir))
            return value, extra, params, common.run_info(rep, postgres=common.pg_server_info(dsn))

    return common.run_all(SYSTEM, args, run_one)


if __name__ == "__main__":
    sys.exit(main())
