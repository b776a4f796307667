"""The whole benchmark: vramq, its peers and the raw-SQL limit, in one run, then the report.

    make bench                                   # = .venv/bin/python -m bench.run
    .venv/bin/python -m bench.run --quick        # 1 repeat, smaller counts (a few minutes)
    .venv/bin/python -m bench.run --report-only bench/results/<run id>.jsonl

Steps: create the peers' virtual environments (``bench/peers/setup.sh``); wait (bounded) for a quiet
machine; then, ``--repeat`` times, every system through every common workload (one runner call per
system and workload, all with the same ``BENCH_RUN_ID``), vramq's ``max_workers`` sweep and its HTTP
figures; then once vramq's failover and deep-table claim figures. Every call has a timeout. Raw
result lines go to ``bench/results/<run id>.jsonl`` (runner logs to ``bench/results/tmp/``); the report
(one table per workload, medians over repeats, vramq's ratio to the best peer and to the raw-SQL
limit) is printed, written between the markers of ``docs/benchmarks.md``, and the latency
distributions are drawn to ``bench/results/<run id>-latency.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import common

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:results:begin -->", "<!-- bench:results:end -->"
TIMES, DASH = "\u00d7", "\u2013"  # the report's multiplication sign and en dash

PEERS = (
    ("pgqueuer", ".venv-peers", "pgqueuer_bench.py"),
    ("procrastinate", ".venv-peers", "procrastinate_bench.py"),
    ("arq", ".venv-peers", "arq_bench.py"),
    ("celery", ".venv-celery", "celery_bench.py"),
)
PEER_NAMES = tuple(p[0] for p in PEERS)
QUICK_N = {"enqueue": 2_000, "enqueue_bulk": 5_000, "drain": 5_000, "pickup": 300}
HTTP_N = 2_000  # POSTs for http_enqueue and api_submit (the API is the slow part of vramq's path)
QUICK_HTTP_N = 500
SWEEP = (2, 8)  # max_workers besides the default 4
STEP_TIMEOUT_S = 600
# The raw-SQL figure that bounds each workload (pgbench script, clients), as in bench/peers/report.py.
RAW_LIMIT = {
    "enqueue": [("insert", 1)],
    "enqueue_bulk": [("insert", 8)],
    "drain": [("lifecycle", 8), ("lifecycle_batch", 8), ("lifecycle", 1), ("lifecycle_batch", 1)],
}
THROUGHPUT = ("enqueue", "enqueue_bulk", "drain")
TITLES = {
    "enqueue": "Enqueue one job at a time, one client (jobs/s, higher is better)",
    "enqueue_bulk": "Enqueue in bulk, calls of 1,000 (jobs/s, higher is better)",
    "drain": "Drain 20,000 pre-enqueued no-op jobs (jobs/s, higher is better)",
    "pickup": "Pickup latency at 100 jobs/s into an idle worker (ms, lower is better)",
}


# ----------------------------------------------------------------------------- machine


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def machine_info(dsn: str) -> dict[str, Any]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in _read("/proc/cpuinfo").splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or "?",
    )
    mem_kb = next(
        (int(ln.split()[1]) for ln in _read("/proc/meminfo").splitlines() if ln.startswith("MemTotal:")), 0
    )
    pg = common.pg_server_info(dsn)
    extra_settings = ("max_wal_size", "checkpoint_timeout", "work_mem", "autovacuum", "huge_pages")
    try:
        rows = common.pg_execute(
            dsn,
            [
                "SELECT name, current_setting(name) FROM pg_settings WHERE name IN ("
                + ", ".join(f"'{n}'" for n in extra_settings)
                + ")"
            ],
            fetch=True,
        )
        pg.update({str(k): str(v) for k, v in rows})
    except Exception as exc:
        pg["error_extra"] = str(exc)
    redis = "?"
    cli = shutil.which("redis-cli")
    if cli:
        with _suppress():
            out = subprocess.run(
                [cli, "-u", common.DEFAULT_REDIS_URL, "info", "server"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            redis = next(
                (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("redis_version")),
                "?",
            )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": pg,
        "redis": redis,
    }


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average every few seconds while the benchmark runs."""

    def __init__(self, every_s: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.every_s = every_s
        self.samples: list[float] = []
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every_s)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        s = self.samples or [os.getloadavg()[0]]
        return {"min": min(s), "median": statistics.median(s), "max": max(s), "samples": len(s)}


