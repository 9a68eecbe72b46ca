"""A global batch the world size does not divide: an elastic job that grows to 3 nodes of a batch of 8
still trains, each rank with its share (3, 3, 2), every sample once per epoch, and the averaged
gradient is the mean over the global batch, as one process computes it.

Run as a module under torchrun (``-m tests.system.test_uneven_batches``), it is the worker of
``test_uneven_ranks_average_to_the_global_batch_gradient``.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.stream import DataConfig, ShardStream, split_batch
from tests.support.jobs import SAGAN, TINY, TORCHRUN, run
from tests.support.paths import ROOT

GLOBAL_BATCH = 8
BIASES_BEFORE_BATCH_NORM = re.compile(r"^blocks\.block\d+\.(conv1|conv2|shortcut)\.bias$")


def test_split_batch_gives_the_first_ranks_one_more():
    assert split_batch(8, 3) == [3, 3, 2]
    assert split_batch(256, 24) == [11] * 16 + [10] * 8  # the README's 3 nodes x 8 GPUs
    assert split_batch(32, 2) == [16, 16]
    with pytest.raises(ValueError, match="cannot give each of 9 ranks a sample"):
        split_batch(8, 9)


def ids_of(images: torch.Tensor) -> list[int]:
    """The digits have no id pixel: a sample is identified by its bytes."""
    return [hash(image.numpy().tobytes()) for image in images]


def test_uneven_ranks_take_every_sample_once_and_resume_on_another_world_size(digits_data):
    cfg = DataConfig(url=str(digits_data), prepare_source="", num_workers=2)
    sizes = split_batch(26, 3)
    streams = [
        ShardStream(cfg, rank=r, world_size=3, batch_size=sizes[r], batch_sizes=sizes, seed=7, resolution=32)
        for r in range(3)
    ]
    num_samples = streams[0].manifest.num_samples
    assert [s.batches_remaining() for s in streams] == [num_samples // 26] * 3  # equal steps, uneven batches
    seen = []
    for stream in streams:
        for images, _ in itertools.islice(iter(stream), 5):
            assert len(images) == stream.batch_size
            seen += ids_of(images)
    states = [json.loads(json.dumps(s.state_dict())) for s in streams]
    assert states[0] == states[1] == states[2]
    # Resume on 2 ranks of 13: the rest of the epoch, nothing twice.
    resumed = [ShardStream(cfg, rank=r, world_size=2, batch_size=13, seed=7, resolution=32) for r in range(2)]
    for stream in resumed:
        stream.load_state_dict(states[0])
    steps = resumed[0].batches_remaining()
    for stream in resumed:
        for images, _ in itertools.islice(iter(stream), steps):
            seen += ids_of(images)
    distinct = len({hash(image.tobytes()) for image in digits_images(digits_data)})
    assert len(seen) == len(set(seen)) == 5 * 26 + steps * 26  # nothing twice (the digits are distinct)
    assert distinct - len(seen) < 26  # only the tail smaller than one global batch is dropped


def digits_images(url: Path) -> list:
    cfg = DataConfig(url=str(url), prepare_source="", num_workers=0, remainder="drop")
    stream = ShardStream(cfg, rank=0, world_size=1, batch_size=1, seed=0, resolution=32)
    return [images[0].numpy() for images, _ in itertools.islice(iter(stream), stream.batches_remaining())]


@pytest.mark.slow
def test_uneven_ranks_average_to_the_global_batch_gradient(tmp_path):
    """Three DDP ranks of 3, 3 and 2 samples: after one D and one G update, Adam's exp_avg (beta1 = 0:
    the gradient itself) equals the gradient of the mean loss over all 8 samples computed in one process;
    the unweighted average of the ranks' gradients, which DDP alone would give, does not."""
    out = tmp_path / "gradients.json"
    run([TORCHRUN, "--standalone", "--nproc-per-node=3", "-m", __name__, str(out)])  # this module, from ROOT
    report = json.loads(out.read_text())
    print(report)
    for net in ("d", "g"):
        assert report[net]["weighted"] < 1e-5, report
        assert report[net]["unweighted"] > 100 * max(report[net]["weighted"], 1e-7), report


@pytest.mark.slow
def test_a_world_size_that_does_not_divide_the_global_batch_trains(digits_data, tmp_path):
    run_dir = tmp_path / "run"
    command = [
        TORCHRUN, "--standalone", "--nproc-per-node=3", "--no-python", SAGAN, "train", *TINY,
        f"data.url={digits_data}", f"run.dir={run_dir}", f"trainer.global_batch_size={GLOBAL_BATCH}",
        "trainer.max_steps=3", "checkpoint.interval_steps=3",
    ]  # fmt: skip
    run(command)
    from trainer.checkpoint.format import load_folder
    from trainer.observability.run_log import read_run_log

    state, manifest = load_folder(run_dir / "checkpoints" / "step_3")
    data = json.loads(state["data"])
    assert manifest["world_size"] == 3 and data["batch_sizes"] == [3, 3, 2]
    assert sum(end - start for _, start, end in data["remaining"]) == data["num_samples"] - 3 * GLOBAL_BATCH
    assert read_run_log(run_dir).column("step").to_pylist() == [1, 2, 3]


