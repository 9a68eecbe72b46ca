"""The dtype audit: one D step and one G step for every backend × precision the project offers, with
CUDA's batch-norm contract (fp32 statistics for half inputs). Every convolution and linear layer must
get its input in its weight's dtype, or in autocast's (the nets' own inputs excepted: autocast casts
those once); the bytes of activations saved for backward are reported by dtype, and in a half-precision
run most of them are half.

On the CPU: ddp in fp32, bf16 and fp16 autocast; deepspeed ZeRO 0, 1 and 2 in bf16 (DeepSpeed's CPU
accelerator has no fp16). The CUDA suite runs every one of them on a GPU (``tests/system/test_cuda.py``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.support.paths import ROOT

HALF = (torch.bfloat16, torch.float16)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def cuda_batch_norm_statistics():
    cpu_kernel = torch.batch_norm_update_stats

    def with_cuda_dtypes(x, running_mean, running_var, momentum):
        mean, var = cpu_kernel(x, running_mean, running_var, momentum)
        return (mean.float(), var.float()) if x.dtype in HALF else (mean, var)

    torch.batch_norm_update_stats = with_cuda_dtypes
    try:
        yield
    finally:
        torch.batch_norm_update_stats = cpu_kernel


def audit(backend: str, precision: str, zero_stage: int = 0, device: str = "cpu") -> dict:
    """One D and one G step of a tiny SAGAN: the layers whose input had another dtype, and the bytes of
    activations saved for backward by dtype."""
    from models.sagan import build_models
    from trainer.backends import make_backend
    from trainer.config import load_config
    from trainer.runtime.distributed import Runtime

    cfg = load_config(
        None,
        [
            "model.resolution=32", "model.g_channels=8", "model.d_channels=8", "model.z_dim=16",
            "model.num_classes=10", "trainer.global_batch_size=4", f"trainer.backend={backend}",
            f"trainer.precision={precision}", f"trainer.zero_stage={zero_stage}",
        ],
    )  # fmt: skip
    torch.manual_seed(0)
    device = torch.device(device)
    G, D = build_models(cfg.model, 10)
    runtime = Runtime(0, 0, 1, device, "single")
    autocast_dtype = DTYPES[precision] if backend == "ddp" and precision != "fp32" else None
    wrong: list[str] = []
    net_inputs: set[int] = set()
    params = {p.data_ptr() for net in (G, D) for p in net.parameters()}

    def remember_inputs(module, args):
        net_inputs.update(id(a) for a in args if isinstance(a, torch.Tensor))

    def check(module, args, output):
        x = args[0]
        weight = (
            module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
        )
        expected = autocast_dtype or weight.dtype
        if x.dtype != expected and not (autocast_dtype and id(x) in net_inputs):
            wrong.append(f"{type(module).__name__} {tuple(x.shape)}: input {x.dtype}, expected {expected}")

    with cuda_batch_norm_statistics():
        backend_ = make_backend(G, D, cfg.trainer, runtime)
        for net in (backend_.G, backend_.D):
            net.register_forward_pre_hook(remember_inputs)
            for module in net.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    module.register_forward_hook(check)
        saved = collections.Counter()

        def pack(tensor):
            if tensor.data_ptr() not in params and tensor.is_floating_point():
                saved[str(tensor.dtype).removeprefix("torch.")] += tensor.numel() * tensor.element_size()
            return tensor

        generator = torch.Generator().manual_seed(1)
        real = (torch.rand(4, 3, 32, 32, generator=generator) * 2 - 1).to(device)
        y = torch.randint(0, 10, (4,), generator=generator).to(device)
        z = torch.randn(4, 16, generator=generator).to(device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            d = backend_.d_step(real, y, z, y).read()
            g = backend_.g_step(z, y).read()
    return {"wrong": wrong, "saved": dict(saved), "losses": [d.loss, g.loss]}


def check_result(name: str, precision: str, result: dict) -> None:
    assert not result["wrong"], f"{name}: " + "; ".join(result["wrong"][:5])
    assert all(torch.isfinite(torch.tensor(result["losses"]))), result["losses"]
    saved = result["saved"]
    total = sum(saved.values())
    print(f"{name}: activations saved for backward " + ", ".join(
        f"{dtype} {nbytes / 2**10:.0f} KiB ({100 * nbytes / total:.0f}%)" for dtype, nbytes in sorted(saved.items())
    ))  # fmt: skip
    if precision != "fp32":
        assert saved.get(precision.replace("bf16", "bfloat16").replace("fp16", "float16"), 0) > total / 2, (
            saved
        )


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_ddp_layers_get_their_inputs_in_the_compute_dtype(precision):
    check_result(f"ddp {precision}", precision, audit("ddp", precision))


WORKER = """
import json, sys
from tests.trainer.test_dtype_audit import audit
print("AUDIT " + json.dumps({stage: audit("deepspeed", "bf16", stage) for stage in (0, 1, 2)}))
"""


def test_deepspeed_zero_0_1_2_layers_get_their_inputs_in_the_compute_dtype():
    """In a process of its own: DeepSpeed's engines need a process group, which stays for the process."""
    done = subprocess.run(
        [sys.executable, "-c", WORKER], cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("AUDIT "))
    for stage, result in json.loads(line.removeprefix("AUDIT ")).items():
        check_result(f"deepspeed ZeRO {stage} bf16", "bf16", result)
