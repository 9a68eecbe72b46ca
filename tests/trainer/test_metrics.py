"""The Prometheus endpoint of a real (tiny) training run, scraped over HTTP: the contract metrics, the
operator metrics beside them, and the counters that live in DataLoader worker processes."""

import io
import math
import tarfile
import urllib.request

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from data_pipeline import storage
from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import prepare
from data_pipeline.storage import open_store
from models.sagan import build_models
from tests.support.datasets import png, recommit
from tests.support.faults import Rule
from tests.support.ports import free_port
from trainer.backends.ddp import DDPBackend
from trainer.config import load_config
from trainer.observability.metrics import Metrics
from trainer.runtime.distributed import Runtime, _launch_env, init_runtime
from trainer.trainer import Trainer


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_run_exports_the_contract_metrics(digits_data, tmp_path):
    port = free_port()
    cfg = load_config(
        None,
        [
            f"data.url={digits_data}",
            "data.num_workers=0",
            "model.g_channels=8",
            "model.d_channels=8",
            "model.z_dim=16",
            "trainer.global_batch_size=8",
            "trainer.n_dis=2",
            "trainer.max_steps=3",
            "trainer.log_interval=1",
            "trainer.lr_g=0.0002",
            "checkpoint.interval_steps=2",
            "eval.metrics=[]",  # evaluation's gauges are tested in tests/evaluation/test_evaluation.py
            f"run.dir={tmp_path / 'run'}",
            f"metrics.port={port}",
        ],
    )
    trainer = Trainer(cfg, init_runtime("cpu"))
    trainer.train()
    m = scrape(port)
    assert m[("sagan_train_steps_total", ())] == 3
    assert m[("sagan_train_images_total", ())] == 3 * 2 * 8  # steps × n_dis × batch
    assert m[("sagan_step_duration_seconds_count", ())] == 3
    assert m[("sagan_world_size", ())] == 1
    assert m[("sagan_images_per_second", ())] > 0
    assert m[("sagan_data_wait_seconds_total", ())] > 0
    for net in ("d", "g"):
        assert math.isfinite(m[("sagan_loss", (("net", net),))])
        assert math.isfinite(m[("sagan_grad_norm", (("net", net),))])
    assert m[("sagan_grad_norm", (("net", "g"),))] > 0  # D's hinge loss may saturate to a zero gradient
    gammas = [key for key in m if key[0] == "sagan_attention_gamma"]
    assert {dict(labels)["net"] for _, labels in gammas} == {"g", "d"}
    assert m[("sagan_nonfinite_steps_total", ())] == 0
    assert m[("sagan_checkpoint_last_success_timestamp_seconds", ())] > 0
    info = [labels for name, labels in m if name == "sagan_rank_info"]
    assert dict(info[0])["rank"] == "0" and dict(info[0])["backend"] == "ddp"
    # beside the contract
    assert m[("sagan_train_step", ())] == 3
    assert m[("sagan_learning_rate", (("net", "g"),))] == 0.0002
    assert m[("sagan_learning_rate", (("net", "d"),))] == cfg.trainer.lr_d
    assert m[("sagan_loss_scale", (("net", "g"),))] == 1.0  # fp32: no loss scaling
    assert m[("sagan_checkpoint_interval_steps", ())] == 2
    assert m[("sagan_checkpoint_last_success_step", ())] == 3  # saved at step 2, then at the end
    assert m[("sagan_elastic_restarts", ())] == 0
    assert m[("sagan_s3_read_bytes_total", ())] == 0  # a local folder
    assert m[("process_resident_memory_bytes", ())] > 50 * 2**20
    assert not [key for key in m if key[0].startswith("sagan_cuda_")]  # no GPU: no CUDA series


def test_torchrun_restarts_reach_the_endpoint(monkeypatch):
    for name, value in {
        "TORCHELASTIC_RUN_ID": "job",
        "TORCHELASTIC_RESTART_COUNT": "2",
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }.items():
        monkeypatch.setenv(name, value)
    launch = _launch_env()
    assert launch.restart_count == 2
    runtime = Runtime(launch.rank, launch.local_rank, launch.world_size, torch.device("cpu"), launch.launcher,
                      launch.local_world_size, launch.restart_count)  # fmt: skip
    metrics = Metrics(load_config(None, ["metrics.port=0"]).metrics, runtime, backend="ddp", precision="fp32")
    assert metrics.registry.get_sample_value("sagan_elastic_restarts") == 2


