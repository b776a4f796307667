"""Print a markdown comparison table from result lines (medians over repeats).

    python3 bench/peers/report.py results.jsonl [more.jsonl ...]

Works for any system that writes the common result format (bench/common.py),
vramq included; the raw-SQL limit gets its own column.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

ROWS = [
    ("enqueue", "enqueue one at a time, jobs/s"),
    ("enqueue_bulk", "enqueue bulk, jobs/s"),
    ("drain", "drain pre-enqueued no-op jobs, jobs/s"),
    ("pickup", "pickup latency at a fixed rate, p50 / p99 / max ms"),
]
# which raw-SQL (script, clients) stands next to which workload
RAW_FOR = {
    "enqueue": [("insert", 1)],
    "enqueue_bulk": [("insert", 8)],
    "drain": [("lifecycle", 1), ("lifecycle", 8), ("lifecycle_batch", 1), ("lifecycle_batch", 8)],
}
PREFERRED = ["vramq", "vramq-http", "pgqueuer", "procrastinate", "arq", "celery"]


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def table(results: list[dict]) -> str:
    by: dict[tuple, list[dict]] = defaultdict(list)
    systems: set[str] = set()
    for r in results:
        if r["system"] == "raw_sql":
            by[("raw_sql", r["workload"], r["params"].get("clients"))].append(r)
        else:
            systems.add(r["system"])
            by[(r["system"], r["workload"])].append(r)
    cols = [s for s in PREFERRED if s in systems] + sorted(systems - set(PREFERRED))
    lines = ["| workload | " + " | ".join(cols) + " | raw SQL (pgbench) |", "|---" * (len(cols) + 2) + "|"]
    for wl, label in ROWS:
        cells = []
        for s in cols:
            rs = by.get((s, wl), [])
            vals = [r["value"] for r in rs if r["value"] is not None]
            if not vals:
                cells.append("none" if wl == "enqueue_bulk" else "-")
            elif wl == "pickup":
                p99 = statistics.median(r["extra"]["p99_ms"] for r in rs)
                mx = statistics.median(r["extra"]["max_ms"] for r in rs)
                cells.append(f"{_fmt(statistics.median(vals))} / {_fmt(p99)} / {_fmt(mx)}")
            else:
                flag = "*" if any(r["extra"].get("incomplete") for r in rs) else ""
                cells.append(_fmt(statistics.median(vals)) + flag)
        raw = []
        for script, clients in RAW_FOR.get(wl, []):
            rs = by.get(("raw_sql", script, clients), [])
            if rs:
                raw.append(f"{_fmt(statistics.median(r['value'] for r in rs))} ({script}, {clients}c)")
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + ("; ".join(raw) or "-") + " |")
    n = max((len(v) for v in by.values()), default=0)
    lines.append("")
    lines.append(
        f"medians of up to {n} run(s) per cell; * = drain hit its deadline, rate over the jobs done by then"
    )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    results: list[dict] = []
    for path in sys.argv[1:]:
        results.extend(common.read_results(path))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
