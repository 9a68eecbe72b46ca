"""The run log: one row per logged step, written as Parquet parts under ``<run>/log/``.

The run folder is a local path or an ``s3://`` prefix. Rows are buffered and written as one object per
flush (atomically: a reader sees whole parts only), so a cluster run's log outlives its pods.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.errors import DataError
from data_pipeline.storage import Store, open_store

log = logging.getLogger("trainer")

LOG_FOLDER = "log"
FLUSH_SECONDS = 60.0  # a buffered row reaches storage within about this long (at the next append)


class RunLog:
    def __init__(self, run_url: str | os.PathLike[str], *, flush_seconds: float = FLUSH_SECONDS):
        self.store = open_store(str(run_url))
        self.rows: list[dict[str, float | int]] = []
        self.flush_seconds = flush_seconds
        self._flushed_at = -math.inf  # the first row is written at once: a run shows it is alive
        self.failures = 0  # flushes that could not write (their rows stay buffered)

    def append(self, row: dict[str, float | int]) -> None:
        """Buffer a row; write the buffer when it is older than ``flush_seconds``."""
        self.rows.append(row)
        if time.monotonic() - self._flushed_at >= self.flush_seconds:
            self.flush()

    def flush(self) -> str | None:
        """Write the buffered rows as one part; returns its URL, None when there was nothing to write or the
        store refused (then the rows stay buffered for the next flush: a log write never stops a run)."""
        self._flushed_at = time.monotonic()
        if not self.rows:
            return None
        first, last = self.rows[0]["step"], self.rows[-1]["step"]
        # unique: two flushes of one step (its training row, then its evaluation row) must not overwrite
        name = f"{LOG_FOLDER}/part-{first:09d}-{last:09d}-{time.time_ns():019d}.parquet"
        buffer = io.BytesIO()
        pq.write_table(_table(self.rows), buffer)
        try:
            self.store.write_bytes(name, buffer.getvalue())
        except DataError as err:  # storage down for longer than its retries: keep the rows, try again later
            self.failures += 1
            log.warning(
                "run log: cannot write %s (%s); %d rows kept for the next flush", name, err, len(self.rows)
            )
            return None
        self.rows = []
        return self.store.url_of(name)


def read_run_log(run_url: str | Store) -> pa.Table:
    """Every logged row of a run, in step order; a resumed run's repeated steps keep their last value."""
    store = run_url if isinstance(run_url, Store) else open_store(str(run_url))
    parts = sorted(
        (name for name in store.list(f"{LOG_FOLDER}/part-") if name.endswith(".parquet")), key=_written_at
    )
    if not parts:
        raise DataError(f"no run log under {store.url_of(LOG_FOLDER)}")
    rows: dict[int, dict] = {}
    for part in parts:
        table = pq.ParquetFile(io.BytesIO(store.read_bytes(part))).read(
            use_threads=False
        )  # apache/arrow#34314
        for row in table.to_pylist():  # rows of one step (training, evaluation) merge; later values win
            rows.setdefault(row["step"], {}).update({k: v for k, v in row.items() if v is not None})
    return _table([rows[s] for s in sorted(rows)])


def _written_at(name: str) -> tuple[int, str]:
    """Parts in the order they were written (the time suffix; parts named without one came first)."""
    fields = name.rsplit("/", 1)[-1].removesuffix(".parquet").split("-")
    return (int(fields[3]) if len(fields) > 3 and fields[3].isdigit() else 0, name)


def _table(rows: list[dict]) -> pa.Table:
    """Rows with different keys (evaluation rows add columns) as one table, missing values null."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows])
