"""Checkpoint writes that fail while training: the disk fills up, the bucket starts refusing writes.

The save is retried, then given up, counted (sagan_checkpoint_failures_total) and logged; LATEST
still names the checkpoint before and training goes on; once the storage is back, the next save
commits and the run ends normally."""

from __future__ import annotations

import re
import urllib.request

import pytest

from tests.support.faults import Rule, SmallDisk, can_mount
from tests.support.jobs import SAGAN, TINY, finish, output_of, start, wait_until
from tests.support.ports import free_port
from tests.support.tools import missing_tool
from trainer.checkpoint.checkpointer import Checkpointer

pytestmark = pytest.mark.slow

STEPS = 16


def failures_metric(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return float(re.search(r"^sagan_checkpoint_failures_total (\S+)$", text, re.M).group(1))


def train_command(data, run_dir, checkpoint_url: str, port: int) -> list[str]:
    return [
        SAGAN, "train", *TINY, f"data.url={data}", f"run.dir={run_dir}", f"checkpoint.url={checkpoint_url}",
        "trainer.global_batch_size=8", f"trainer.max_steps={STEPS}", "checkpoint.interval_steps=2",
        "checkpoint.keep_last=1", f"metrics.port={port}",
    ]  # fmt: skip


def test_a_full_disk_or_a_bucket_refusing_writes_fails_a_save_and_training_goes_on(
    digits_data, fault_proxy, moto_server, s3_bucket, tmp_path
):
    """Two runs at once (one core each): checkpoints on a tmpfs with room for one checkpoint only
    (ENOSPC for the next), and checkpoints in a bucket that answers 403 AccessDenied to uploads after the
    first (a policy changed mid-run). In both, step 4's save is given up; then the storage comes back."""
    reason = can_mount()
    if reason:
        missing_tool(reason)
    disk_url, bucket_url = tmp_path / "disk", f"s3://{s3_bucket}/run/checkpoints"
    fault_proxy.add(Rule("pass", match=b"step_2/state.pt", methods=("PUT",), times=None))  # first match wins
    refused = fault_proxy.add(Rule("error_403", match=b"/state.pt", methods=("PUT",), times=None))
    with SmallDisk(disk_url, 3 * 2**20) as disk:  # one 2.1 MB checkpoint fits, not a second beside it
        runs = {}
        for name, url, env in (
            ("full disk", str(disk_url), None),
            (
                "bucket refusing writes",
                bucket_url,
                {**moto_server.env, "AWS_ENDPOINT_URL": fault_proxy.endpoint},
            ),
        ):
            port = free_port()
            job = start(
                train_command(digits_data, tmp_path / name, url, port), env, log=tmp_path / f"{name}.log"
            )
            runs[name] = (job, Checkpointer(url), port)
        restore = {"full disk": lambda: disk.resize(64 * 2**20), "bucket refusing writes": fault_proxy.reset}
        outputs = {}
        for name, (job, checkpoints, port) in runs.items():
            wait_until(lambda j=job: "checkpoint step_4 could not be written" in output_of(j), f"{name}: step_4 given up",
                       [job], 180)  # fmt: skip
            latest, failures = checkpoints.pointer(), failures_metric(port)
            restore[name]()
            code, output = finish(job, timeout=240)
            assert code == 0, f"{name}: {output[-4000:]}"
            assert latest == 2, name  # the previous checkpoint stayed LATEST while the write failed
            assert failures >= 4, name  # every attempt counted
            assert re.search(r"checkpoint step_4 was never committed \(.*\); saving step_6", output), output[
                -3000:
            ]
            assert checkpoints.pointer() == STEPS and checkpoints.load(STEPS)[0]["step"] == STEPS
            outputs[name] = output
            print(f"{name}: {failures:.0f} failed attempts counted, training went on to step {STEPS}")
    assert "No space left on device" in outputs["full disk"]
    assert refused.times is None
    assert (
        f"access to {bucket_url}/step_4/state.pt denied (AccessDenied)" in outputs["bucket refusing writes"]
    )
