"""A benchmark's result: printed, saved as JSON under benchmarks/results/, and written as a markdown
table into docs/performance.md between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "performance.md"


@dataclass
class Table:
    columns: list[str]
    rows: list[list[object]]
    caption: str = ""

    def markdown(self) -> str:
        lines = [f"| {' | '.join(self.columns)} |", f"|{'---|' * len(self.columns)}"]
        lines += [f"| {' | '.join(str(cell) for cell in row)} |" for row in self.rows]
        return "\n".join(([self.caption, ""] if self.caption else []) + lines)

    def text(self) -> str:
        cells = [self.columns, *[[str(cell) for cell in row] for row in self.rows]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
        return "\n".join(([self.caption] if self.caption else []) + lines)


@dataclass
class Result:
    name: str
    command: str
    machine: str  # machine.headline(): CPU, bf16 flags, threads, load
    uptime_before: str
    uptime_after: str = ""
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, object] = field(default_factory=dict)  # raw numbers for the JSON file

    def markdown(self) -> str:
        parts = [
            f"`{self.command}`",
            f"{self.machine}. `uptime` before: `{self.uptime_before}`; after: `{self.uptime_after}`.",
        ]
        parts += [table.markdown() for table in self.tables]
        parts += self.notes
        return "\n\n".join(parts)

    def text(self) -> str:
        return "\n\n".join(
            [
                self.machine,
                f"uptime before: {self.uptime_before}",
                *(table.text() for table in self.tables),
                *self.notes,
                f"uptime after: {self.uptime_after}",
            ]
        )


def save(result: Result, *, results: Path = RESULTS, doc: Path | None = DOC) -> Path:
    """``results/NAME.json``, and the tables into ``doc`` unless it is None."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{result.name}.json"
    path.write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
    if doc is not None:
        write_section(doc, result.name, result.markdown())
    return path


def write_section(doc: Path, name: str, body: str) -> None:
    """Replace the text between this benchmark's markers; append a marked section when there is none."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = doc.read_text() if doc.exists() else "# Performance\n"
    block = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    doc.write_text(text)
