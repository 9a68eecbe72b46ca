"""Resume through the real command line: bit-exact continuation, kill -9 under torchrun with restarts,
world-size changes (2 -> 1 -> 2 ranks) with checkpoints on the S3 server, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support.datasets import prepare_digits
from tests.support.paths import FIXTURES, ROOT
from tests.support.ports import free_port
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.format import load_folder
from trainer.observability.run_log import read_run_log

BIN = Path(sys.executable).parent
SAGAN = str(BIN / "sagan")
TORCHRUN = str(BIN / "torchrun")
TINY = [
    "configs/smoke.yaml",
    "model.g_channels=8",
    "model.d_channels=8",
    "model.z_dim=16",
    "trainer.global_batch_size=8",
    "data.num_workers=0",
    "metrics.port=0",
    "trainer.log_interval=1",
    "trainer.sample_interval=100000",
]
# One OpenMP thread per process: the 2 shared cores are oversubscribed otherwise. Workers restarted by
# torchrun need the rendezvous store not to be shared with them (pytorch/pytorch#135712).
ENV = {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
TIMEOUT = 600

pytestmark = pytest.mark.slow


def run(command: list[str], env: dict[str, str] | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, **ENV, **(env or {})},
    )
    return result


def train(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run([SAGAN, "train", *TINY, *args], env)


def torchrun_train(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run(
        [TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "launch.cli", "train", *TINY, *args], env
    )


def assert_ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_resumed_run_matches_an_uninterrupted_one_bit_for_bit(digits_data, tmp_path):
    data = f"data.url={digits_data}"
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert_ok(train(data, f"run.dir={whole}", "trainer.max_steps=8", "checkpoint.interval_steps=4"))
    assert_ok(train(data, f"run.dir={split}", "trainer.max_steps=4", "checkpoint.interval_steps=4"))
    stderr = assert_ok(train(data, f"run.dir={split}", "trainer.max_steps=8", "checkpoint.interval_steps=4"))
    assert f"resumed from {split / 'checkpoints' / 'step_4'} at step 4" in stderr

    columns = ["loss_d", "loss_g", "grad_norm_d", "grad_norm_g"]
    logs = [read_run_log(run).to_pylist() for run in (whole, split)]
    after = [[{c: row[c] for c in ["step", *columns]} for row in log if row["step"] > 4] for log in logs]
    assert [row["step"] for row in after[0]] == [5, 6, 7, 8]
    assert after[0] == after[1]  # exact float equality, not approximate

    final = [load_folder(run / "checkpoints" / "step_8")[0] for run in (whole, split)]
    for key in ("step", "backend", "G_ema", "data"):
        assert same(final[0][key], final[1][key]), key
    assert final[0]["backend"]["opt_g"]["state"][0]["step"] == 8  # Adam's step count went on from 4

    # Another model on the same checkpoints: refused in one line, nothing written or lost.
    result = train(data, f"run.dir={split}", "trainer.max_steps=10", "model.g_channels=16")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("sagan train: error: ")]
    assert len(errors) == 1 and "was trained with model.g_channels=8, this run has 16" in errors[0]
    assert Checkpointer(str(split / "checkpoints")).committed_steps() == [4, 8]
    assert same(load_folder(split / "checkpoints" / "step_8")[0]["backend"], final[1]["backend"])


def test_a_resumed_run_applies_new_learning_rates_and_betas_and_refuses_a_new_seed(digits_data, tmp_path):
    """The optimizer state in a checkpoint carries its lr and betas; the resumed run's config wins and
    is said in the log. A seed cannot take effect (the data order goes on): refused, naming the key."""
    common = [f"data.url={digits_data}", f"run.dir={tmp_path}", "checkpoint.interval_steps=1"]
    assert_ok(train(*common, "trainer.max_steps=1"))
    stderr = assert_ok(
        train(
            *common,
            "trainer.max_steps=2",
            "trainer.lr_d=1e-4",
            "trainer.betas_d=[0.5,0.99]",
            "trainer.lr_g=2e-5",
        )
    )
    assert "resumed with trainer.lr_d=0.0001 (checkpoint: 0.0008)" in stderr
    assert "resumed with trainer.betas_d=[0.5, 0.99] (checkpoint: [0.0, 0.9])" in stderr
    state, manifest = load_folder(tmp_path / "checkpoints" / "step_2")
    groups = {net: state["backend"][net]["param_groups"][0] for net in ("opt_d", "opt_g")}
    assert (groups["opt_d"]["lr"], list(groups["opt_d"]["betas"])) == (1e-4, [0.5, 0.99])
    assert (groups["opt_g"]["lr"], list(groups["opt_g"]["betas"])) == (2e-5, [0.0, 0.9])
    assert manifest["config"]["trainer"]["lr_d"] == 1e-4

    result = train(*common, "trainer.max_steps=3", "trainer.seed=7")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("sagan train: error: ")]
    assert len(errors) == 1 and errors[0].startswith("sagan train: error: trainer.seed=7 but "), result.stderr
    assert "was trained with 0, and a resumed run keeps it" in errors[0]
    assert Checkpointer(str(tmp_path / "checkpoints")).committed_steps() == [1, 2]


def test_kill_9_of_a_worker_under_torchrun_restarts_and_finishes(digits_data, tmp_path):
    run_dir = tmp_path / "run"
    latest = run_dir / "checkpoints" / "LATEST"
    command = [
        TORCHRUN, "--nnodes=1:2", "--nproc-per-node=2", "--max-restarts=2", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-conf=last_call_timeout=1", "--monitor-interval=0.5",
        "-m", "launch.cli", "train", *TINY, f"data.url={digits_data}", f"run.dir={run_dir}",
        "trainer.max_steps=14", "checkpoint.interval_steps=2",
    ]  # fmt: skip
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        job = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV}
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (latest.is_file() and latest.read_text() not in ("step_2",)):
            assert job.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint after step 2 appeared"
            time.sleep(0.1)
        killed_at = int(latest.read_text().removeprefix("step_"))
        workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGKILL)
        assert job.wait(timeout=TIMEOUT) == 0, log_path.read_text()[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    output = log_path.read_text()
    resumed = [line for line in output.splitlines() if "resumed from" in line]
    assert resumed, output[-4000:]  # torchrun restarted the workers, and they resumed from a checkpoint
    resumed_at = int(resumed[0].rsplit("at step ", 1)[1])
    assert killed_at <= resumed_at < 14
    assert latest.read_text() == "step_14"
    state, manifest = load_folder(run_dir / "checkpoints" / "step_14")
    assert state["step"] == 14 and manifest["world_size"] == 2
    assert read_run_log(run_dir).column("step").to_pylist() == list(range(1, 15))


def remaining_positions(state: dict) -> int:
    return sum(end - start for _, start, end in json.loads(state["data"])["remaining"])


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_world_size_changes_2_1_2_on_s3(backend, digits_data, tmp_path, moto_server, s3_bucket, fault_proxy):
    url = f"s3://{s3_bucket}/runs/{backend}/checkpoints"
    common = [
        f"data.url={digits_data}",
        f"run.dir={tmp_path / 'run'}",
        f"checkpoint.url={url}",
        f"trainer.backend={backend}",
    ]
    common.append("checkpoint.interval_steps=2")
    env = {**moto_server.env, "AWS_ENDPOINT_URL": fault_proxy.endpoint}  # a proxy that sees every request
    assert_ok(torchrun_train(*common, "trainer.max_steps=2", env=env))
    stderr = assert_ok(train(*common, "trainer.max_steps=4", env=env))
    assert f"resumed from {url}/step_2 at step 2" in stderr
    fault_proxy.reset()
    stderr = assert_ok(torchrun_train(*common, "trainer.max_steps=6", "trainer.lr_g=5e-5", env=env))
    assert f"resumed from {url}/step_4 at step 4" in stderr
    assert "resumed with trainer.lr_g=5e-05 (checkpoint: 0.0002)" in stderr
    # Two ranks on one node: the checkpoint is read from the store once, and handed to the other rank.
    reads = [h for h in fault_proxy.requests if h.startswith(b"GET ") and b"step_4/state.pt" in h]
    assert len(reads) == 1, reads

    ckpt = Checkpointer(url)
    assert ckpt.committed_steps() == [2, 4, 6]
    states = {step: ckpt.load(step) for step in (2, 4, 6)}
    assert [states[s][1]["world_size"] for s in (2, 4, 6)] == [2, 1, 2]
    assert [len(states[s][0]["rng"]) for s in (2, 4, 6)] == [2, 1, 2]  # one RNG state per rank
    # The last leg's learning rate took effect in the optimizer (not the one its checkpoint carried).
    assert [states[s][0]["backend"]["opt_g"]["param_groups"][0]["lr"] for s in (4, 6)] == [2e-4, 5e-5]
    num_samples = json.loads(states[2][0]["data"])["num_samples"]
    for step, (state, _) in states.items():
        # The data position carried over each change of world size: 8 images per step, none twice.
        assert remaining_positions(state) == num_samples - 8 * step
        for net in ("opt_g", "opt_d"):
            assert {int(s["step"]) for s in state["backend"][net]["state"].values()} == {step}
        assert state["backend"]["G"].keys() == states[2][0]["backend"]["G"].keys()


def test_missing_credentials_for_checkpoints_is_a_one_line_error(
    digits_data, tmp_path, moto_server, s3_bucket
):
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(
        AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true"
    )
    env.update(
        {k: v for k, v in moto_server.env.items() if not k.startswith("AWS_ACCESS") and "SECRET" not in k}
    )
    result = subprocess.run(
        [SAGAN, "train", *TINY, f"data.url={digits_data}", f"run.dir={tmp_path}", f"checkpoint.url=s3://{s3_bucket}/c"],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env={**env, **ENV},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("sagan train: error: ")]
    assert len(errors) == 1 and "no S3 credentials" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


BEFORE_REDESIGN = FIXTURES / "checkpoint-before-redesign"


def test_a_checkpoint_written_before_the_redesign_resumes_samples_and_evaluates(tmp_path):
    """``tests/fixtures/checkpoint-before-redesign``: step 10 of ``configs/smoke.yaml`` (first-use digits
    at data/digits-32) written by the code of f0ccd90, before the packages moved. Today's code resumes
    it where its stream stopped, draws its grid and scores it."""
    import shutil

    from data_pipeline.prepare import parse_size

    # The same dataset as first use prepared then (same manifest), where the checkpoint's config names it
    # (data/digits-32, relative: the commands below that read it from the checkpoint run in tmp_path).
    data = tmp_path / "data" / "digits-32"
    prepare_digits(data, shard_size=parse_size("8MB"), seed=0)
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(BEFORE_REDESIGN, checkpoints)
    saved, saved_manifest = load_folder(checkpoints / "step_10")
    assert saved_manifest["step"] == 10 and "G_ema_statistics" in saved

    result = run(
        [SAGAN, "train", "configs/smoke.yaml", f"data.url={data}", f"run.dir={tmp_path / 'run'}",
         f"checkpoint.url={checkpoints}", "trainer.max_steps=14", "checkpoint.interval_steps=2"]
    )  # fmt: skip
    log = assert_ok(result)
    assert f"resumed from {checkpoints / 'step_10'} at step 10" in log
    resumed, manifest = load_folder(checkpoints / "step_14")
    assert manifest["step"] == 14 and resumed["step"] == 14
    # The stream went on from the saved position: 4 more global batches of 16 consumed.
    consumed = json.loads(resumed["data"])
    before = json.loads(saved["data"])
    assert consumed != before
    # Training went on from the saved weights, not from scratch.
    g_before, g_after = saved["backend"]["G"], resumed["backend"]["G"]
    assert g_before.keys() == g_after.keys()
    assert any(not torch.equal(g_before[k], g_after[k]) for k in g_before)

    grid = tmp_path / "grid.png"
    assert_ok(run([SAGAN, "sample", "--checkpoint", str(checkpoints / "step_10"), "--out", str(grid)]))
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = tmp_path / "eval.json"
    evaluated = run(
        [SAGAN, "eval", "--checkpoint", str(checkpoints / "step_10"), "--num-samples", "64",
         "--num-reference", "200", "--metrics", "fid,accuracy", "--out", str(scores)],
        cwd=tmp_path,
    )  # fmt: skip
    assert_ok(evaluated)
    (result,) = json.loads(scores.read_text())
    assert result["step"] == 10 and result["num_samples"] == 64
    assert result["metrics"]["fid"] > 0 and 0 <= result["metrics"]["accuracy"] <= 1
