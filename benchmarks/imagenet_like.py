"""ImageNet-like JPEGs for the data benchmarks: 500x375, natural-image statistics, one folder per class.

Nothing can be downloaded here, so each image is synthesised: a background of coloured noise with a
1/f amplitude spectrum (the spectrum of natural photographs), lit by a smooth gradient, with a
Fashion-MNIST garment (or a scikit-learn digit) upscaled into the foreground and sensor noise on
top, saved as a quality-90 JPEG. The class is the garment's class. At these settings a file is
60-90 KB, like an average ImageNet training JPEG.

    .venv/bin/python benchmarks/imagenet_like.py /tmp/imagenet-like --images 400
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 500, 375
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
FASHION_MNIST_LABELS = Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
JPEG_QUALITY = 90


def _objects() -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 foreground objects and their classes: Fashion-MNIST, else sklearn's digits."""
    if FASHION_MNIST.is_file():
        images = np.frombuffer(gzip.decompress(FASHION_MNIST.read_bytes()), np.uint8, offset=16)
        labels = np.frombuffer(gzip.decompress(FASHION_MNIST_LABELS.read_bytes()), np.uint8, offset=8)
        return images.reshape(-1, 28, 28)[:5000], labels[:5000].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(d).resize((28, 28), Image.BICUBIC)) for d in small]
    ), digits.target


def _pink_noise(rng: np.random.Generator, shape: tuple[int, int], exponent: float = 1.0) -> np.ndarray:
    """Zero-mean, unit-variance noise whose amplitude spectrum falls as 1/f**exponent."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    spectrum = (rng.standard_normal(radius.shape) + 1j * rng.standard_normal(radius.shape)) / radius**exponent
    spectrum[0, 0] = 0
    field = np.fft.irfft2(spectrum, s=shape)
    return field / field.std()


def synthesise(rng: np.random.Generator, obj: np.ndarray) -> Image.Image:
    """One 500x375 RGB photograph-like image around the 28x28 object ``obj``."""
    shape = (HEIGHT, WIDTH)
    base = rng.uniform(60, 190, size=3)
    tint = rng.uniform(-1, 1, size=(3, 3)) * 0.35 + np.eye(3)  # correlated colour channels
    texture = np.stack([_pink_noise(rng, shape) for _ in range(2)] + [_pink_noise(rng, shape, 1.4)], -1)
    background = base + 28 * texture @ tint
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH] / max(shape)
    angle = rng.uniform(0, 2 * np.pi)
    light = 0.75 + 0.5 * (np.cos(angle) * xs + np.sin(angle) * ys)  # a soft light gradient
    background *= light[..., None]
    side = int(rng.integers(200, 340))
    mask = np.asarray(Image.fromarray(obj).resize((side, side), Image.BICUBIC), dtype=np.float64) / 255
    colour = rng.uniform(20, 235, size=3)
    top, left = int(rng.integers(0, HEIGHT - side + 1)), int(rng.integers(0, WIDTH - side + 1))
    region = background[top : top + side, left : left + side]
    shading = colour * (0.8 + 0.2 * _pink_noise(rng, (side, side), 1.8)[..., None])
    region[:] = region * (1 - mask[..., None]) + shading * mask[..., None]
    pixels = background + rng.normal(0, 3.0, size=background.shape)  # sensor noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_imagenet_like(root: Path, num_images: int, *, num_classes: int = 10, seed: int = 0) -> list[Path]:
    """``num_images`` JPEGs under ``root/<class>/``, classes named like ImageNet synsets (n0000000c)."""
    objects, labels = _objects()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_images):
        index = int(rng.integers(len(objects)))
        label = int(labels[index]) % num_classes
        folder = root / f"n{label:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"n{label:08d}_{i}.JPEG"
        synthesise(rng, objects[index]).save(path, format="JPEG", quality=JPEG_QUALITY)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    paths = write_imagenet_like(args.root, args.images, num_classes=args.classes)
    sizes = [p.stat().st_size for p in paths]
    print(
        f"wrote {len(paths)} JPEGs of {WIDTH}x{HEIGHT} to {args.root}, mean {np.mean(sizes) / 1024:.1f} KiB"
    )


if __name__ == "__main__":
    main()
