"""The dataset's own classifier: a small CNN trained on its real training images, cached by manifest hash.

It is the ``classifier`` feature extractor (features: the pooled last conv layer; logits: its
classes) and the judge of class accuracy of conditional samples. Its accuracy on held-out real
images (a test split given with ``--test-data``, else every 10th image of the training data, which
is then left out of training) is recorded with it and reported beside every sample accuracy: samples
cannot be expected to score higher than real images.

Saved as ``<dataset>/eval/classifier-<manifest hash>.pt``: tensors and a JSON string, loaded with
``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.errors import DataError, ObjectNotFound
from data_pipeline.manifest import read_manifest
from data_pipeline.storage import open_store
from evaluation.real import EVAL_FOLDER, dataset_hash, read_images

log = logging.getLogger("evaluation")

HOLDOUT_EVERY = 10  # without a test split, every 10th training image is held out
MAX_TRAIN_IMAGES = 200_000  # the classifier trains on at most this many images, held in memory
BATCH_SIZE = 128
LEARNING_RATE = 2e-3


class SmallCNN(nn.Module):
    """uint8 images (B, 3, S, S) -> (features (B, 4*width), logits (B, num_classes)).

    Three stages of 3x3 conv + BN + ReLU, each halving the size; global average pooling.
    """

    def __init__(self, num_classes: int, width: int = 16, image_size: int = 32):
        super().__init__()
        self.image_size = image_size
        widths = [3, width, 2 * width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(itertools.pairwise(widths)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            if index != 2:  # pool after the 1st, 2nd and 4th conv: S -> S/8
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.float() / 127.5 - 1.0
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        features = self.body(x).mean(dim=(2, 3))
        return features, self.head(features)


@dataclass
class ClassifierInfo:
    dataset_hash: str
    num_classes: int
    image_size: int
    width: int
    epochs: int
    num_train: int
    held_out: str  # what the accuracy was measured on
    num_held_out: int
    accuracy: float  # on the held-out real images
    seconds: float


def classifier_name(digest: str) -> str:
    return f"{EVAL_FOLDER}/classifier-{digest}.pt"


def classifier_bytes(model: SmallCNN, info: ClassifierInfo) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state": model.state_dict(), "info": json.dumps(asdict(info))}, buffer)
    return buffer.getvalue()


def save_classifier(url: str, model: SmallCNN, info: ClassifierInfo) -> str:
    """Cache the classifier next to the dataset at ``url`` (one atomic write); returns where."""
    store = open_store(url)
    name = classifier_name(info.dataset_hash)
    store.write_bytes(name, classifier_bytes(model, info))
    return store.url_of(name)


def classifier_from_bytes(payload: bytes) -> tuple[SmallCNN, ClassifierInfo, str]:
    """(network, info, weights hash) of a saved classifier."""
    saved = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    info = ClassifierInfo(**json.loads(saved["info"]))
    model = SmallCNN(info.num_classes, info.width, info.image_size)
    model.load_state_dict(saved["state"])
    return model.eval().requires_grad_(False), info, hashlib.sha256(payload).hexdigest()[:12]


@torch.no_grad()
def accuracy(model: SmallCNN, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        _, logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(1, len(images))


def _fit(model: SmallCNN, images: Tensor, labels: Tensor, epochs: int, generator: torch.Generator) -> None:
    """Adam with a one-cycle schedule, mini-batches of 128, ``epochs`` passes."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    steps_per_epoch = max(1, len(images) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, LEARNING_RATE, total_steps=epochs * steps_per_epoch
    )
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
            _, logits = model(images[index])
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log.info("classifier epoch %d/%d: last loss %.3f", epoch + 1, epochs, float(loss.detach()))


def train_classifier(
    data_url: str,
    *,
    test_url: str = "",
    epochs: int = 2,
    width: int = 16,
    seed: int = 0,
    num_workers: int = 0,
    limit: int = 0,
) -> tuple[SmallCNN, ClassifierInfo]:
    """Train on the real images of ``data_url`` (the first ``limit``, at most MAX_TRAIN_IMAGES: they are held
    in memory) and measure held-out accuracy."""
    started = time.perf_counter()
    manifest = read_manifest(data_url)
    if manifest.num_classes < 2:
        raise DataError(
            f"the dataset at {data_url} has {manifest.num_classes} class: a classifier needs 2 or more"
        )
    limit = min(limit or MAX_TRAIN_IMAGES, MAX_TRAIN_IMAGES)
    images, labels = read_images(data_url, limit=limit, num_workers=num_workers)
    if test_url:
        test_manifest = read_manifest(test_url)
        if test_manifest.num_classes != manifest.num_classes:
            raise DataError(
                f"the test data at {test_url} has {test_manifest.num_classes} classes, the training data "
                f"{manifest.num_classes}: give the test split of the same dataset"
            )
        test_images, test_labels = read_images(
            test_url, resolution=manifest.image_size, num_workers=num_workers
        )
        held_out = f"test split {test_url}"
    else:
        held = torch.arange(len(images)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        test_images, test_labels = images[held], labels[held]
        images, labels = images[~held], labels[~held]
        held_out = f"every {HOLDOUT_EVERY}th image of {data_url} (not trained on)"
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # a training run's random state must not depend on a cache
        torch.manual_seed(seed)
        model = SmallCNN(manifest.num_classes, width, manifest.image_size)
    with torch.enable_grad():  # also when called from inside an evaluation (under no_grad)
        _fit(model, images, labels, epochs, generator)
    model.eval().requires_grad_(False)
    info = ClassifierInfo(
        dataset_hash=dataset_hash(data_url),
        num_classes=manifest.num_classes,
        image_size=manifest.image_size,
        width=width,
        epochs=epochs,
        num_train=len(images),
        held_out=held_out,
        num_held_out=len(test_images),
        accuracy=accuracy(model, test_images, test_labels),
        seconds=round(time.perf_counter() - started, 1),
    )
    return model, info


def classifier_payload(
    data_url: str, *, epochs: int, width: int, test_url: str = "", num_workers: int = 0
) -> bytes:
    """The saved bytes of the dataset's cached classifier; trained and cached first if there is none."""
    store, name = open_store(data_url), classifier_name(dataset_hash(data_url))
    try:
        return store.read_bytes(name)
    except ObjectNotFound:
        pass
    log.info("no classifier for %s yet: training one (%d epochs)", data_url, epochs)
    model, info = train_classifier(
        data_url, test_url=test_url, epochs=epochs, width=width, num_workers=num_workers
    )
    log.info("classifier: %.1f%% on %s", 100 * info.accuracy, info.held_out)
    payload = classifier_bytes(model, info)
    try:
        store.write_bytes(name, payload)
    except (DataError, OSError) as err:  # a read-only dataset: used all the same, trained again next time
        log.warning("could not cache the classifier at %s (%s)", store.url_of(name), err)
    return payload
