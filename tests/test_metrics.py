"""The Prometheus endpoint of a real (tiny) training run, scraped over HTTP."""

import math
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from data_pipeline.prepare import prepare
from trainer.config import load_config
from trainer.distributed import init_runtime
from trainer.trainer import Trainer


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits"
    prepare("digits", str(out), image_size=32, shard_size=100_000, progress=False)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_run_exports_the_contract_metrics(digits, tmp_path):
    port = free_port()
    cfg = load_config(
        None,
        [
            f"data.url={digits}",
            "data.num_workers=0",
            "model.g_channels=8",
            "model.d_channels=8",
            "model.z_dim=16",
            "trainer.global_batch_size=8",
            "trainer.n_dis=2",
            "trainer.max_steps=3",
            "trainer.log_interval=1",
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
