"""The training step never waits for the device: host synchronisations counted around ``Trainer.train()``.

A host synchronisation is any op that copies a device scalar to Python (``.item()``, ``float()``,
``bool()`` or ``if`` on a tensor): all of them dispatch ``aten._local_scalar_dense``, which a
``TorchDispatchMode`` sees. On a GPU each one drains the device's queue; in a job of many ranks a
straggler stalls every rank there. The loop reads losses, norms and the skipped-update count only at
the log interval, so steady-state steps must have none (the issue's bar: at most one). On CUDA,
``Update.read()``'s copy to the host is a synchronisation the counter does not see (on the CPU there is none).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.host_syncs import HostSyncCounter
from trainer.config import load_config
from trainer.observability.run_log import read_run_log
from trainer.runtime.distributed import init_runtime
from trainer.trainer import Trainer

TINY = [
    "model.g_channels=8",
    "model.d_channels=8",
    "model.z_dim=16",
    "trainer.global_batch_size=8",
    "data.num_workers=0",
    "metrics.port=0",
    "checkpoint.resume=false",
]
QUIET = ["trainer.log_interval=1000", "trainer.sample_interval=1000", "checkpoint.interval_steps=1000"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_trainer(data, run_dir, *overrides: str) -> Trainer:
    cfg = load_config("configs/smoke.yaml", [f"data.url={data}", f"run.dir={run_dir}", *TINY, *overrides])
    return Trainer(cfg, init_runtime("cpu"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_steady_state_ddp_step_has_no_host_synchronisation(digits_data, tmp_path, precision):
    """Step s's D and G updates and EMA run while ``trainer.step == s``; the step's log, samples and
    checkpoint run after it counts up. Logging only after the last step, steps 1..N-1 are steady state
    (step 0 also creates the optimizers' state and starts the data stream)."""
    steps = 4
    trainer = tiny_trainer(
        digits_data, tmp_path, f"trainer.precision={precision}", f"trainer.max_steps={steps}", *QUIET
    )
    with HostSyncCounter(lambda: trainer.step) as counter:
        trainer.train()
    steady = [counter.by_step[step] for step in range(1, steps)]
    assert max(steady) <= 1, (
        f"{precision}: host synchronisations in steady-state steps 1..{steps - 1}: {steady}"
    )
    assert counter.by_step[steps] > 0  # the log after the last step reads the values: the counter sees them
    log = read_run_log(tmp_path).to_pydict()
    assert log["step"] == [steps] and all(math.isfinite(v) for v in log["loss_d"] + log["grad_norm_g"])


def test_the_counter_sees_per_parameter_adam():
    """The counter can fail: torch's per-parameter Adam reads each parameter's step count on the host."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    adam = torch.optim.Adam(params, foreach=False)
    for param in params:
        param.grad = torch.ones(3)
    with HostSyncCounter() as counter:
        adam.step()
    assert counter.by_step[0] == len(params)


def test_skipped_updates_are_counted_on_the_device_and_change_nothing(digits_data, tmp_path):
    """A NaN in one of D's weights makes every D and G loss NaN: each update is skipped (weights, Adam's
    moments and step count untouched) and counted in sagan_nonfinite_steps_total when the loop logs."""
    trainer = tiny_trainer(digits_data, tmp_path, "trainer.max_steps=3", "trainer.log_interval=2", *QUIET[1:])
    D, G = trainer.backend.D, trainer.backend.G
    with torch.no_grad():
        D.blocks.block0.conv1.parametrizations.weight.original[0, 0, 0, 0] = math.nan
    before = [p.detach().clone() for p in (*D.parameters(), *G.parameters())]
    trainer.train()
    after = [p.detach() for p in (*D.parameters(), *G.parameters())]
    for old, new in zip(before, after):
        torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True)
    assert trainer.metrics.registry.get_sample_value("sagan_nonfinite_steps_total") == 2 * 3
    adam_steps = {float(state["step"]) for opt in (trainer.backend.opt_d, trainer.backend.opt_g)
                  for state in opt.state.values()}  # fmt: skip
    assert adam_steps == {0.0}
    log = read_run_log(tmp_path).to_pydict()
    assert log["step"] == [2, 3] and all(math.isnan(value) for value in log["loss_d"] + log["loss_g"])
