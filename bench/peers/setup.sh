#!/usr/bin/env bash
# Create the virtual environments the peer benchmarks run in.
#   bench/.venv-peers   pgqueuer, procrastinate, arq (redis<6)
#   bench/.venv-celery  celery[redis] (wants a newer redis than arq allows)
# Idempotent: an environment whose requirements file has not changed since the
# last successful install is left alone.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bench="$(dirname "$here")"
python="${PYTHON:-python3}"

make_venv() {
    local venv="$1" req="$2"
    local stamp="$venv/.requirements.sha256"
    local want
    want="$(sha256sum "$req" | cut -d' ' -f1)"
    if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "ok: $venv is up to date"
        return
    fi
    echo "installing $req into $venv"
    [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
    echo "$want" > "$stamp"
}

make_venv "$bench/.venv-peers" "$here/requirements.txt"
make_venv "$bench/.venv-celery" "$here/requirements-celery.txt"
