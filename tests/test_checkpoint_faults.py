"""Checkpoint writes that fail while training: the disk fills up, the bucket starts refusing writes.

The save is retried, then given up, counted (sagan_checkpoint_failures_total) and logged; LATEST
still names the checkpoint before and training goes on; once the storage is back, the next save
commits and the run ends normally."""

from __future__ import annotations

import re
import urllib.request

import pytest
from faults import Rule, SmallDisk, can_mount
from jobs import SAGAN, TINY, finish, free_port, output_of, start, wait_until

from trainer.checkpoint import Checkpointer

pytestmark = pytest.mark.slow

STEPS = 30


def failures_metric(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return float(re.search(r"^sagan_checkpoint_failures_total (\S+)$", text, re.M).group(1))


def run_through_a_failing_save(job, checkpoints: Checkpointer, port: int, restore) -> tuple[str, float]:
    """Wait until step_4's save is given up; check LATEST, the counter; restore the storage; finish."""
    wait_until(
        lambda: "checkpoint step_4 could not be written" in output_of(job), "step_4 given up", [job], 180
    )
    latest = checkpoints.pointer()
    failures = failures_metric(port)
    restore()
    code, output = finish(job, timeout=240)
    assert code == 0, output[-4000:]
    assert latest == 2  # the previous checkpoint stayed LATEST while the write failed
    assert failures >= 4  # every attempt counted
    assert re.search(r"checkpoint step_4 was never committed \(.*\); saving step_6", output), output[-3000:]
    assert checkpoints.pointer() == STEPS and checkpoints.load(STEPS)[0]["step"] == STEPS
    return output, failures


def train_command(data, run_dir, checkpoint_url: str, port: int) -> list[str]:
    return [
        SAGAN, "train", *TINY, f"data.url={data}", f"run.dir={run_dir}", f"checkpoint.url={checkpoint_url}",
        "trainer.global_batch_size=8", f"trainer.max_steps={STEPS}", "checkpoint.interval_steps=2",
        "checkpoint.keep_last=1", f"metrics.port={port}",
    ]  # fmt: skip


def test_a_full_disk_fails_a_save_and_training_goes_on(digits_data, tmp_path):
    reason = can_mount()
    if reason:
        from conftest import _missing_tool

        _missing_tool(reason)
    target = tmp_path / "disk"
    with SmallDisk(target, 3 * 2**20) as disk:  # one 2.1 MB checkpoint fits, not a second beside it
        port = free_port()
        job = start(train_command(digits_data, tmp_path / "run", str(target), port), log=tmp_path / "job.log")
        output, failures = run_through_a_failing_save(
            job, Checkpointer(str(target)), port, restore=lambda: disk.resize(64 * 2**20)
        )
    assert "No space left on device" in output
    print(f"full disk: {failures:.0f} failed attempts counted, training went on to step {STEPS}")


def test_a_bucket_refusing_writes_fails_a_save_and_training_goes_on(
    digits_data, fault_proxy, moto_server, s3_bucket, tmp_path
):
    url = f"s3://{s3_bucket}/run/checkpoints"
    env = {**moto_server.env, "AWS_ENDPOINT_URL": fault_proxy.endpoint}
    checkpoints = Checkpointer(url)
    port = free_port()
    # From step 4 on the bucket refuses the upload (a policy changed mid-run), until it is reset.
    refused = fault_proxy.add(Rule("error_403", match=b"step_4/state.pt", methods=("PUT",), times=None))
    job = start(train_command(digits_data, tmp_path / "run", url, port), env, log=tmp_path / "job.log")
    output, failures = run_through_a_failing_save(job, checkpoints, port, restore=fault_proxy.reset)
    assert refused.times is None and f"access to {url}/step_4/state.pt denied (AccessDenied)" in output
    print(f"bucket refusing writes: {failures:.0f} failed attempts counted, training went on to step {STEPS}")
