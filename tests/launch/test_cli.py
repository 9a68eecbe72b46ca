"""End to end through the `sagan` console script: prepare, train, resume, sample, and bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.datasets import DIGITS_SHARD_SIZE
from tests.support.paths import ROOT
from trainer.checkpoint.format import load_folder

SAGAN = str(Path(sys.executable).with_name("sagan"))
TINY = [
    "model.g_channels=8",
    "model.d_channels=8",
    "model.z_dim=16",
    "trainer.global_batch_size=8",
    "trainer.log_interval=2",
    "data.num_workers=0",
    "metrics.port=0",
]


def sagan(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the suite's processes share two cores
    return subprocess.run([SAGAN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The session's ``digits_data`` (32x32, 100 KiB shards, seed 0), but prepared by ``sagan prepare``
    itself: this module tests the console script end to end, prepare included."""
    out = tmp_path_factory.mktemp("data") / "digits-32"
    result = sagan("prepare", "--source", "digits", "--out", str(out), "--shard-size", str(DIGITS_SHARD_SIZE))
    assert result.returncode == 0, result.stderr
    assert (out / "manifest.parquet").is_file()
    return out


@pytest.mark.slow
def test_prepare_train_sample(digits, tmp_path):
    run = tmp_path / "run"
    result = sagan(
        "train", "configs/smoke.yaml", f"data.url={digits}", f"run.dir={run}", "trainer.max_steps=4",
        "trainer.sample_interval=2", "checkpoint.interval_steps=2", *TINY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    grids = sorted((run / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000002.png", "step_0000004.png"]
    grid = np.asarray(Image.open(grids[-1]))
    # G-EMA and G side by side under their names: 10 digit classes, one row each, 8 columns of 32x32 with
    # 2-pixel padding, 12 pixels apart; not a blank canvas
    label, width = 14, 8 * 34 + 2
    assert grid.shape == (label + 10 * 34 + 2, 2 * width + 12, 3)
    assert grid[label + 2 : label + 34, 2:34].std() > 0  # G-EMA
    assert grid[label + 2 : label + 34, width + 14 : width + 46].std() > 0  # G
    state, manifest = load_folder(run / "checkpoints" / "step_4")
    assert manifest["step"] == 4 and state["step"] == 4
    assert (run / "checkpoints" / "LATEST").read_text() == "step_4"
    assert list((run / "log").glob("part-*.parquet"))

    # Same run, longer: it resumes from step 4 instead of starting over.
    result = sagan(
        "train", "configs/smoke.yaml", f"data.url={digits}", f"run.dir={run}", "trainer.max_steps=6",
        "checkpoint.interval_steps=2", *TINY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr and "at step 4" in result.stderr
    assert load_folder(run / "checkpoints" / "step_6")[0]["step"] == 6
    # The run ends by saying where its last grid is (G-EMA left, G right).
    assert f"samples, one row per class (G-EMA left, G right): {run / 'samples' / 'step_0000006.png'}" in (
        result.stderr
    )

    out = tmp_path / "grid.png"
    result = sagan(
        "sample", "--checkpoint", str(run), "--out", str(out), "--classes", "0,3,7", "--columns", "4",
        "--generator", "ema",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert np.asarray(Image.open(out)).shape == (3 * 34 + 2, 4 * 34 + 2, 3)


@pytest.mark.slow
def test_a_sample_grid_the_store_refuses_is_logged_and_the_run_goes_on(digits, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "samples").write_text("a file where the samples folder goes: every grid write is refused")
    result = sagan(
        "train", "configs/smoke.yaml", f"data.url={digits}", f"run.dir={run}", "trainer.max_steps=4",
        "trainer.sample_interval=2", "checkpoint.interval_steps=2", *TINY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for step in (2, 4):
        assert f"samples: cannot write samples/step_{step:07d}.png" in result.stderr
    assert load_folder(run / "checkpoints" / "step_4")[0]["step"] == 4
    assert "finished at step 4" in result.stderr and "samples, one row per class" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "trainer.max_stepz=3"], "trainer.max_stepz: unknown key"),
        (["train", "--config", "nope.yaml"], "cannot read config file nope.yaml"),
        (["train", "model.resolution=48"], "model.resolution=48 is not one of 32, 64, 128"),
        (
            ["sample", "--checkpoint", "/nonexistent/run", "--out", "x.png"],
            "no checkpoint found at /nonexistent/run",
        ),
        (["prepare", "--source", "mnist-but-not", "--out", "/tmp/x"], "mnist-but-not"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = sagan(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"sagan {args[0]}: error: ")]
    assert len(errors) == 1 and message in errors[0]


def test_wrong_data_url_names_it(tmp_path):
    result = sagan(
        "train",
        f"data.url={tmp_path / 'no-data'}",
        "data.prepare_source=",
        f"run.dir={tmp_path / 'run'}",
        *TINY,
    )
    assert result.returncode == 2
    assert "no-data" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_run_folder_on_s3_holds_log_samples_and_checkpoints(digits, moto_server, tmp_path):
    """run.dir=s3://…: a pod's disk dies with it, so everything a run writes goes to the object store."""
    bucket = moto_server.create_bucket()
    env = {**os.environ, **moto_server.env, "OMP_NUM_THREADS": "1"}
    command = [
        SAGAN, "train", str(ROOT / "configs/smoke.yaml"), f"data.url={digits}", f"run.dir=s3://{bucket}/runs/a",
        "trainer.max_steps=4", "trainer.sample_interval=2", "checkpoint.interval_steps=2", *TINY,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert not any(tmp_path.iterdir()), "nothing is written to the local disk"
    listing = moto_server.client().list_objects_v2(Bucket=bucket, Prefix="runs/a/")
    names = sorted(obj["Key"].removeprefix("runs/a/") for obj in listing["Contents"])
    assert "samples/step_0000002.png" in names and "samples/step_0000004.png" in names
    assert "checkpoints/LATEST" in names and "checkpoints/step_4/manifest.json" in names
    assert any(name.startswith("log/part-") for name in names)
    steps = subprocess.run(
        [sys.executable, "-c", f"from trainer.observability.run_log import read_run_log; print(read_run_log('s3://{bucket}/runs/a').column('step').to_pylist())"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert steps.stdout.strip() == "[2, 4]", steps.stderr


def test_a_mistyped_data_url_is_an_error_not_a_stock_dataset_written_there(tmp_path):
    """configs/smoke.yaml prepares digits into its own data.url on first use; a data.url from anywhere
    else (the command line, or a file that names no source) must not be filled with digits."""
    typo = tmp_path / "a" / "typo"
    result = sagan(
        "train", str(ROOT / "configs/smoke.yaml"), f"data.url={typo}", f"run.dir={tmp_path / 'run'}", *TINY
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("sagan train: error: ")]
    assert len(errors) == 1 and f"no dataset at {typo} (manifest.parquet is missing)" in errors[0]
    assert "prepares on first use only into the data.url configured with it (data/digits-32)" in errors[0]
    assert "add data.prepare_source=digits" in errors[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "run").exists()

    mine = tmp_path / "mine.yaml"  # a file with its own data.url, and the built-in default source
    mine.write_text(f"data:\n  url: {typo}\n")
    result = sagan("train", "--config", str(mine), f"run.dir={tmp_path / 'run'}", *TINY)
    assert (
        result.returncode == 2
        and "data.prepare_source=fashion-mnist prepares on first use only" in result.stderr
    )
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_first_use_preparation_into_a_new_data_url_when_the_command_line_asks(tmp_path):
    data = tmp_path / "new-digits"
    result = sagan(
        "train", str(ROOT / "configs/smoke.yaml"), f"data.url={data}", "data.prepare_source=digits",
        f"run.dir={tmp_path / 'run'}", "trainer.max_steps=1", *TINY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        f"no dataset at {data} yet: preparing digits" in result.stderr
        and (data / "manifest.parquet").is_file()
    )
