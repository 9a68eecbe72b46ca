"""G-EMA: the decay schedule, the averaged weights, batch-norm statistics measured on the averaged weights
(standing statistics), and the same G-EMA in the trainer's grids, checkpoints and ``sagan sample``."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from launch.cli import main
from models.ema import (
    EMA,
    batch_norm_inputs,
    batch_norm_layers,
    ema_decay,
    load_ema_generator,
    recompute_batch_norm,
)
from models.layout import to_training_layout
from models.sagan import Generator, attention_gammas, build_models
from tests.support.paths import CONFIGS
from trainer.checkpoint.format import load_folder
from trainer.config import from_dict
from trainer.observability.grids import draw, encode_panels, fixed_inputs

NUM_CLASSES = 10


def tiny_generator() -> Generator:
    torch.manual_seed(0)
    return Generator(32, NUM_CLASSES, z_dim=16, channels=8)


def batch(G: Generator, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, G.z_dim, generator=generator), torch.randint(
        0, NUM_CLASSES, (size,), generator=generator
    )


def train_forward(G: Generator, steps: int = 3) -> None:
    """Move G's weights and, by training-mode forwards, its BN running statistics and spectral norm's u, v."""
    with torch.no_grad():
        for step in range(steps):
            for param in G.parameters():
                param.add_(0.05 * torch.randn_like(param))
            G(*batch(G, 8, seed=100 + step))


def pre_batch_norm_statistics(
    G: nn.Module, z: torch.Tensor, y: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    """Per BN layer of ``G``: its running mean and variance, and the per-channel mean and variance of its
    input when ``G`` runs with batch statistics on (z, y) (on a copy: ``G`` itself is left as it was)."""
    model = copy.deepcopy(G).eval()
    layers = batch_norm_layers(model)
    seen = []
    hooks = [
        layer.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach())) for layer in layers
    ]
    for layer in layers:
        layer.train()
    with torch.no_grad():
        model(z, y)
    for hook in hooks:
        hook.remove()
    running = batch_norm_layers(G)
    return [
        {
            "batch_mean": x.mean(dim=(0, 2, 3)),
            "batch_var": x.var(dim=(0, 2, 3)),
            "running_mean": layer.running_mean,
            "running_var": layer.running_var,
        }
        for x, layer in zip(seen, running)
    ]


def mismatch(stats: dict[str, torch.Tensor]) -> tuple[float, float]:
    """How far a layer's running statistics are from its batch statistics: the mean's offset in running
    standard deviations, and |log| of the variance ratio, each averaged over channels."""
    scale = (stats["running_var"] + 1e-5).sqrt()
    offset = ((stats["batch_mean"] - stats["running_mean"]).abs() / scale).mean()
    ratio = ((stats["batch_var"] + 1e-5) / (stats["running_var"] + 1e-5)).log().abs().mean()
    return float(offset), float(ratio)


# --- the decay schedule ----------------------------------------------------------------------------


def test_ema_decay_copies_before_the_start_then_ramps_up_to_the_decay() -> None:
    assert ema_decay(0, decay=0.999) == ema_decay(10_000, decay=0.999) == 0.999  # no ramp-up
    assert ema_decay(99, decay=0.999, start_step=100) == 0.0
    assert ema_decay(100, decay=0.999, start_step=100) == 0.999
    # Ramp-up: the average's horizon 1 / (1 - decay) is rampup x the updates so far.
    for step in (9, 99, 999):
        horizon = 1 / (1 - ema_decay(step, decay=0.9999, rampup=0.1))
        assert horizon == pytest.approx(0.1 * (step + 1))
    assert ema_decay(5, decay=0.9999, rampup=0.1) == 0.0  # a horizon under one step: a copy of G
    assert ema_decay(10**6, decay=0.999, rampup=0.1) == 0.999  # capped by the decay
    assert ema_decay(149, decay=0.9999, start_step=100, rampup=0.2) == pytest.approx(0.9)
    with pytest.raises(ValueError, match=re.escape("decay=1.0")):
        ema_decay(0, decay=1.0)


# --- the averaged weights --------------------------------------------------------------------------


def test_ema_update_lerps_parameters_copies_spectral_norm_vectors_but_not_batch_norm_statistics() -> None:
    G = tiny_generator()
    ema = EMA(G)
    old = {name: p.detach().clone() for name, p in ema.module.named_parameters()}
    old_buffers = {name: b.clone() for name, b in ema.module.named_buffers()}
    train_forward(G, steps=1)
    ema.update(G, decay=0.75)

    live = dict(G.named_parameters())
    assert "blocks.block0.conv1.parametrizations.weight.original" in live
    for name, param in ema.module.named_parameters():
        torch.testing.assert_close(param, 0.75 * old[name] + 0.25 * live[name].detach(), msg=name)
        assert not param.requires_grad
    live_buffers = dict(G.named_buffers())
    statistics = [name for name in live_buffers if "running_" in name or "num_batches_tracked" in name]
    assert "blocks.block0.bn1.bn.running_mean" in statistics and "output_bn.running_var" in statistics
    for name, buffer in ema.module.named_buffers():
        if name in statistics:  # G's statistics describe G's weights: left alone
            assert torch.equal(buffer, old_buffers[name]) and not torch.equal(buffer, live_buffers[name]), (
                name
            )
        else:  # spectral norm's u and v
            assert torch.equal(buffer, live_buffers[name]), name
    assert "blocks.block0.conv1.parametrizations.weight.0._u" in live_buffers
    assert not ema.module.training and G.training


def test_ema_state_dict_round_trip_and_sampling() -> None:
    G = tiny_generator()
    ema = EMA(G)
    with torch.no_grad():
        G.blocks["attention32"].gamma.fill_(0.5)
    ema.update(G, decay=0.0)
    restored = EMA(tiny_generator())
    restored.load_state_dict(ema.state_dict())
    assert attention_gammas(restored.module) == {"blocks.attention32": 0.5}
    z, y = batch(G, 2, seed=0)
    torch.testing.assert_close(restored.module(z, y), ema.module(z, y))


def test_ema_rejects_a_wrapped_model_and_bad_decay() -> None:
    G = tiny_generator()
    ema = EMA(G)
    with pytest.raises(ValueError, match="unwrapped model"):
        ema.update(nn.Sequential(G), decay=0.9)
    with pytest.raises(ValueError, match=re.escape("decay=1.5")):
        ema.update(G, decay=1.5)


# --- standing statistics ---------------------------------------------------------------------------


def test_standing_statistics_are_the_exact_average_and_touch_nothing_else() -> None:
    G = tiny_generator()
    train_forward(G)
    ema = EMA(G)
    ema.update(G, decay=0.0)
    vectors = {n: b.clone() for n, b in ema.module.named_buffers() if n.endswith(("._u", "._v"))}
    assert vectors
    params = {name: p.clone() for name, p in ema.module.named_parameters()}
    inputs = [batch(G, 16, seed=s) for s in range(4)]
    seen = []
    hook = ema.module.output_bn.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    rng = torch.get_rng_state()

    assert ema.recompute_batch_norm(inputs) == 4
    hook.remove()
    assert torch.equal(torch.get_rng_state(), rng)  # the training RNG is not drawn from
    assert len(seen) == 4
    out = ema.module.output_bn
    torch.testing.assert_close(out.running_mean, torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0))
    torch.testing.assert_close(out.running_var, torch.stack([x.var(dim=(0, 2, 3)) for x in seen]).mean(0))
    assert int(out.num_batches_tracked) == 4
    assert all(layer.momentum == 0.1 for layer in batch_norm_layers(ema.module))  # restored
    assert not ema.module.training and not any(m.training for m in ema.module.modules())
    for name, buffer in ema.module.named_buffers():  # spectral norm ran no power iteration
        if name in vectors:
            assert torch.equal(buffer, vectors[name]), name
    for name, param in ema.module.named_parameters():
        assert torch.equal(param, params[name]), name
    with pytest.raises(ValueError, match="no batches"):
        recompute_batch_norm(ema.module, [])


def test_standing_statistics_make_eval_mode_match_batch_statistics() -> None:
    G = tiny_generator()
    train_forward(G)
    ema = EMA(G)
    for _ in range(5):  # averaged weights that differ from G's
        train_forward(G, steps=1)
        ema.update(G, decay=0.5)
    z, y = batch(G, 64, seed=7)
    copied = max(mismatch(s)[1] for s in pre_batch_norm_statistics(ema.module, z, y))
    ema.recompute_batch_norm([batch(G, 16, seed=s) for s in range(16)])
    for stats in pre_batch_norm_statistics(ema.module, z, y):
        offset, ratio = mismatch(stats)
        assert offset < 0.15 and ratio < 0.15, (offset, ratio)
    assert copied > 0.5  # G's statistics did not fit the averaged weights


# --- the trainer's G-EMA: grids, checkpoints, sagan sample ----------------------------------------


@pytest.mark.slow
def test_a_trained_g_ema_in_eval_mode_matches_its_batch_statistics_and_its_grid_is_reproducible(
    digits_data, tmp_path, capsys
) -> None:
    run = tmp_path / "run"
    # Decay 0.999 from step 0 (the old default): averaged weights far from G's, where G's statistics fit worst.
    args = ["train", "--config", str(CONFIGS / "smoke.yaml"), f"data.url={digits_data}", f"run.dir={run}",
            "trainer.max_steps=40", "trainer.sample_interval=20", "checkpoint.interval_steps=20",
            "trainer.ema_decay=0.999", "trainer.ema_rampup=0"]  # fmt: skip
    assert main(args) == 0
    state, manifest = load_folder(run / "checkpoints" / "step_40")
    cfg = from_dict(manifest["config"])
    G_ema, _ = build_models(cfg.model, manifest["num_classes"])
    G_ema.load_state_dict(state["G_ema"])
    G_ema.eval()
    z, y = batch(G_ema, 256, seed=123)
    # With G's statistics copied into G-EMA (main before issue #14) the first layer is off by 0.058 here.
    for stats in pre_batch_norm_statistics(G_ema, z, y):
        offset, ratio = mismatch(stats)
        assert offset < 0.05 and ratio < 0.05, (offset, ratio)
    # The images too: eval mode draws what G-EMA draws with batch statistics.
    with_batch_statistics = copy.deepcopy(G_ema)
    for layer in batch_norm_layers(with_batch_statistics):
        layer.train()
    with torch.no_grad():
        gap = (G_ema(z, y) - with_batch_statistics(z, y)).abs().mean()
    assert gap < 0.06, float(gap)  # 0.17 with G's statistics, 0.02 with G-EMA's own

    # sagan sample of a checkpoint draws its run's grid of that step, pixel for pixel, G-EMA beside G.
    for step in (20, 40):
        out = tmp_path / f"grid-{step}.png"
        capsys.readouterr()
        assert (
            main(["sample", "--checkpoint", str(run / "checkpoints" / f"step_{step}"), "--out", str(out)])
            == 0
        )
        assert f"wrote {out}" in capsys.readouterr().out
        trained = Image.open(run / "samples" / f"step_{step:07d}.png")
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(trained)), step
    assert (
        main(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "ema.png"), "--generator", "ema"])
        == 0
    )
    both, ema_only = (
        np.asarray(Image.open(tmp_path / "grid-40.png")),
        np.asarray(Image.open(tmp_path / "ema.png")),
    )
    assert ema_only.shape == (10 * 34 + 2, 8 * 34 + 2, 3)  # one row per class, 8 columns of 32x32
    label_height = both.shape[0] - ema_only.shape[0]
    assert np.array_equal(both[label_height:, : ema_only.shape[1]], ema_only)  # G-EMA is the left panel
    assert both.shape[1] > 2 * ema_only.shape[1]


@pytest.mark.slow
def test_a_save_does_not_wait_for_g_ema_statistics_and_readers_measure_them_the_trainers_way(
    digits_data, tmp_path, capsys
) -> None:
    """Checkpoints at steps 2, 4, 6, a grid at step 6 only: the saves of steps 2 and 4 hold G-EMA's
    statistics as last measured (not of their step; measuring them would stall the loop about a training
    step), and readers measure them by the saved recipe; step 6's are the grid's, used as saved."""
    run = tmp_path / "run"
    args = ["train", "--config", str(CONFIGS / "smoke.yaml"), f"data.url={digits_data}", f"run.dir={run}",
            "trainer.max_steps=6", "trainer.sample_interval=6", "checkpoint.interval_steps=2",
            "trainer.ema_rampup=0", "trainer.ema_decay=0.9"]  # fmt: skip
    assert main(args) == 0
    for step, measured in ((2, False), (4, False), (6, True)):
        state, manifest = load_folder(run / "checkpoints" / f"step_{step}")
        cfg = from_dict(manifest["config"])
        recipe = state["G_ema_statistics"]
        assert (recipe["step"] == step) is measured, recipe
        G, _ = build_models(cfg.model, NUM_CLASSES)
        load_ema_generator(G, state, NUM_CLASSES)
        by_hand, _ = build_models(cfg.model, NUM_CLASSES)
        by_hand.load_state_dict(state["G_ema"])
        if not measured:
            recompute_batch_norm(by_hand, batch_norm_inputs(recipe["seed"], recipe["num_batches"],
                                 recipe["batch_size"], cfg.model.z_dim, NUM_CLASSES, torch.device("cpu")))  # fmt: skip
        loaded, expected = dict(G.named_buffers()), dict(by_hand.named_buffers())
        running = [name for name in loaded if name.endswith("running_mean")]
        assert running
        for name in running:
            torch.testing.assert_close(loaded[name], expected[name], rtol=1e-5, atol=1e-6)
            saved = state["G_ema"][name]
            assert torch.equal(loaded[name], saved) is measured, name  # measured here iff not saved
    # sagan sample of step 4 draws that G-EMA; of step 6, the run's grid pixel for pixel.
    out = tmp_path / "grid-6.png"
    assert main(["sample", "--checkpoint", str(run / "checkpoints" / "step_6"), "--out", str(out)]) == 0
    trained = Image.open(run / "samples" / f"step_{6:07d}.png")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(trained))
    state, manifest = load_folder(run / "checkpoints" / "step_4")
    cfg = from_dict(manifest["config"])
    G, _ = build_models(cfg.model, NUM_CLASSES)
    load_ema_generator(
        to_training_layout(G, torch.device("cpu"), channels_last=True), state, NUM_CLASSES
    )  # the trainer's layout
    z, y = fixed_inputs(cfg.model.z_dim, list(range(NUM_CLASSES)), cfg.trainer.sample_columns, cfg.trainer.seed,
                        torch.device("cpu"))  # fmt: skip
    drawn = encode_panels({"G-EMA": draw(G, z, y)}, cfg.trainer.sample_columns)
    out = tmp_path / "ema-4.png"
    assert main(["sample", "--checkpoint", str(run / "checkpoints" / "step_4"), "--out", str(out), "--generator", "ema"]) == 0  # fmt: skip
    same = out.read_bytes() == drawn  # (pytest's diff of two PNGs' bytes would take many minutes)
    assert same, "sagan sample's grid is not the one drawn by hand"


def test_g_ema_loaded_into_a_trainer_is_measured_again_even_at_a_step_already_measured(
    digits_data, tmp_path
) -> None:
    """A non-finite reload (or any load) can bring other G-EMA weights back to a step whose statistics the
    trainer measured before: they must be measured again for the weights now loaded."""
    from trainer.config import load_config
    from trainer.runtime.distributed import init_runtime
    from trainer.trainer import Trainer

    overrides = [
        f"data.url={digits_data}",
        f"run.dir={tmp_path / 'run'}",
        "data.num_workers=0",
        "metrics.port=0",
    ]
    cfg = load_config(str(CONFIGS / "smoke.yaml"), overrides)
    trainer = Trainer(cfg, init_runtime("cpu"))
    trainer.ema_with_own_statistics()  # step 0: measured
    state = trainer.state_dict()
    with torch.no_grad():
        for name, value in state["G_ema"].items():
            if value.is_floating_point() and "running" not in name:
                value.add_(0.1 * torch.randn_like(value))  # other weights, the same step
    trainer.load_state_dict(state)
    measured = {
        n: b.clone()
        for n, b in trainer.ema_with_own_statistics().named_buffers()
        if n.endswith("running_var")
    }
    by_hand, _ = build_models(cfg.model, trainer.num_classes)
    by_hand.load_state_dict(state["G_ema"])
    recipe = trainer.ema_statistics_recipe()
    recompute_batch_norm(by_hand, batch_norm_inputs(**recipe, z_dim=cfg.model.z_dim,
                         num_classes=trainer.num_classes, device=torch.device("cpu")))  # fmt: skip
    expected = dict(by_hand.named_buffers())
    for name, value in measured.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
