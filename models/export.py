"""A generator as plain weights: spectral norm folded in, loadable with no checkpoint or training code.

An exported generator is a folder holding ``generator.safetensors`` (every tensor of the state dict,
fp32, NCHW contiguous) and ``generator.json`` (``EXPORT_FORMAT``, the ``Generator`` arguments under
``"model"``, and the tensors' names and shapes under ``"state_dict"``). The state dict is the one of a
``Generator`` whose spectral norm was folded (``fold_spectral_norm``): each spectral-normed weight is
the plain ``W / σ`` it had in eval mode (σ from the power-iteration vectors u, v saved with it, which
do not move in eval mode), under the layer's own ``weight`` key, and the u, v buffers are gone. Batch
norm keeps its running statistics (G-EMA's own) and runs in eval mode.

``load_exported_generator(folder)`` returns that ``Generator``, in eval mode, ready for ``G(z, y)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from models.attention import SelfAttention2d
from models.sagan import GBlock, Generator

EXPORT_FORMAT = "sagan-generator/1"
WEIGHTS_FILE = "generator.safetensors"
CONFIG_FILE = "generator.json"


def fold_spectral_norm(net: nn.Module) -> nn.Module:
    """``net`` in eval mode with every parametrization folded into a plain weight (``W / σ`` computed once),
    in place. A deep copy of a parametrized net shares its per-layer classes with the original, and
    folding changes them: fold a net of its own (load it again), never a copy of one still in use."""
    net.eval()
    for module in net.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return net


def for_tracing(G: Generator) -> Generator:
    """``G`` (folded) on the reference path a tracer records as plain operators, in place: attention on the
    math path, upsample-then-conv as the two ops (the fused forms are Python autograd functions), NCHW."""
    for module in G.modules():
        if isinstance(module, SelfAttention2d):
            module.impl = "math"
        elif isinstance(module, GBlock):
            module.fused_resample = False
    return G.to(memory_format=torch.contiguous_format).eval()


def export_state_dict(G: Generator) -> dict[str, torch.Tensor]:
    """The folded generator's tensors, fp32 (counters stay integers), detached, NCHW contiguous."""
    return {
        name: (tensor.float() if tensor.is_floating_point() else tensor).detach().cpu().contiguous()
        for name, tensor in G.state_dict().items()
    }


def write_exported_generator(G: Generator, model: dict[str, Any], folder: str | Path) -> list[Path]:
    """``generator.safetensors`` and ``generator.json`` of the folded ``G`` into ``folder``; ``model`` holds
    the ``Generator`` keyword arguments that rebuild it (resolution, num_classes, z_dim, channels, ...)."""
    from safetensors.torch import save_file

    if any(parametrize.is_parametrized(m) for m in G.modules()):
        raise ValueError(
            "the generator still has spectral-norm parametrizations: fold_spectral_norm it first"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = export_state_dict(G)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
    description = {
        "format": EXPORT_FORMAT,
        "model": model,
        "inputs": {"z": ["batch", model["z_dim"], "float32, N(0, 1)"], "y": ["batch", "int64 class"]},
        "output": ["batch", 3, model["resolution"], model["resolution"], "float32 in [-1, 1]"],
        "state_dict": {
            "spectral_norm": "folded (W / sigma in the layer's weight, no u, v)",
            "memory_format": "NCHW contiguous",
            "tensors": {
                name: [str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()
            },
        },
    }
    (folder / CONFIG_FILE).write_text(json.dumps(description, indent=1) + "\n")
    return [folder / WEIGHTS_FILE, folder / CONFIG_FILE]


def load_exported_generator(
    folder: str | Path, *, device: torch.device | str = "cpu", attention_impl: str | None = None
) -> Generator:
    """The ``Generator`` exported into ``folder`` (``write_exported_generator``), in eval mode on ``device``;
    ``attention_impl`` overrides the recorded one (``auto``, ``sdpa`` or ``math``: the same function)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        description = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"no exported generator at {folder}: cannot read {CONFIG_FILE} ({err})") from None
    if description.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"{folder / CONFIG_FILE} is format {description.get('format')!r}, not {EXPORT_FORMAT!r}"
        )
    model = dict(description["model"])
    if attention_impl is not None:
        model["attention_impl"] = attention_impl
    G = fold_spectral_norm(Generator(**model))
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"cannot read {folder / WEIGHTS_FILE}: {err}") from None
    G.load_state_dict(tensors, strict=True)
    return G.to(device).eval()