def test_the_fp16_loss_scale_of_each_net():
    cfg = load_config(None, ["trainer.precision=fp16", "model.g_channels=8", "model.d_channels=8"])
    G, D = build_models(cfg.model, 10)
    backend = DDPBackend(G, D, cfg.trainer, Runtime(0, 0, 1, torch.device("cpu"), "single"))
    assert backend.loss_scales() == {"g": 65536.0, "d": 65536.0}  # GradScaler's initial scale
    backend.scaler_d.scale(torch.ones(()))  # the scale lives on the device from the first use
    backend.scaler_d.update(1024.0)
    assert backend.loss_scales() == {"g": 65536.0, "d": 1024.0}
    assert backend.learning_rates() == {"g": cfg.trainer.lr_g, "d": cfg.trainer.lr_d}


NUM_SAMPLES = 40  # one epoch of 5 batches of 8


@pytest.fixture
def s3_dataset_with_a_bad_sample(moto_server, s3_bucket, tmp_path) -> str:
    """40 noise images on the moto server in a few shards; one PNG of the first shard is not an image
    (the manifest records the shard as it is now, so only that sample is skipped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = [
        {"image": png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), "label": i % 10}
        for i in range(NUM_SAMPLES)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "noise.parquet")
    url = f"s3://{s3_bucket}/noise"
    prepare(f"parquet:{tmp_path / 'noise.parquet'}", url, image_size=32, shard_size=60_000, progress=False)
    store, name = open_store(url), read_manifest(url).shards[0].name
    with tarfile.open(fileobj=io.BytesIO(store.read_bytes(name))) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    first_png = next(n for n, _ in members if n.endswith(".png"))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            data = b"not a png" if member == first_png else data
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    store.write_bytes(name, out.getvalue())
    recommit(url, [0])  # a shard that matches its manifest, holding one undecodable image
    return url


def test_counters_of_dataloader_workers_reach_the_endpoint(
    s3_dataset_with_a_bad_sample, fault_proxy, tmp_path
):
    """Two workers read the shards from S3 through a proxy that cuts one connection: the retry, the
    skipped sample and the bytes are counted in the workers and served by the rank's endpoint."""
    url = s3_dataset_with_a_bad_sample
    shards = read_manifest(url).shards
    assert len(shards) >= 2
    fault_proxy.add(Rule("truncate", match=shards[1].name.encode(), methods=("GET",), truncate_after=9_000))
    port = free_port()
    cfg = load_config(
        None,
        [
            f"data.url={url}",
            "data.prepare_source=",
            "data.num_workers=2",
            "data.retry_backoff_seconds=0.01",
            "model.g_channels=8",
            "model.d_channels=8",
            "model.z_dim=16",
            "trainer.global_batch_size=8",
            f"trainer.max_steps={NUM_SAMPLES // 8}",
            "trainer.log_interval=100",
            "eval.metrics=[]",  # only the training stream reads through the proxy
            f"run.dir={tmp_path / 'run'}",
            f"metrics.port={port}",
        ],
    )
    retries_here = storage.retry_count()
    trainer = Trainer(cfg, init_runtime("cpu"))
    trainer.train()
    m = scrape(port)
    assert fault_proxy.faults == {"truncate": 1}
    assert storage.retry_count() == retries_here  # not retried in this process: in a worker
    assert m[("sagan_s3_retries_total", ())] == 1
    assert m[("sagan_data_samples_skipped_total", (("reason", "decode"),))] == 1
    read = m[("sagan_s3_read_bytes_total", ())]
    assert read == trainer.stream.counters()["s3_read_bytes"]
    samples_bytes = sum(int(s.sample_offsets[-1] - s.sample_offsets[0]) for s in shards)
    assert read >= samples_bytes  # a whole epoch: every sample's bytes at least once
