"""After trainer.nonfinite_reload_after skipped (non-finite) updates in a row the run goes back to the
newest checkpoint from before them, counted in sagan_nonfinite_reloads_total; when that cannot help
it stops with one line. The faults are real ones, injected from outside the trainer: a weight set to
NaN (memory corruption), and a forward hook that poisons every D input (a broken device)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer.config import load_config
from trainer.runtime.distributed import Runtime
from trainer.runtime.nonfinite import Diverged, NonFiniteGuard
from trainer.trainer import Trainer

ONE_PROCESS = Runtime(0, 0, 1, torch.device("cpu"), "single")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_run(data, run_dir, *overrides: str):
    cfg = load_config(
        "configs/smoke.yaml",
        [
            f"data.url={data}", "data.prepare_source=", "data.num_workers=0", f"run.dir={run_dir}",
            "model.g_channels=8", "model.d_channels=8", "model.z_dim=16", "metrics.port=0",
            "trainer.global_batch_size=8", "trainer.log_interval=1", "trainer.sample_interval=100000",
            "checkpoint.interval_steps=2", "trainer.nonfinite_reload_after=4", *overrides,
        ],
    )  # fmt: skip
    return cfg, Trainer(cfg, ONE_PROCESS)


def metric(trainer: Trainer, name: str) -> float:
    return trainer.metrics.registry.get_sample_value(name)


def finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_a_corrupted_weight_is_repaired_by_reloading_the_last_good_checkpoint(digits_data, tmp_path, caplog):
    cfg, trainer = tiny_run(digits_data, tmp_path, "trainer.max_steps=4")
    trainer.train()
    before = trainer.stream.state_dict()
    with torch.no_grad():
        next(trainer.backend.D.parameters()).view(-1)[0] = math.nan  # a bit flip in D's first weight
    cfg.trainer.max_steps, cfg.checkpoint.resume = 8, False  # go on in memory, with the corrupted weight
    trainer.train()
    # Steps 5 and 6: every update skipped (4 = 2 steps x (1 D + 1 G)); back to step_4, then 4 good steps.
    assert (
        "4 consecutive non-finite updates since step 4: reloaded checkpoint step_4 (reload 1 of 3)"
        in caplog.text
    )
    assert metric(trainer, "sagan_nonfinite_reloads_total") == 1
    assert metric(trainer, "sagan_nonfinite_steps_total") == 4
    assert trainer.step == 8 and finite(trainer.backend.D) and finite(trainer.backend.G)
    after = trainer.stream.state_dict()
    consumed = [sum(e - s for _, s, e in state["remaining"]) for state in (before, after)]
    assert consumed[0] - consumed[1] == 6 * 8  # 6 steps of data: the two that went wrong are not replayed
    assert json.loads(trainer.state_dict()["data"])["remaining"] == after["remaining"]


def test_a_fault_that_stays_ends_the_run_after_the_allowed_reloads(digits_data, tmp_path):
    cfg, trainer = tiny_run(digits_data, tmp_path, "trainer.max_steps=2", "trainer.nonfinite_max_reloads=2")
    trainer.train()
    trainer.backend.D.register_forward_pre_hook(lambda _module, args: (args[0] * math.nan, *args[1:]))
    cfg.trainer.max_steps, cfg.checkpoint.resume = 100, False
    with pytest.raises(Diverged) as raised:
        trainer.train()
    message = str(raised.value)
    assert message.startswith("4 consecutive non-finite updates since step 2, after 2 reloads of an earlier")
    assert "trainer.nonfinite_max_reloads=2" in message and "\n" not in message
    assert metric(trainer, "sagan_nonfinite_reloads_total") == 2


def test_no_checkpoint_before_the_skips_is_a_one_line_error(digits_data, tmp_path):
    _, trainer = tiny_run(digits_data, tmp_path, "trainer.max_steps=10")
    with torch.no_grad():
        next(trainer.backend.G.parameters()).view(-1)[0] = math.inf
    with pytest.raises(
        Diverged, match=r"^4 consecutive non-finite updates since step 0 and no checkpoint from"
    ):
        trainer.train()


def test_the_guard_counts_only_consecutive_skips():
    guard = NonFiniteGuard(reload_after=3, max_reloads=1)
    for step, skipped in enumerate((1.0, 1.0, 0.0, 1.0, 1.0)):
        guard.observe(torch.tensor(skipped), step=5 + step)
    assert not guard.poll() and guard.consecutive == 2
    guard.observe(torch.tensor(1.0), step=10)
    assert guard.poll() and guard.check_reload_allowed() == 8  # the run of skips began at step 8
    guard.reloaded()
    assert not guard.reload_due and not guard.poll()
    assert not NonFiniteGuard(reload_after=0, max_reloads=3).poll()  # 0: never
