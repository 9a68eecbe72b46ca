"""The evaluator: generates samples on every rank, embeds them, gathers the features and scores them."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from evaluation.config import EvalConfig
from evaluation.extractors import (
    FeatureExtractor,
    classifier_extractor,
    efficientnet_extractor,
    inception_extractor,
)
from evaluation.extractors.classifier import classifier_from_bytes, classifier_payload
from evaluation.real import read_images, real_features
from evaluation.results import EvalResult
from evaluation.scores import feature_statistics, frechet_distance, inception_score, kernel_inception_distance


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] to uint8, as saved images are."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def sample_inputs(
    num_samples: int, z_dim: int, class_weights: np.ndarray, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """z and labels of every sample of an evaluation: a function of (seed, sample index) only."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num_samples, z_dim, generator=generator)
    weights = torch.as_tensor(class_weights, dtype=torch.float64)
    y = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
    return z, y


def _gather(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rank-ordered concatenation of every rank's rows (ranks may hold different numbers of rows)."""
    if world_size == 1:
        return tensor
    from torchmetrics.utilities.distributed import gather_all_tensors

    return torch.cat(gather_all_tensors(tensor.contiguous()))


def _broadcast(value: Any, world_size: int) -> Any:
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Evaluator:
    """Scores generators (and real image sets) against a dataset's reference images.

    Construct it on every rank; ``evaluate`` is a collective. Building the extractors and the
    reference features (and, when needed, training the dataset classifier) happens at the first
    evaluation, on rank 0, the classifier then being sent to the other ranks.
    """

    def __init__(
        self,
        cfg: EvalConfig,
        *,
        data_url: str,
        resolution: int,
        z_dim: int,
        num_classes: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
    ):
        if cfg.num_samples < world_size:
            raise ValueError(
                f"eval.num_samples={cfg.num_samples} is smaller than the world size {world_size}: "
                "every rank generates a slice of the samples; use at least one per rank"
            )
        self.cfg, self.data_url = cfg, data_url
        self.reference_url = cfg.reference_url or data_url
        self.resolution, self.z_dim, self.num_classes = resolution, z_dim, num_classes
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.extractor: FeatureExtractor | None = None
        self.classifier: FeatureExtractor | None = None
        self.classifier_info = None
        self.reference = None
        self.class_weights: np.ndarray | None = None

    @property
    def needs_classifier(self) -> bool:
        return self.cfg.extractor == "classifier" or "accuracy" in self.cfg.metrics

    # -- set-up -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        if self.extractor is not None:
            return
        if self.needs_classifier:
            payload = None
            if self.rank == 0:
                held_out = self.cfg.reference_url if self.cfg.reference_url not in ("", self.data_url) else ""
                payload = classifier_payload(
                    self.data_url,
                    epochs=self.cfg.classifier_epochs,
                    width=self.cfg.classifier_width,
                    test_url=held_out,
                    num_workers=self.num_workers,
                )
            network, self.classifier_info, fingerprint = classifier_from_bytes(
                _broadcast(payload, self.world_size)
            )
            self.classifier = classifier_extractor(network, fingerprint, self.device)
        if self.cfg.extractor == "classifier":
            self.extractor = self.classifier
        elif self.cfg.extractor == "efficientnet-lite0":
            self.extractor = efficientnet_extractor(self.device)
        else:
            self.extractor = inception_extractor(self.cfg.inception_weights, self.device)
        self.class_weights = _class_weights(self.data_url, self.num_classes)
        if self.rank == 0 and {"fid", "kid"} & set(self.cfg.metrics):
            self.reference = self._real(self.reference_url, self.cfg.num_reference)

    def _real(self, url: str, limit: int):
        return real_features(
            url,
            self.extractor,
            limit=limit,
            resolution=self.resolution,
            batch_size=self.cfg.batch_size,
            num_workers=self.num_workers,
        )

    # -- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, generator: nn.Module, *, step: int | None = None, name: str = "G-EMA") -> EvalResult:
        """Score ``generator`` (the bare module, not a DDP wrapper); every rank calls this.

        This is the one place G-EMA is evaluated from; a generator needing preparation (standing
        batch-norm statistics) is prepared by the caller before it is passed in.
        """
        started = time.perf_counter()
        self.setup()
        n = self.cfg.num_samples
        z, y = sample_inputs(n, self.z_dim, self.class_weights, self.cfg.seed)
        lo, hi = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        was_training = generator.training
        generator.eval()
        features, logits, predicted = [], [], []
        try:
            for start in range(lo, hi, self.cfg.batch_size):
                stop = min(start + self.cfg.batch_size, hi)
                images = quantise(generator(z[start:stop].to(self.device), y[start:stop].to(self.device)))
                f, lg = self.extractor(images)
                features.append(f)
                logits.append(lg)
                if "accuracy" in self.cfg.metrics:
                    predicted.append(
                        self.classifier(images)[1].argmax(1)
                        if self.classifier is not self.extractor
                        else lg.argmax(1)
                    )
        finally:
            generator.train(was_training)
        empty = torch.empty(0, device=self.device)
        features_all = _gather(torch.cat(features) if features else empty.view(0, 0), self.world_size)
        logits_all = _gather(torch.cat(logits) if logits else empty.view(0, 0), self.world_size)
        predicted_all = _gather(torch.cat(predicted), self.world_size) if predicted else None
        metrics = None
        if self.rank == 0:
            metrics = self._score(
                features_all.cpu().numpy(),
                logits_all.cpu().numpy(),
                None if predicted_all is None else (predicted_all.cpu().numpy() == y.numpy()),
            )
        metrics = _broadcast(metrics, self.world_size)
        return self._result(name, step, n, metrics, time.perf_counter() - started)

    def evaluate_real(self, url: str, *, limit: int | None = None, name: str | None = None) -> EvalResult:
        """Score real images (e.g. the training split against a test split: the floor of FID). One process."""
        started = time.perf_counter()
        self.setup()
        count = self.cfg.num_samples if limit is None else limit
        real = self._real(url, count)
        correct = None
        if "accuracy" in self.cfg.metrics:
            if self.classifier is self.extractor:
                class_logits = real.logits
            else:
                images, _ = read_images(url, limit=count, resolution=self.resolution)
                class_logits = np.concatenate(
                    [self.classifier(images[i : i + 500])[1].numpy() for i in range(0, len(images), 500)]
                )
            correct = class_logits.argmax(1) == real.labels
        metrics = self._score(real.features, real.logits, correct)
        return self._result(name or url, None, len(real), metrics, time.perf_counter() - started)

    def _score(
        self, features: np.ndarray, logits: np.ndarray, correct: np.ndarray | None
    ) -> dict[str, float]:
        wanted, metrics = self.cfg.metrics, {}
        if "fid" in wanted:
            metrics["fid"] = frechet_distance(
                *feature_statistics(features), *feature_statistics(self.reference.features)
            )
        if "kid" in wanted:
            metrics["kid"], metrics["kid_std"] = kernel_inception_distance(
                features, self.reference.features, seed=self.cfg.seed
            )
        if "is" in wanted:
            metrics["is"], metrics["is_std"] = inception_score(logits)
        if correct is not None:
            metrics["accuracy"] = float(np.mean(correct))
        return metrics

    def _result(self, name: str, step: int | None, n: int, metrics: dict, seconds: float) -> EvalResult:
        info = self.classifier_info
        return EvalResult(
            name=name,
            step=step,
            extractor=self.extractor.name,
            extractor_fingerprint=self.extractor.fingerprint,
            num_samples=n,
            reference_url=self.reference_url,
            reference_hash=self.reference.dataset_hash if self.reference is not None else "",
            num_reference=len(self.reference) if self.reference is not None else 0,
            metrics=metrics,
            classifier_accuracy=info.accuracy if info is not None else None,
            classifier_held_out=info.held_out if info is not None else "",
            world_size=self.world_size,
            seconds=round(seconds, 2),
        )


def _class_weights(url: str, num_classes: int) -> np.ndarray:
    """The training data's class frequencies (uniform if the manifest has none)."""
    from data_pipeline.manifest import read_manifest

    counts = np.zeros(num_classes)
    for shard in read_manifest(url).shards:
        counts[: len(shard.class_counts)] += shard.class_counts[:num_classes]
    return counts / counts.sum() if counts.sum() > 0 else np.full(num_classes, 1.0 / num_classes)
