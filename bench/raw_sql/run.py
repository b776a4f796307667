"""The raw-SQL limit: what PostgreSQL itself does with the queue's statements, via pgbench.

    python3 bench/raw_sql/run.py --out results.jsonl            # every script, 10 s each
    python3 bench/raw_sql/run.py --script lifecycle --clients 8 --duration 10

Each (script, clients) pair runs on a fresh database holding only ``schema.sql``.
Scripts (one pgbench transaction each, ``-M prepared``):

``insert``           one INSERT, committed: the enqueue limit.
``lifecycle``        one job per transaction: INSERT; claim 1 with FOR UPDATE SKIP LOCKED;
                     mark it succeeded (three commits per job).
``lifecycle_batch``  INSERT 100; claim up to 100 with SKIP LOCKED; complete them
                     (three commits per 100 jobs).

value = pgbench's tps (without initial connection time) x jobs per script run.
``extra.completed_per_s`` cross-checks the lifecycle rates from the rows actually
marked succeeded. Standard library only; needs ``pgbench`` and ``psql``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402

SYSTEM = "raw_sql"
SCRIPTS = {
    # name: (file, jobs per script run)
    "insert": ("insert.sql", 1),
    "lifecycle": ("lifecycle.sql", 1),
    "lifecycle_batch": ("lifecycle_batch.sql", 100),
}
DEFAULT_PLAN = [
    ("insert", 1),
    ("insert", 8),
    ("lifecycle", 1),
    ("lifecycle", 8),
    ("lifecycle_batch", 1),
    ("lifecycle_batch", 8),
]


def find_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for ver in ("18", "17", "16", "15", "14"):
        cand = Path(f"/usr/lib/postgresql/{ver}/bin/{name}")
        if cand.exists():
            return str(cand)
    raise SystemExit(f"{name} not found on PATH")


def parse_pgbench(out: str) -> dict:
    def grab(pattern: str, cast=float):
        m = re.search(pattern, out, re.MULTILINE)
        return cast(m.group(1)) if m else None

    return {
        "tps": grab(r"^tps = ([0-9.]+) \(without initial connection time\)"),
        "transactions": grab(r"^number of transactions actually processed: (\d+)", int),
        "failed": grab(r"^number of failed transactions: (\d+)", int),
        "latency_avg_ms": grab(r"^latency average = ([0-9.]+) ms"),
        "latency_stddev_ms": grab(r"^latency stddev = ([0-9.]+) ms"),
    }


def run_one(pgbench: str, base_dsn: str, script: str, clients: int, duration: int, keep_db: bool) -> dict:
    fname, per_txn = SCRIPTS[script]
    name = f"bench_raw_{script}_c{clients}_{os.getpid()}"
    threads = max(1, min(clients, os.cpu_count() or 1))
    argv = [
        pgbench,
        "-n",  # no vacuum of pgbench's own tables
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(threads),
        "-T",
        str(duration),
        "-f",
        str(HERE / fname),
    ]
    with common.fresh_db(base_dsn, name, keep=keep_db) as dsn:
        common.pg_execute(dsn, [(HERE / "schema.sql").read_text()])
        proc = subprocess.run([*argv, dsn], capture_output=True, text=True, timeout=duration + 60)
        if proc.returncode != 0:
            raise common.BenchError(f"pgbench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        stats = parse_pgbench(proc.stdout)
        rows = common.pg_execute(
            dsn,
            [
                "SELECT count(*), count(*) FILTER (WHERE status = 'succeeded'),"
                " count(*) FILTER (WHERE status = 'queued') FROM jobs"
            ],
            fetch=True,
        )
        total, done, queued = (int(x) for x in rows[0])
        server = common.pg_server_info(dsn)
    if stats["tps"] is None:
        raise common.BenchError(f"could not parse pgbench output:\n{proc.stdout}")
    value = stats["tps"] * per_txn
    extra = {
        **stats,
        "rows": total,
        "completed": done,
        "left_queued": queued,
        "completed_per_s": done / duration if script != "insert" else None,
    }
    params = {
        "script": script,
        "clients": clients,
        "threads": threads,
        "jobs_per_transaction_script": per_txn,
        "duration_s": duration,
        "protocol": "prepared",
        "pgbench": subprocess.run([pgbench, "--version"], capture_output=True, text=True).stdout.strip(),
    }
    unit = "inserts/s" if script == "insert" else "jobs/s"
    return common.make_result(
        SYSTEM, script, value, unit, params=params, extra=extra, run=common.run_info(0, postgres=server)
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--dsn", default=common.DEFAULT_PG_DSN)
    p.add_argument("--script", choices=sorted(SCRIPTS), action="append", help="default: all")
    p.add_argument("--clients", type=int, action="append", help="default: 1 and 8")
    p.add_argument("--duration", type=int, default=common.RAW_SQL_SECONDS)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--keep-db", action="store_true")
    args = p.parse_args()

    pgbench = find_tool("pgbench")
    if args.script or args.clients:
        plan = [(s, c) for s in (args.script or list(SCRIPTS)) for c in (args.clients or [1, 8])]
    else:
        plan = DEFAULT_PLAN
    rc = 0
    for script, clients in plan:
        for rep in range(args.repeat):
            try:
                res = run_one(pgbench, args.dsn, script, clients, args.duration, args.keep_db)
            except (common.BenchError, subprocess.TimeoutExpired) as exc:
                print(f"raw_sql {script} c{clients}: FAILED: {exc}", file=sys.stderr)
                rc = 1
                continue
            res["run"]["repeat"] = rep
            common.write_result(args.out, res)
    return rc


if __name__ == "__main__":
    sys.exit(main())
