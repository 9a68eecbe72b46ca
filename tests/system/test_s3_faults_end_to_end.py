"""A run on an object store that fails 5% of the time, reads and writes alike, is the run it would
have been on a healthy one: same steps, same samples per epoch, the same weights bit for bit.

`sagan prepare` and `sagan train` run as processes against ``tests.support.faults.FaultProxy`` in front
of the moto server, which resets connections, loses answers, answers 500/503 SlowDown, cuts bodies short
and delays requests at a seeded 5% of GETs/HEADs and of PUTs/POSTs/DELETEs."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from tests.support.datasets import digits_folder
from tests.support.faults import FaultPlan
from tests.support.jobs import SAGAN, TINY, finish, run, start

pytestmark = pytest.mark.slow

NUM_IMAGES = 96
GLOBAL_BATCH = 16  # 6 steps per epoch, no remainder
STEPS = 8  # into the second epoch
RATE = 0.05


def train(data: str, run_dir: str, env: dict[str, str]):
    """Start a run (both runs go at once: the two cores each take one)."""
    return start(
        [
            SAGAN,
            "train",
            *TINY,
            f"data.url={data}",
            f"run.dir={run_dir}",
            f"trainer.max_steps={STEPS}",
            f"trainer.global_batch_size={GLOBAL_BATCH}",
            "checkpoint.interval_steps=3",
            "checkpoint.keep_last=2",
            "data.num_workers=1",
            "data.retry_backoff_seconds=0.05",
            "trainer.sample_interval=5",
        ],
        env,
    )


def run_record(moto_server, bucket: str, prefix: str) -> dict:
    """What a run did, read back from the bucket through a healthy connection."""
    from data_pipeline.storage import open_store
    from trainer.checkpoint.checkpointer import Checkpointer
    from trainer.observability.run_log import read_run_log

    log = read_run_log(open_store(f"s3://{bucket}/{prefix}")).to_pydict()
    step, state, _ = Checkpointer(f"s3://{bucket}/{prefix}/checkpoints").load_latest()
    steps_per_epoch: dict[int, int] = {}
    for epoch in [0, *log["epoch"][:-1]]:  # a row's epoch is the stream's after that step: the next batch's
        steps_per_epoch[epoch] = steps_per_epoch.get(epoch, 0) + 1
    return {
        "steps": log["step"],
        "samples_per_epoch": {e: n * GLOBAL_BATCH for e, n in steps_per_epoch.items()},
        "losses": [log["loss_d"], log["loss_g"]],
        "latest": step,
        "state": state,
        "data": json.loads(state["data"]),
    }


def test_training_through_5_percent_faults_is_the_clean_run(moto_server, s3_bucket, fault_proxy, tmp_path):
    healthy = {**moto_server.env}
    faulty = {**moto_server.env, "AWS_ENDPOINT_URL": fault_proxy.endpoint}
    data = f"s3://{s3_bucket}/digits"

    # prepare through the faults: every shard arrives whole and as listed in the manifest
    fault_proxy.reset(FaultPlan(seed=1, read_rate=RATE, write_rate=RATE))
    source = digits_folder(tmp_path / "source", NUM_IMAGES)
    out = run(
        [SAGAN, "prepare", "--source", f"imagefolder:{source}", "--out", data, "--shard-size", "4KB"], faulty
    )
    prepare_faults = sum(fault_proxy.faults.values())
    assert prepare_faults > 0, fault_proxy.num_requests
    assert f"prepared {NUM_IMAGES} samples" in out
    fault_proxy.reset()
    from data_pipeline.manifest import read_manifest
    from data_pipeline.storage import open_store

    manifest, store = read_manifest(data), open_store(data)
    assert manifest.num_samples == NUM_IMAGES and len(manifest.shards) > 8
    for shard in manifest.shards:
        assert hashlib.sha256(store.read_bytes(shard.name)).hexdigest() == shard.sha256

    fault_proxy.reset(FaultPlan(seed=29, read_rate=RATE, write_rate=RATE))
    jobs = [train(data, f"s3://{s3_bucket}/clean", healthy), train(data, f"s3://{s3_bucket}/faulty", faulty)]
    for job in jobs:
        code, output = finish(job)
        assert code == 0, output[-4000:]
    reads = fault_proxy.faults_by_method["GET"] + fault_proxy.faults_by_method["HEAD"]
    writes = sum(fault_proxy.faults_by_method[m] for m in ("PUT", "POST", "DELETE"))
    print(
        f"prepare: {prepare_faults} faults; train: {fault_proxy.num_requests} requests, {reads} read and "
        f"{writes} write faults {dict(fault_proxy.faults)}"
    )
    assert reads > 0 and writes > 0
    fault_proxy.reset()

    clean, hurt = (run_record(moto_server, s3_bucket, p) for p in ("clean", "faulty"))
    assert clean["steps"] == hurt["steps"] == list(range(1, STEPS + 1))
    assert clean["samples_per_epoch"] == hurt["samples_per_epoch"] == {0: NUM_IMAGES, 1: 32}
    assert clean["losses"] == hurt["losses"]  # exactly: the same batches in the same order
    assert clean["latest"] == hurt["latest"] == STEPS
    assert clean["data"]["remaining"] == hurt["data"]["remaining"]
    for net in ("G", "D"):
        for name, tensor in clean["state"]["backend"][net].items():
            assert torch.equal(tensor, hurt["state"]["backend"][net][name]), f"{net}.{name}"
