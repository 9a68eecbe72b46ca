"""Sample grids: fixed noise and classes, one row per class, drawn by G-EMA and G, saved as PNG.

The trainer's grids (``<run>/samples/step_N.png``) hold two labelled panels, G-EMA on the left and
the live G on the right, drawn from the same noise; ``sagan sample`` draws the same from a checkpoint.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

MAX_GRID_CLASSES = 10
PANEL_GAP = 12  # pixels between the G-EMA and G panels
LABEL_HEIGHT = 14  # the strip above each panel holding its name


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
    z = z.to(next(G.parameters()).dtype)  # DeepSpeed's bf16/fp16 G takes noise of its own dtype
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


def tile(images: torch.Tensor, columns: int, padding: int = 2) -> np.ndarray:
    """Images row by row, ``columns`` per row, on a white canvas: (H, W, C) uint8."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8)
    for i, image in enumerate(pixels):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        canvas[top : top + h, left : left + w] = image
    return canvas


def _png(canvas: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(canvas.squeeze(-1) if canvas.shape[-1] == 1 else canvas).save(out, format="PNG")
    return out.getvalue()


def encode_grid(images: torch.Tensor, columns: int, padding: int = 2) -> bytes:
    """Tile images row by row, ``columns`` per row, as the bytes of a PNG."""
    return _png(tile(images, columns, padding))


def encode_panels(panels: dict[str, torch.Tensor], columns: int, padding: int = 2) -> bytes:
    """Grids of the same noise side by side, left to right, each under its name (e.g. G-EMA, G), as PNG bytes."""
    grids = [tile(images, columns, padding) for images in panels.values()]
    if len(grids) == 1:
        return _png(grids[0])
    h, w, c = grids[0].shape
    canvas = np.full((LABEL_HEIGHT + h, len(grids) * w + (len(grids) - 1) * PANEL_GAP, c), 255, np.uint8)
    for i, grid in enumerate(grids):
        canvas[LABEL_HEIGHT:, i * (w + PANEL_GAP) : i * (w + PANEL_GAP) + w] = grid
    image = Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas)
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=LABEL_HEIGHT - 3)
    for i, name in enumerate(panels):
        draw.text(
            (i * (w + PANEL_GAP) + w // 2, LABEL_HEIGHT // 2), name, fill=(0,) * c, font=font, anchor="mm"
        )
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_atomically(data: bytes, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)
    return path


def sample_grid(
    checkpoint_url: str,
    out: str | Path,
    *,
    classes: list[int] | None = None,
    columns: int | None = None,
    seed: int | None = None,
    generator: str = "both",
) -> Path:
    """Draw a checkpoint's G-EMA (``ema``), G (``g``) or both side by side (``both``): one row per class.

    By default with the trainer's noise, so the grid of a checkpoint of step N is its run's
    ``samples/step_N.png`` (``trainer.checkpoint.generator`` loads them as the trainer drew them).
    """
    from trainer.checkpoint.generator import GENERATORS, load_generators

    if generator not in (*GENERATORS, "both"):
        raise ValueError(f"--generator {generator!r} is not one of ema, g, both")
    loaded = load_generators(checkpoint_url, tuple(GENERATORS) if generator == "both" else (generator,))
    cfg = loaded.config
    columns = columns or cfg.trainer.sample_columns
    rows = grid_classes(loaded.num_classes, classes)
    z, y = fixed_inputs(
        cfg.model.z_dim, rows, columns, cfg.trainer.seed if seed is None else seed, torch.device("cpu")
    )
    panels = {GENERATORS[key]: draw(G, z, y) for key, G in loaded.nets.items()}
    return write_atomically(encode_panels(panels, columns), out)
