"""``sagan report``: a run read without Prometheus — PNG plots of its Parquet log and its latest sample
grid, in one ``index.html``.

The run is a local folder or an ``s3://`` prefix (its ``log/`` parts and ``samples/step_NNNNNNN.png``
grids); the report goes to a local folder or an ``s3://`` prefix too. Plots are drawn by matplotlib's
Agg renderer (no display needed). A plot whose columns the log does not have (FID before any
evaluation) is left out.
"""

from __future__ import annotations

import html
import io
import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data_pipeline.storage import Store, open_store
from trainer.observability.run_log import read_run_log

SAMPLES_PREFIX = "samples/step_"
SMOOTH_ABOVE_POINTS = 40  # more logged rows than this: a moving average over the raw values


@dataclass(frozen=True)
class Plot:
    name: str  # the PNG is <name>.png
    title: str
    columns: tuple[str, ...]  # exact names, or one name ending in "*" for a prefix
    ylabel: str
    log_y: bool = False
    smooth: bool = False


PLOTS = (
    Plot("losses", "Hinge losses", ("loss_d", "loss_g"), "loss", smooth=True),
    Plot(
        "grad_norms", "Total gradient norms", ("grad_norm_d", "grad_norm_g"), "norm", log_y=True, smooth=True
    ),
    Plot("throughput", "Throughput (all ranks)", ("images_per_second",), "images / s"),
    Plot("gammas", "Self-attention gamma per layer", ("gamma_*",), "gamma"),
    Plot("fid", "FID of G-EMA (lower is better)", ("eval_fid",), "FID"),
    Plot("accuracy", "Class accuracy of G-EMA samples", ("eval_accuracy",), "accuracy"),
)
LEGEND = {
    "loss_d": "D",
    "loss_g": "G",
    "grad_norm_d": "D",
    "grad_norm_g": "G",
    "images_per_second": "images/s",
    "eval_fid": "FID",
    "eval_accuracy": "accuracy",
}


def write_report(run_url: str, out_url: str) -> str:
    """Write the report of the run at ``run_url`` under ``out_url``; returns the URL of its index.html."""
    run = open_store(run_url)
    out = open_store(out_url)
    table = read_run_log(run)
    steps = np.asarray(table.column("step").to_pylist(), dtype=np.int64)
    figures = []
    for plot in PLOTS:
        series = _series(table, plot.columns)
        if series:
            out.write_bytes(f"{plot.name}.png", _draw(plot, steps, series))
            figures.append(plot)
    grid = _latest_grid(run)
    if grid is not None:
        out.write_bytes(grid.rpartition("/")[2], run.read_bytes(grid))
    out.write_bytes("index.html", _index(run.url, table, figures, grid).encode())
    return out.url_of("index.html")


def _series(table: pa.Table, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Column name -> values as floats (NaN where missing), for columns holding at least one number."""
    if len(columns) == 1 and columns[0].endswith("*"):
        prefix = columns[0][:-1]
        columns = tuple(sorted(name for name in table.column_names if name.startswith(prefix)))
    found = {}
    for name in columns:
        if name not in table.column_names:
            continue
        values = np.asarray(
            [math.nan if v is None else float(v) for v in table.column(name).to_pylist()], dtype=np.float64
        )
        if np.isfinite(values).any():
            found[name] = values
    return found


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over ``window`` points, ignoring NaN (a skipped update) rather than spreading it."""
    finite = np.isfinite(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
    counts = np.convolve(finite.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def _draw(plot: Plot, steps: np.ndarray, series: dict[str, np.ndarray]) -> bytes:
    from matplotlib.figure import Figure  # the object API: no pyplot state, renders with Agg

    figure = Figure(figsize=(8, 4), dpi=100, layout="constrained")
    axes = figure.subplots()
    smooth = plot.smooth and len(steps) > SMOOTH_ABOVE_POINTS
    for index, (name, values) in enumerate(series.items()):
        color = f"C{index % 10}"
        label = LEGEND.get(name, name.removeprefix("gamma_").replace("_", " "))
        present = np.isfinite(values)
        if smooth:
            axes.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            axes.plot(steps, _moving_average(values, max(3, len(steps) // 25)), color=color, label=label)
        elif present.sum() < len(values) or present.sum() < 20:  # sparse (FID) or short: show the points
            axes.plot(steps[present], values[present], color=color, marker="o", markersize=3, label=label)
        else:
            axes.plot(steps, values, color=color, label=label)
    if plot.log_y and all((v[np.isfinite(v)] > 0).all() for v in series.values()):
        axes.set_yscale("log")
    axes.set_title(plot.title)
    axes.set_xlabel("step")
    axes.set_ylabel(plot.ylabel)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small", ncols=2 if len(series) > 6 else 1)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _latest_grid(run: Store) -> str | None:
    grids = [name for name in run.list(SAMPLES_PREFIX) if name.endswith(".png")]
    return max(grids) if grids else None  # step numbers are zero-padded: the name order is the step order


def _summary(table: pa.Table) -> list[tuple[str, str]]:
    rows = table.to_pylist()
    first, last = rows[0], rows[-1]
    facts = [("steps logged", f"{first['step']} … {last['step']} ({len(rows)} rows)")]
    if "time" in table.column_names and first.get("time") and last.get("time"):
        facts.append(("wall time covered", f"{(last['time'] - first['time']) / 3600:.2f} h"))
        facts.append(
            ("last row written", time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(last["time"])))
        )
    for key, label in (("loss_d", "last D loss"), ("loss_g", "last G loss")):
        if last.get(key) is not None:
            facts.append((label, f"{last[key]:.4f}"))
    rates = [r["images_per_second"] for r in rows[-10:] if r.get("images_per_second") is not None]
    if rates:
        facts.append(("images/s (last 10 rows)", f"{sum(rates) / len(rates):.1f}"))
    fids = [
        (r["eval_fid"], r["step"])
        for r in rows
        if r.get("eval_fid") is not None and math.isfinite(r["eval_fid"])
    ]
    if fids:
        facts.append(("last FID", f"{fids[-1][0]:.2f} at step {fids[-1][1]}"))
        best = min(fids)
        facts.append(("best FID", f"{best[0]:.2f} at step {best[1]}"))
    return facts


def _index(run_url: str, table: pa.Table, figures: list[Plot], grid: str | None) -> str:
    e = html.escape
    facts = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _summary(table))
    images = "\n".join(
        f'<figure><img src="{e(p.name)}.png" alt="{e(p.title)}"><figcaption>{e(p.title)}</figcaption></figure>'
        for p in figures
    )
    if grid is not None:
        name = grid.rpartition("/")[2]
        step = name.removeprefix("step_").removesuffix(".png").lstrip("0") or "0"
        images += (
            f'\n<figure><img src="{e(name)}" alt="samples" class="grid">'
            f"<figcaption>Samples at step {e(step)}, one row per class: G-EMA (left) and G (right)</figcaption></figure>"
        )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>SAGAN run report: {e(run_url)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ text-align: left; padding: 0.2em 1em 0.2em 0; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
img {{ max-width: 800px; }}
img.grid {{ image-rendering: pixelated; width: 512px; max-width: 512px; }}
</style>
</head>
<body>
<h1>SAGAN run report</h1>
<p><code>{e(run_url)}</code></p>
<table>
{facts}
</table>
{images}
</body>
</html>
"""
