"""Latency distributions of one benchmark run as a PNG (matplotlib, Agg backend).

    .venv/bin/python -m bench.plot bench/results/<run id>.jsonl [out.png]

Result lines carry percentiles, not raw samples, so each distribution is drawn as its percentile
profile (p50, p90, p99, max; medians over repeats) on a log scale: left, pickup latency of every
system; right, vramq's own latencies (SSE push, API submit under concurrency, leader failover,
claim with a deep table).
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import common

POINTS = ("p50_ms", "p90_ms", "p99_ms", "max_ms")
LABELS = ("p50", "p90", "p99", "max")
VRAMQ_ONLY = (
    ("vramq", "sse_push", "SSE push (status change -> event)"),
    ("vramq-http", "api_submit", "POST /api/v1/jobs, concurrent clients"),
    ("vramq", "claim_n1", "claim n=1, 100k queued + 1M finished"),
    ("vramq", "failover", "leader SIGKILL -> next job started"),
)


def _profile(rows: list[dict[str, Any]]) -> list[float] | None:
    out = []
    for key in POINTS:
        vals = [r["extra"].get(key) for r in rows if r["extra"].get(key) is not None]
        if not vals:
            return None
        out.append(max(float(statistics.median(vals)), 1e-3))
    return out


def render(results: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by[(r["system"], r["workload"])].append(r)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    x = list(range(len(POINTS)))
    pickup = sorted(s for (s, w) in by if w == "pickup")
    pickup.sort(key=lambda s: (not s.startswith("vramq"), s))
    for system in pickup:
        prof = _profile(by[(system, "pickup")])
        if prof is None:
            continue
        style = {"linewidth": 2.6} if system == "vramq" else {"linewidth": 1.4, "alpha": 0.85}
        left.plot(x, prof, marker="o", label=system, **style)
    left.set_yscale("log")
    left.set_xticks(x, LABELS)
    left.set_ylabel("ms (log)")
    left.set_title(f"pickup latency at {common.PICKUP_RATE:g} jobs/s into an idle worker")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    for system, workload, label in VRAMQ_ONLY:
        prof = _profile(by.get((system, workload), []))
        if prof is not None:
            right.plot(x, prof, marker="o", label=label)
    right.set_yscale("log")
    right.set_xticks(x, LABELS)
    right.set_ylabel("ms (log)")
    right.set_title("vramq only")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    src = Path(argv[0])
    dst = Path(argv[1]) if len(argv) > 1 else src.with_name(src.stem + "-latency.png")
    print(render(common.read_results(src), dst, title=src.stem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
