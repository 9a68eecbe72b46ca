"""``sagan report``: plots of a run's Parquet log and its latest sample grid, in one index.html, from a
local run folder or one on S3 (the moto server)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.storage import open_store
from tests.support.paths import ROOT
from trainer.observability import grids
from trainer.observability.report import write_report
from trainer.observability.run_log import RunLog, read_run_log

SAGAN = str(Path(sys.executable).with_name("sagan"))
ROWS = 60


def write_run(url: str, *, with_fid: bool) -> None:
    """A run folder as the trainer leaves it: log parts (one of them a resumed run's repeat) and grids."""
    log = RunLog(url, flush_seconds=math.inf)
    rng = np.random.default_rng(0)
    for i in range(1, ROWS + 1):
        step = 10 * i
        row = {
            "step": step,
            "time": 1.7e9 + 3.0 * step,
            "loss_d": 1.5 * math.exp(-step / 300) + 0.1 * rng.random(),
            "loss_g": 0.5 + step / 600,
            "grad_norm_d": 10.0 + rng.random(),
            "grad_norm_g": 100.0 * math.exp(-step / 200) + 1.0,
            "images_per_second": 500.0 + 10 * rng.random(),
            "epoch": step // 200,
            "gamma_g_blocks.attention32": step * 1e-4,
            "gamma_d_blocks.attention32": -step * 5e-5,
        }
        log.append(row)
        if with_fid and step % 100 == 0:  # Trainer.evaluate logs its own row for the step
            log.append(
                {
                    "step": step,
                    "time": row["time"] + 1,
                    "eval_fid": 200.0 - step / 5,
                    "eval_accuracy": step / 1000,
                }
            )
        if step == 300:
            log.flush()
            log.append({**row, "loss_d": 9.0})  # resumed from step 300: the step is logged again
    log.flush()
    store = open_store(url)
    images = torch.rand(20, 3, 32, 32) * 2 - 1
    for step in (300, 600):
        store.write_bytes(f"samples/step_{step:07d}.png", grids.encode_grid(images, 4))


def referenced(index: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', index)


def looks_like_a_plot(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 400)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 20  # axes, text and lines, not a blank canvas


def test_report_of_a_local_run_through_the_cli(tmp_path):
    run, out = tmp_path / "run", tmp_path / "report"
    write_run(str(run), with_fid=True)
    done = subprocess.run(
        [SAGAN, "report", str(run), "--out", str(out)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out}/index.html"
    index = (out / "index.html").read_text()
    names = referenced(index)
    assert names == [
        "losses.png",
        "grad_norms.png",
        "throughput.png",
        "gammas.png",
        "fid.png",
        "accuracy.png",
        "step_0000600.png",  # the latest grid, copied unchanged
    ]
    for name in names[:-1]:
        looks_like_a_plot(out / name)
    assert (out / "step_0000600.png").read_bytes() == (run / "samples" / "step_0000600.png").read_bytes()
    assert f"10 … {10 * ROWS} ({ROWS} rows)" in index  # the repeated step is one row
    row_300 = next(r for r in read_run_log(str(run)).to_pylist() if r["step"] == 300)
    assert row_300["loss_d"] == 9.0 and row_300["eval_fid"] == 140.0  # the later value wins; rows merge
    assert "best FID</th><td>80.00 at step 600" in index
    assert "Samples at step 600, one row per class: G-EMA (left) and G (right)" in index


def test_a_run_without_fid_or_samples_gets_the_other_plots(tmp_path):
    run = tmp_path / "run"
    write_run(str(run), with_fid=False)
    for grid in (run / "samples").iterdir():
        grid.unlink()
    index_url = write_report(str(run), str(tmp_path / "report"))
    index = Path(index_url).read_text()
    assert referenced(index) == ["losses.png", "grad_norms.png", "throughput.png", "gammas.png"]
    assert not (tmp_path / "report" / "fid.png").exists() and "FID" not in index


def test_report_of_a_run_on_s3(s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/runs/r1"
    write_run(url, with_fid=True)
    write_report(url, str(tmp_path / "report"))
    index = (tmp_path / "report" / "index.html").read_text()
    assert url in index and "fid.png" in referenced(index)
    assert (tmp_path / "report" / "step_0000600.png").read_bytes() == open_store(url).read_bytes(
        "samples/step_0000600.png"
    )


def test_a_folder_without_a_run_log_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "not-a-run").mkdir()
    done = subprocess.run(
        [SAGAN, "report", str(tmp_path / "not-a-run"), "--out", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stderr == f"sagan report: error: no run log under {tmp_path / 'not-a-run'}/log\n"
    assert not (tmp_path / "report").exists()
