"""Sample grids: fixed noise and classes, drawn by G-EMA, saved as PNG."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

MAX_GRID_CLASSES = 10


def grid_classes(num_classes: int, classes: list[int] | None = None) -> list[int]:
    """The classes shown, one row each: all of them, or an even spread when there are many."""
    if classes:
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"class {bad[0]} is out of range: the model has classes 0..{num_classes - 1}")
        return list(classes)
    if num_classes <= MAX_GRID_CLASSES:
        return list(range(num_classes))
    return np.linspace(0, num_classes - 1, MAX_GRID_CLASSES).round().astype(int).tolist()


def fixed_inputs(
    z_dim: int, classes: list[int], columns: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same noise and labels every time, so grids from different steps are comparable."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(len(classes) * columns, z_dim, generator=generator)
    y = torch.tensor(classes, dtype=torch.long).repeat_interleave(columns)
    return z.to(device), y.to(device)


@torch.no_grad()
def draw(G: nn.Module, z: torch.Tensor, y: torch.Tensor, batch: int = 64) -> torch.Tensor:
    was_training = G.training
    G.eval()
    try:
        return torch.cat(
            [G(z[i : i + batch], y[i : i + batch]).float().cpu() for i in range(0, len(z), batch)]
        )
    finally:
        G.train(was_training)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] to (N, H, W, C) uint8."""
    scaled = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).numpy()


def encode_grid(images: torch.Tensor, columns: int, padding: int = 2) -> bytes:
    """Tile images row by row, ``columns`` per row, as the bytes of a PNG."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8)
    for i, image in enumerate(pixels):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        canvas[top : top + h, left : left + w] = image
    out = io.BytesIO()
    Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas).save(out, format="PNG")
    return out.getvalue()


def save_grid(images: torch.Tensor, path: str | Path, columns: int, padding: int = 2) -> Path:
    """Write the grid of ``images`` as a PNG file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(encode_grid(images, columns, padding))
    partial.replace(path)
    return path


def sample_grid(
    checkpoint_url: str, out: str | Path, *, classes: list[int] | None = None, columns: int = 8, seed: int = 0
) -> Path:
    """Draw a grid from a checkpoint's G-EMA: one row per class, ``columns`` samples each."""
    from models.sagan import build_models
    from trainer.checkpoint import load_folder, resolve
    from trainer.config import from_dict

    state, manifest = load_folder(resolve(checkpoint_url))
    cfg = from_dict(manifest["config"])
    G, _ = build_models(cfg.model, manifest["num_classes"])
    G.load_state_dict(state["G_ema"])
    rows = grid_classes(manifest["num_classes"], classes)
    z, y = fixed_inputs(cfg.model.z_dim, rows, columns, seed, torch.device("cpu"))
    return save_grid(draw(G, z, y), out, columns)
