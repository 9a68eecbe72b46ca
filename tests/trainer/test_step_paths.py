"""The step's fast paths compute what the plain path computes: channels_last, the attention kernel by size,
torch.compile's fallback."""

from __future__ import annotations

import copy
import logging

import torch

from models.sagan import ModelConfig, build_models
from trainer.backends.ddp import DDPBackend
from trainer.config import TrainerConfig
from trainer.runtime.distributed import Runtime

CPU = Runtime(0, 0, 1, torch.device("cpu"), "single")
BATCH, Z_DIM, CLASSES = 4, 16, 10


def tiny_backend(**trainer: object) -> DDPBackend:
    torch.manual_seed(0)
    G, D = build_models(ModelConfig(resolution=32, g_channels=8, d_channels=8, z_dim=Z_DIM), CLASSES)
    return DDPBackend(G, D, TrainerConfig(global_batch_size=BATCH, **trainer), CPU)


def two_steps(backend: DDPBackend) -> list[float]:
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(2):
        real = torch.rand(BATCH, 3, 32, 32, generator=generator) * 2 - 1
        y = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        z = torch.randn(BATCH, Z_DIM, generator=generator)
        losses += [backend.d_step(real, y, z, y).read().loss, backend.g_step(z, y).read().loss]
    return losses


def test_channels_last_steps_like_contiguous():
    """NHWC weights, activations, gradients and Adam moments: the same losses and D weights as NCHW. (Fused
    Adam walks parameter and gradient memory in step, so a gradient laid out otherwise would be wrong.)"""
    nhwc, nchw = tiny_backend(channels_last=True), tiny_backend(channels_last=False)
    conv = nhwc.D.blocks.block1.conv1.parametrizations.weight.original
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    losses_nhwc, losses_nchw = two_steps(nhwc), two_steps(nchw)
    torch.testing.assert_close(losses_nhwc, losses_nchw, rtol=1e-3, atol=0)
    # Adam (beta1 = 0) moves each weight by about lr * sign(gradient): where a gradient is rounding noise
    # (attention's q/k/v while gamma is 0), the summation order flips it. Every other weight agrees.
    for nets in ((nhwc.D, nchw.D), (nhwc.G, nchw.G)):
        diff = torch.cat([(a - b).abs().flatten() for a, b in zip(*(net.parameters() for net in nets))])
        assert float((diff <= 1e-5).float().mean()) > 0.97, f"up to {float(diff.max())}"
    state = nhwc.opt_d.state[conv]
    assert state["exp_avg"].is_contiguous(memory_format=torch.channels_last)


def test_channels_last_keeps_the_4x4_discriminator_block_nchw_on_a_cpu():
    """Under channels_last on a CPU the D block on 4x4 maps keeps NCHW weights and moments (oneDNN's NCHW
    convolutions are the faster ones there) and takes its input NCHW; the steps are the all-NCHW ones."""
    backends = []
    for channels_last in (True, False):
        torch.manual_seed(0)
        models = build_models(ModelConfig(resolution=64, g_channels=4, d_channels=8, z_dim=Z_DIM), CLASSES)
        backends.append(
            DDPBackend(*models, TrainerConfig(global_batch_size=BATCH, channels_last=channels_last), CPU)
        )
    blocks = backends[0].D.blocks
    small = blocks.block4.conv2.parametrizations.weight.original
    assert blocks.block4.input_side == 4 and small.is_contiguous()
    assert blocks.block3.conv2.parametrizations.weight.original.is_contiguous(
        memory_format=torch.channels_last
    )
    inputs = []
    blocks.block4.conv1.register_forward_pre_hook(lambda conv, args: inputs.append(args[0].is_contiguous()))
    losses = []
    for backend in backends:
        generator = torch.Generator().manual_seed(1)
        real = torch.rand(BATCH, 3, 64, 64, generator=generator) * 2 - 1
        y = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        z = torch.randn(BATCH, Z_DIM, generator=generator)
        losses.append([backend.d_step(real, y, z, y).read().loss, backend.g_step(z, y).read().loss])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=0)
    assert backends[0].opt_d.state[small]["exp_avg"].is_contiguous()
    assert inputs == [True, True]  # the D step's forward and the G step's


def test_compile_without_a_code_generator_trains_eagerly(monkeypatch, caplog):
    """trainer.compile=true where Inductor finds no C++ compiler: one warning, then the eager step exactly."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/g++"))
    with caplog.at_level(logging.WARNING, logger="trainer"):
        fallback = tiny_backend(compile=True, channels_last=False)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("trainer.compile=true, but Inductor finds no C++ compiler")
    assert warning.endswith("training runs eagerly")
    assert fallback.nets.d_train is fallback.D and fallback.nets.generate_for_d is fallback.G
    assert two_steps(fallback) == two_steps(tiny_backend(compile=False, channels_last=False))


def test_a_checkpoint_resumes_in_the_other_layout_with_the_same_updates():
    """Adam's moments saved NHWC load into NCHW parameters (and back) laid out as the parameters are: fused
    Adam walks parameter, gradient and moment memory in step, so moments in another layout would be
    applied to the wrong weights, silently."""
    for saved_nhwc in (True, False):
        saver = tiny_backend(channels_last=saved_nhwc)
        two_steps(saver)
        state = saver.state_dict()
        resumed = [tiny_backend(channels_last=layout) for layout in (saved_nhwc, not saved_nhwc)]
        for backend in resumed:
            backend.load_state_dict(copy.deepcopy(state))  # optimizers keep the tensors they load
            for opt in (backend.opt_g, backend.opt_d):
                for param, moments in opt.state.items():
                    assert moments["exp_avg"].stride() == param.stride()
                    assert moments["exp_avg_sq"].stride() == param.stride()
        losses = [two_steps(backend) for backend in resumed]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-3, atol=0)
        for nets in ((resumed[0].D, resumed[1].D), (resumed[0].G, resumed[1].G)):
            diff = torch.cat([(a - b).abs().flatten() for a, b in zip(*(net.parameters() for net in nets))])
            assert float((diff <= 1e-5).float().mean()) > 0.97, f"up to {float(diff.max())}"