def gradient_worker(out: str) -> None:
    from torch.nn.utils import parametrize

    from models.losses import d_hinge_loss, g_hinge_loss
    from models.sagan import build_models
    from trainer.backends.ddp import DDPBackend
    from trainer.config import load_config
    from trainer.runtime.distributed import init_runtime, shutdown
    from trainer.trainer import noise

    cfg = load_config(ROOT / "configs/smoke.yaml", [*TINY[1:], f"trainer.global_batch_size={GLOBAL_BATCH}"])
    runtime = init_runtime("cpu", 60)
    t, num_classes = cfg.trainer, 10
    sizes = split_batch(GLOBAL_BATCH, runtime.world_size)
    slices = [slice(sum(sizes[:r]), sum(sizes[: r + 1])) for r in range(runtime.world_size)]
    mine = slices[runtime.rank]
    torch.manual_seed(0)
    G, D = build_models(cfg.model, num_classes)
    G_ref, D_ref = copy.deepcopy(G), copy.deepcopy(D)
    backend = DDPBackend(G, D, t, runtime)
    # The reference computes in the backend's memory format too (channels_last by default): the two
    # layouts round differently, and G's batch norms over 2 or 3 samples magnify that.
    G_ref, D_ref = (net.to(memory_format=backend.memory_format) for net in (G_ref, D_ref))
    generator = torch.Generator().manual_seed(1)
    real = (torch.rand(GLOBAL_BATCH, 3, 32, 32, generator=generator) * 2 - 1).contiguous(
        memory_format=backend.memory_format
    )
    y_real = torch.randint(0, num_classes, (GLOBAL_BATCH,), generator=generator)
    z_d, y_d = noise(t.seed, 0, 0, GLOBAL_BATCH, cfg.model.z_dim, num_classes, slice(None))
    z_g, y_g = noise(t.seed, 0, 1, GLOBAL_BATCH, cfg.model.z_dim, num_classes, slice(None))
    backend.d_step(real[mine], y_real[mine], z_d[mine], y_d[mine])
    D_after = copy.deepcopy(D).requires_grad_(False)  # as the G step meets it (spectral norm's u included)
    backend.g_step(z_g[mine], y_g[mine])

    def compared(net) -> list[torch.nn.Parameter]:
        # Convolution biases that feed a batch norm get rounding noise for a gradient (its true value
        # is 0), of the size of the differences between summing in one process and over ranks.
        return [p for name, p in net.named_parameters() if not BIASES_BEFORE_BATCH_NORM.match(name)]

    def adam_gradient(opt, net) -> torch.Tensor:
        return torch.cat([opt.state[p]["exp_avg"].flatten() for p in compared(net)])

    def gradient(loss, net) -> torch.Tensor:
        params = compared(net)
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        return torch.cat(
            [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]
        )

    # One process: G's batch-norm statistics per rank slice (as on the ranks), one power iteration each.
    report = {}
    with torch.no_grad(), parametrize.cached():
        fake = torch.cat([G_ref(z_d[s], y_d[s]) for s in slices])
    G_ref_for_g = copy.deepcopy(G_ref)
    with parametrize.cached():
        logits = D_ref(torch.cat([real, fake]), torch.cat([y_real, y_d]))
        whole = gradient(d_hinge_loss(logits[:GLOBAL_BATCH], logits[GLOBAL_BATCH:]), D_ref)
        per_rank = [gradient(d_hinge_loss(logits[s], logits[GLOBAL_BATCH:][s]), D_ref) for s in slices]
    report["d"] = errors(adam_gradient(backend.opt_d, D), whole, torch.stack(per_rank).mean(0))
    # The G step sees D after its update, as the ranks did.
    with parametrize.cached():
        outputs = [D_after(G_ref_for_g(z_g[s], y_g[s]), y_g[s]) for s in slices]
        whole = gradient(g_hinge_loss(torch.cat(outputs)), G_ref_for_g)
        per_rank = [gradient(g_hinge_loss(o), G_ref_for_g) for o in outputs]
    report["g"] = errors(adam_gradient(backend.opt_g, G), whole, torch.stack(per_rank).mean(0))
    if runtime.is_main:
        Path(out).write_text(json.dumps(report))
    shutdown(runtime, 0)


def errors(ranks: torch.Tensor, whole: torch.Tensor, unweighted: torch.Tensor) -> dict[str, float]:
    """How far the ranks' averaged gradient, and the unweighted average, are from the global-batch one."""
    scale = float(whole.abs().max())
    return {
        "weighted": float((ranks - whole).abs().max()) / scale,
        "unweighted": float((unweighted - whole).abs().max()) / scale,
    }


if __name__ == "__main__":
    gradient_worker(sys.argv[1])
