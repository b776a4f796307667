"""The benchmark's no-op job body as a vramq adapter (``bench.vramq_adapter:BenchAdapter``).

A job's inputs carry one integer ``i``; the body takes ``time.time()`` first thing and appends
``i t_start t_end`` to this worker's record file (``common.Recorder``, directory from
``BENCH_RECORD_DIR``), exactly like the peers' job bodies. Nothing else happens in it, so the
figures measure vramq's queue and dispatch path only.

Worker subprocesses are started with the ``spawn`` method, which gives the child the parent's
``sys.path``; a scheduler started from the repository root (``python -m scheduler``) therefore
imports this module by name.
"""

from __future__ import annotations

import time
from typing import Any

from bench import common
from workers.adapter import Adapter, Context


class BenchAdapter(Adapter):
    def __init__(self) -> None:
        self.rec: common.Recorder | None = None

    def load(self, device: str) -> None:
        self.rec = common.Recorder.from_env()

    def run(self, inputs: dict[str, Any], ctx: Context) -> dict[str, Any]:
        t_start = time.time()
        rec = self.rec if self.rec is not None else common.Recorder.from_env()
        rec.record(int(inputs.get("i", common.PROBE)), t_start)
        return {}