def wait_for_quiet(threshold: float, max_wait_s: float) -> float:
    """Poll the 1-minute load average until it is below ``threshold`` (bounded). Returns it."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = os.getloadavg()[0]
        if load < threshold or time.monotonic() >= deadline:
            return load
        print(f"load average {load:.2f} >= {threshold}; waiting for a quieter moment ...", flush=True)
        time.sleep(min(20.0, max(1.0, deadline - time.monotonic())))


# ----------------------------------------------------------------------------- steps


class Runner:
    def __init__(self, args: argparse.Namespace, run_id: str, out: Path, log: Path) -> None:
        self.args = args
        self.run_id = run_id
        self.out = out
        self.log = log
        self.failures: list[str] = []
        self.steps: list[dict[str, Any]] = []

    def step(self, label: str, argv: Sequence[str], timeout_s: float = STEP_TIMEOUT_S) -> None:
        env = dict(os.environ, BENCH_RUN_ID=self.run_id, BENCH_PG_DSN=self.args.dsn, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [*argv, "--out", str(self.out)]
        print(f"== {label}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        t0 = time.monotonic()
        with open(self.log, "a", encoding="utf-8") as fh:
            fh.write(f"\n== {label}\n")
            fh.flush()
            try:
                rc = subprocess.run(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    timeout=timeout_s,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = -1
        took = time.monotonic() - t0
        self.steps.append({"step": label, "rc": rc, "seconds": round(took, 1)})
        if rc != 0:
            self.failures.append(f"{label} (rc={rc}, see {self.log.name})")
            print(f"   FAILED rc={rc} after {took:.0f}s", flush=True)
        else:
            print(f"   ok in {took:.0f}s", flush=True)

    def jobs(self, workload: str) -> list[str]:
        return ["--jobs", str(QUICK_N[workload])] if self.args.quick else []

    def peers(self) -> None:
        for name, venv, script in PEERS:
            if self.args.systems and name not in self.args.systems:
                continue
            py = str(BENCH / venv / "bin" / "python")
            for wl in common.WORKLOADS:
                self.step(
                    f"{name} {wl}", [py, str(BENCH / "peers" / script), "--workload", wl, *self.jobs(wl)]
                )

    def raw_sql(self) -> None:
        if self.args.systems and "raw_sql" not in self.args.systems:
            return
        dur = ["--duration", "3"] if self.args.quick else []
        self.step("raw_sql", [sys.executable, str(BENCH / "raw_sql" / "run.py"), *dur])

    def vramq(self) -> None:
        if self.args.systems and "vramq" not in self.args.systems:
            return
        base = [sys.executable, "-m", "bench.vramq_bench"]
        for wl in common.WORKLOADS:
            self.step(f"vramq {wl}", [*base, "--workload", wl, *self.jobs(wl)])
        for w in SWEEP:
            self.step(
                f"vramq drain max_workers={w}",
                [*base, "--workload", "drain", "--set", f"max_workers={w}", *self.jobs("drain")],
            )
        n = str(QUICK_HTTP_N if self.args.quick else HTTP_N)
        self.step("vramq-http enqueue", [*base, "--workload", "http_enqueue", "--jobs", n])
        self.step(
            "vramq-http api_submit", [*base, "--workload", "api_submit", "--jobs", n, "--clients", "16"]
        )
        self.step(
            "vramq sse_push",
            [*base, "--workload", "sse_push", "--sse-jobs", "15" if self.args.quick else "60"],
        )

    def vramq_once(self) -> None:
        if self.args.systems and "vramq" not in self.args.systems:
            return
        base = [sys.executable, "-m", "bench.vramq_bench"]
        kills = "5" if self.args.quick else "20"
        self.step("vramq failover", [*base, "--workload", "failover", "--kills", kills])
        claim = ["--claim-finished", "200000", "--claim-seconds", "2"] if self.args.quick else []
        self.step("vramq claim", [*base, "--workload", "claim", *claim])


# ----------------------------------------------------------------------------- report


def _med(vals: Sequence[float]) -> float | None:
    vals = [v for v in vals if v is not None]
    return float(statistics.median(vals)) if vals else None


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return DASH
    s = f"{x:,.0f}" if abs(x) >= 100 else (f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}")
    return s + unit


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return DASH
    return f"{a / b:.2f}{TIMES}"


def _order(systems: set[str]) -> list[str]:
    def key(s: str) -> tuple[int, str]:
        if s.startswith("vramq"):
            return (0, s)
        if s in PEER_NAMES:
            return (1, f"{PEER_NAMES.index(s)}")
        return (2, s)

    return sorted(systems, key=key)


def tables(results: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The markdown report and a summary of vramq's ratios (for the goals table)."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    raw: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in results:
        if r["system"] == "raw_sql":
            raw[(r["workload"], int(r["params"].get("clients", 0)))].append(r["value"])
        else:
            by[(r["system"], r["workload"])].append(r)
    out: list[str] = []
    summary: dict[str, Any] = {}
    for wl in THROUGHPUT:
        systems = _order({s for (s, w) in by if w == wl})
        if not systems:
            continue
        med = {s: _med([r["value"] for r in by[(s, wl)]]) for s in systems}
        peers = {s: v for s, v in med.items() if s in PEER_NAMES and v is not None}
        best_peer = max(peers, key=lambda s: peers[s]) if peers else None
        limit_rows = [
            (
                f"raw SQL {sc}, {c} client{'s' if c > 1 else ''}",
                _med(raw.get((sc, c), [])),
                len(raw.get((sc, c), [])),
            )
            for sc, c in RAW_LIMIT.get(wl, [])
        ]
        limits = [(n, lv) for n, lv, _ in limit_rows if lv is not None]
        v = med.get("vramq")
        out.append(f"### {TITLES[wl]}\n")
        out.append(f"| system | jobs/s | runs | spread (min{DASH}max) | vramq ÷ this |")
        out.append("|---|---:|---:|---|---:|")
        for s in systems:
            vals = [r["value"] for r in by[(s, wl)] if r["value"] is not None]
            flag = "*" if any(r["extra"].get("incomplete") for r in by[(s, wl)]) else ""
            params = by[(s, wl)][0]["params"]
            note = ""
            if s.startswith("vramq-http"):
                note = " (HTTP, 2 uvicorn workers)"
            elif s in PEER_NAMES and params.get("version"):
                note = f" {params['version']}"
            spread = f"{_fmt(min(vals))}{DASH}{_fmt(max(vals))}" if vals else DASH
            out.append(
                f"| {s}{note} | {_fmt(med[s])}{flag} | {len(vals)} | {spread} | "
                f"{'' if s == 'vramq' else _ratio(v, med[s])} |"
            )
        for name, lv, runs in limit_rows:
            if lv is not None:
                out.append(f"| {name} | {_fmt(lv)} | {runs} | | {_ratio(v, lv)} |")
        out.append("")
        if best_peer is not None:
            out.append(
                f"vramq ÷ best peer ({best_peer}): **{_ratio(v, peers[best_peer])}**"
                + (
                    f"; vramq ÷ raw-SQL limit ({limits[0][0]}): **{_ratio(v, limits[0][1])}**"
                    if limits
                    else ""
                )
            )
            out.append("")
        summary[wl] = {
            "vramq": v,
            "best_peer": best_peer,
            "best_peer_value": peers.get(best_peer) if best_peer else None,
            "limit": limits[0] if limits else None,
        }
    # pickup
    systems = _order({s for (s, w) in by if w == "pickup"})
    if systems:
        out.append(f"### {TITLES['pickup']}\n")
        out.append("| system | p50 | p90 | p99 | max | first job | runs | vramq p99 ÷ this p99 |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        prof: dict[str, dict[str, float | None]] = {}
        for s in systems:
            rs = by[(s, "pickup")]
            prof[s] = {
                k: _med([r["extra"].get(k) for r in rs])
                for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "first_ms")
            }
        v99 = prof.get("vramq", {}).get("p99_ms")
        for s in systems:
            p = prof[s]
            out.append(
                "| "
                + " | ".join(
                    [
                        s,
                        *(_fmt(p[k]) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "first_ms")),
                        str(len(by[(s, "pickup")])),
                        "" if s == "vramq" else _ratio(v99, p["p99_ms"]),
                    ]
                )
                + " |"
            )
        peers99 = {s: prof[s]["p99_ms"] for s in systems if s in PEER_NAMES and prof[s]["p99_ms"] is not None}
        if peers99:
            best = min(peers99, key=lambda s: peers99[s])  # type: ignore[arg-type,return-value]
            out.append("")
            out.append(
                f"vramq p99 ÷ best peer p99 ({best}): **{_ratio(v99, peers99[best])}** (below 1 is better)"
            )
            summary["pickup"] = {"vramq": v99, "best_peer": best, "best_peer_value": peers99[best]}
        out.append("")
    # vramq-only
    only = [
        (
            "vramq-http",
            "api_submit",
            "POST /api/v1/jobs, 16 concurrent clients, 2 uvicorn workers",
            "requests/s",
        ),
        ("vramq", "sse_push", "SSE push: status change written -> event read by the client", "ms"),
        ("vramq", "failover", "Leader failover: SIGKILL of the leader -> next job's body starts", "ms"),
        ("vramq", "claim_n1", "db.queue.claim n=1, 100,000 queued + 1,000,000 finished rows", "ms"),
        ("vramq", "claim_n32", "db.queue.claim n=32, same table", "ms"),
    ]
    rows = []
    for s, wl, label, unit in only:
        rs = by.get((s, wl), [])
        if not rs:
            continue
        e = {k: _med([r["extra"].get(k) for r in rs]) for k in ("p50_ms", "p99_ms", "max_ms", "n")}
        main = _fmt(_med([r["value"] for r in rs])) + f" {unit}"
        if unit == "ms":
            main = f"p50 {_fmt(e['p50_ms'])} ms"
        rows.append(
            f"| {label} | {main} | {_fmt(e['p50_ms'])} | {_fmt(e['p99_ms'])} | {_fmt(e['max_ms'])} | "
            f"{int(e['n'] or 0)} {TIMES} {len(rs)} |"
        )
    if rows:
        out.append("### vramq only\n")
        out.append(f"| measure | figure | p50 ms | p99 ms | max ms | samples {TIMES} runs |")
        out.append("|---|---:|---:|---:|---:|---:|")
        out.extend(rows)
        out.append("")
        deep = by.get(("vramq", "enqueue_deep_table"), [])
        if deep:
            e = deep[0]["extra"]
            out.append(
                "Enqueue on that deep table (db_bench): "
                f"{_fmt(e.get('enqueue_single'))} rows/s one at a time, "
                f"{_fmt(e.get('enqueue_batch'))} rows/s in batches of 1,000, "
                f"{_fmt(e.get('enqueue_single_x8'))} rows/s from 8 connections.\n"
            )
    return "\n".join(out), summary


def _goal(goal: str, vramq: float, unit: str, ref: str, ref_value: float, ok: bool) -> str:
    return (
        f"| {goal} | {_fmt(vramq)} {unit} | {ref} {_fmt(ref_value)}{' ms' if unit == 'ms' else ''} | "
        f"{'met' if ok else 'NOT met'} ({_ratio(vramq, ref_value)}) |"
    )


def goals(summary: dict[str, Any]) -> str:
    lines = ["| goal | vramq | reference | verdict |", "|---|---:|---:|---|"]

    def ahead(wl: str, goal: str, unit: str, better: Callable[[float, float], bool]) -> None:
        r = summary.get(wl)
        if r and r["vramq"] is not None and r["best_peer_value"]:
            v, best = r["vramq"], r["best_peer_value"]
            lines.append(_goal(goal, v, unit, r["best_peer"], best, better(v, best)))

    def within_limit(wl: str) -> None:
        r = summary.get(wl)
        if r and r["vramq"] is not None and r["limit"]:
            name, lv = r["limit"]
            goal = f"{wl} within 2{TIMES} of the raw-SQL limit"
            lines.append(_goal(goal, r["vramq"], "jobs/s", name, lv, r["vramq"] * 2 >= lv))

    ahead("drain", "drain ahead of every peer", "jobs/s", lambda v, best: v > best)
    within_limit("drain")
    ahead("pickup", "p99 pickup below every peer", "ms", lambda v, best: v < best)
    within_limit("enqueue")
    within_limit("enqueue_bulk")
    return "\n".join(lines)


def render_report(results: list[dict[str, Any]], meta: dict[str, Any], png: Path | None) -> str:
    body, summary = tables(results)
    m = meta.get("machine", {})
    pg = m.get("postgres", {})
    load = meta.get("load", {})
    versions = {}
    for r in results:
        if r["system"] in PEER_NAMES and r["params"].get("version"):
            versions[r["system"]] = r["params"]["version"]
    pg_settings = ", ".join(f"{k}={v}" for k, v in sorted(pg.items()) if k != "server_version")
    lines = [
        f"Run `{meta.get('run_id')}` ({meta.get('started', '?')} {DASH} {meta.get('finished', '?')} UTC, "
        f"{meta.get('repeat')} repeat(s){', quick' if meta.get('quick') else ''}).",
        "",
        f"- Command: `{meta.get('command')}`",
        f"- Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('ram_gib', '?')} GiB RAM, "
        f"Linux {m.get('kernel', '?')}, Python {m.get('python', '?')}",
        f"- PostgreSQL {pg.get('server_version', '?')} on the same machine: {pg_settings}",
        f"- Redis {m.get('redis', '?')}; peers: "
        + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
        f"- 1-minute load average: {load.get('before', '?')} at the start; during the run min "
        f"{load.get('min', '?')}, median {load.get('median', '?')}, max {load.get('max', '?')} "
        "(2 cores shared with other work; every result line keeps its own `run.loadavg`)",
        f"- Raw results: `bench/results/{meta.get('run_id')}.jsonl`"
        + (f"; latency plot: `bench/results/{png.name}`" if png else ""),
    ]
    if meta.get("failures"):
        lines.append(f"- Failed steps: {'; '.join(meta['failures'])}")
    lines += ["", "#### Goals", "", goals(summary), "", body]
    return "\n".join(lines)


def write_doc(report: str) -> None:
    block = f"{BEGIN}\n{report}\n{END}"
    if DOC.exists():
        text = DOC.read_text(encoding="utf-8")
        if BEGIN in text and END in text:
            head, _, rest = text.partition(BEGIN)
            _, _, tail = rest.partition(END)
            DOC.write_text(head + block + tail, encoding="utf-8")
            return
        DOC.write_text(text.rstrip() + "\n\n## Latest run\n\n" + block + "\n", encoding="utf-8")
        return
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("# Benchmarks\n\n## Latest run\n\n" + block + "\n", encoding="utf-8")


def report_from(path: Path, meta: dict[str, Any] | None = None, doc: bool = True) -> str:
    results = common.read_results(path)
    meta_path = path.with_suffix(".meta.json")
    if meta is None:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"run_id": path.stem}
    png: Path | None = path.with_name(path.stem + "-latency.png")
    try:
        from bench import plot

        plot.render(results, png, title=f"vramq benchmark run {path.stem}")  # type: ignore[arg-type]
    except Exception as exc:  # matplotlib missing: the tables still matter
        print(f"plot skipped: {exc!r}", file=sys.stderr)
        png = None
    report = render_report(results, meta, png)
    print(report)
    if doc:
        write_doc(report)
    return report


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="1 repeat, smaller counts")
    p.add_argument("--repeat", type=int, default=None, help="repeats of every workload (default 3, quick 1)")
    p.add_argument("--dsn", default=common.DEFAULT_PG_DSN, help="PostgreSQL server for every system")
    p.add_argument("--systems", nargs="*", help="only these: vramq, raw_sql and peer names")
    p.add_argument("--max-load", type=float, default=1.5, help="wait for the 1-min load average below this")
    p.add_argument("--max-wait", type=float, default=300.0, help="... for at most this many seconds")
    p.add_argument("--no-setup", action="store_true", help="skip bench/peers/setup.sh")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument("--report-only", type=Path, help="only render the report of an earlier run's .jsonl")
    args = p.parse_args(argv)
    if args.report_only:
        report_from(args.report_only, doc=not args.no_doc)
        return 0
    repeat = args.repeat or (1 if args.quick else 3)
    run_id = os.environ.get("BENCH_RUN_ID") or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tmp").mkdir(exist_ok=True)
    out = RESULTS / f"{run_id}.jsonl"
    log = RESULTS / "tmp" / f"{run_id}.log"
    meta: dict[str, Any] = {
        "run_id": run_id,
        "quick": args.quick,
        "repeat": repeat,
        "command": "make bench"
        if not argv and len(sys.argv) == 1
        else ".venv/bin/python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
    }
    if not args.no_setup:
        subprocess.run([str(BENCH / "peers" / "setup.sh")], check=True, cwd=ROOT)
    meta["machine"] = machine_info(args.dsn)
    before = wait_for_quiet(args.max_load, args.max_wait)
    sampler = LoadSampler()
    sampler.start()
    runner = Runner(args, run_id, out, log)
    t0 = time.monotonic()
    for rep in range(repeat):
        print(f"==== repeat {rep + 1}/{repeat}", flush=True)
        runner.vramq()
        runner.peers()
        runner.raw_sql()
    runner.vramq_once()
    load = sampler.stop()
    meta["load"] = {"before": round(before, 2), **{k: round(v, 2) for k, v in load.items()}}
    meta["finished"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    meta["wall_s"] = round(time.monotonic() - t0)
    meta["steps"] = runner.steps
    meta["failures"] = runner.failures
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if not out.exists():
        print("no results were written", file=sys.stderr)
        return 1
    report_from(out, meta, doc=not args.no_doc)
    print(f"\nresults: {out}\nlog: {log}\nwall: {meta['wall_s']} s", flush=True)
    return 1 if runner.failures else 0


if __name__ == "__main__":
    sys.exit(main())
