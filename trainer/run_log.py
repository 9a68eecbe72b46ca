"""The run log: one row per logged step, written as Parquet parts under ``<run>/log/``."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class RunLog:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "log"
        self.rows: list[dict[str, float | int]] = []

    def append(self, row: dict[str, float | int]) -> None:
        self.rows.append(row)

    def flush(self) -> Path | None:
        if not self.rows:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        first, last = self.rows[0]["step"], self.rows[-1]["step"]
        path = self.dir / f"part-{first:09d}-{last:09d}.parquet"
        partial = path.with_name(f".{path.name}.partial")
        pq.write_table(pa.Table.from_pylist(self.rows), partial)
        partial.replace(path)
        self.rows = []
        return path


def read_run_log(run_dir: str | Path) -> pa.Table:
    """Every logged row of a run, in step order; a resumed run's repeated steps keep their last value."""
    parts = sorted((Path(run_dir) / "log").glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no run log under {Path(run_dir) / 'log'}")
    rows: dict[int, dict] = {}
    for part in parts:
        for row in pq.ParquetFile(part).read(use_threads=False).to_pylist():  # apache/arrow#34314
            rows[row["step"]] = row
    return pa.Table.from_pylist([rows[s] for s in sorted(rows)])
