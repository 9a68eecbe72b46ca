"""A trained generator from a checkpoint, ready for inference: the one way ``sagan sample``, ``sagan eval``,
export and generate load one.

``load_generators(url)`` takes a run folder, a checkpoints folder or a step folder (local or ``s3://``)
and returns G-EMA (with the batch-norm statistics of the checkpoint's own step, measured by the
trainer's recipe: ``models.ema.load_ema_generator``) and/or G, in eval mode, in the memory layout the
trainer trained and drew them in (layouts round differently), ready for ``G(z, y)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.ema import load_ema_generator
from models.layout import to_training_layout
from models.sagan import build_models
from trainer.checkpoint.format import load_folder
from trainer.checkpoint.resume import resolve
from trainer.config import Config, from_dict

GENERATORS = {"ema": "G-EMA", "g": "G"}  # the choices, and how grids and results name them


@dataclass
class TrainedGenerators:
    nets: dict[str, nn.Module]  # "ema" and/or "g" -> the generator, in eval mode
    step: int
    config: Config  # the run's resolved config, from the checkpoint
    num_classes: int
    folder: str  # the checkpoint folder read
    manifest: dict[str, Any]


def load_generators(
    checkpoint_url: str, which: tuple[str, ...] = ("ema",), device: torch.device | str = "cpu"
) -> TrainedGenerators:
    """G-EMA (``"ema"``) and/or G (``"g"``) of the checkpoint at ``checkpoint_url``, on ``device``."""
    unknown = [key for key in which if key not in GENERATORS]
    if unknown:
        raise ValueError(f"generator {unknown[0]!r} is not one of {', '.join(GENERATORS)}")
    folder = resolve(checkpoint_url)
    state, manifest = load_folder(folder)
    cfg = from_dict(manifest["config"])
    num_classes = manifest["num_classes"]
    device = torch.device(device)
    # The layout the trainer trained and drew in: DDP's channels_last (DeepSpeed keeps NCHW).
    channels_last = cfg.trainer.channels_last and cfg.trainer.backend == "ddp"
    nets = {}
    for key in which:
        G, _ = build_models(cfg.model, num_classes)
        to_training_layout(G, device, channels_last=channels_last)
        if key == "ema":
            load_ema_generator(G, state, num_classes)
        else:
            G.load_state_dict(state["backend"]["G"])
        nets[key] = G.eval()
    return TrainedGenerators(nets, int(manifest["step"]), cfg, num_classes, folder, manifest)
