#!/usr/bin/env bash
# Run every peer runner, vramq's runner and the raw-SQL limit once per workload into one JSON-lines file,
# then print the comparison table.
#   bench/peers/run_all.sh [results.jsonl] [--repeat N]
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bench="$(dirname "$here")"
out="${1:-${TMPDIR:-/tmp}/vramq-peers-$(date -u +%Y%m%dT%H%M%SZ).jsonl}"
shift || true
mkdir -p "$(dirname "$out")"
export BENCH_RUN_ID="${BENCH_RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}"

"$here/setup.sh"

status=0
run() { echo "== $*" >&2; timeout 600 "$@" --out "$out" "${EXTRA_ARGS[@]}" >/dev/null || status=1; }
EXTRA_ARGS=("$@")
run "$bench/.venv-peers/bin/python" "$here/pgqueuer_bench.py"
run "$bench/.venv-peers/bin/python" "$here/procrastinate_bench.py"
run "$bench/.venv-peers/bin/python" "$here/arq_bench.py"
run "$bench/.venv-celery/bin/python" "$here/celery_bench.py"
# vramq itself, when the project's environment exists (make install)
root="$(dirname "$bench")"
if [[ -x "$root/.venv/bin/python" ]]; then
    PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" run "$root/.venv/bin/python" -m bench.vramq_bench
fi
EXTRA_ARGS=()
run python3 "$bench/raw_sql/run.py"

python3 "$here/report.py" "$out"
echo "results: $out" >&2
exit $status
