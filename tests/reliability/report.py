"""The reliability table: one row per scenario, printed at the end of the run (and written as JSON).

Each scenario adds its figures with ``REPORT.add(Row(...))``; ``tests/reliability/conftest.py`` prints the
table in the terminal summary and, when ``VRAMQ_CHAOS_REPORT`` names a file, writes the rows there.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

COLUMNS = (
    ("scenario", "scenario"),
    ("faults", "faults injected"),
    ("accepted", "jobs accepted"),
    ("lost", "jobs lost"),
    ("duplicates", "duplicate executions"),
    ("max_recovery_s", "max recovery (s)"),
)


@dataclass
class Row:
    scenario: str
    faults: int = 0
    accepted: int = 0
    lost: int = 0
    duplicates: int = 0
    max_recovery_s: float | None = None
    notes: str = ""
    extra: dict[str, float | int | str] = field(default_factory=dict)

    def recovery(self, seconds: float) -> None:
        """Keep the worst recovery time seen."""
        if self.max_recovery_s is None or seconds > self.max_recovery_s:
            self.max_recovery_s = seconds


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def ordered(self) -> list[Row]:
        """By scenario number (names start with it), then in the order they ran."""

        def key(r: Row) -> int:
            head = r.scenario.split(".", 1)[0]
            return int(head) if head.isdigit() else 1_000

        return sorted(self.rows, key=key)

    def table(self) -> str:
        header = [title for _, title in COLUMNS]
        lines = [header]
        for r in self.ordered():
            rec = "-" if r.max_recovery_s is None else f"{r.max_recovery_s:.2f}"
            lines.append([r.scenario, str(r.faults), str(r.accepted), str(r.lost), str(r.duplicates), rec])
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

        def fmt(cells: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        out = [fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [fmt(line) for line in lines[1:]]
        notes = [f"- {r.scenario}: {r.notes}" for r in self.ordered() if r.notes]
        return "\n".join(out + (["", *notes] if notes else []))

    def write_json(self, path: Path) -> None:
        payload = {"chaos": os.environ.get("VRAMQ_CHAOS", ""), "rows": [asdict(r) for r in self.rows]}
        path.write_text(json.dumps(payload, indent=2) + "\n")


REPORT = Report()
