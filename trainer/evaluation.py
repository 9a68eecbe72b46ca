"""Evaluation of a generator: FID, KID, Inception Score and class accuracy, distributed and offline.

How each number is made (``docs/evaluation.md`` says which ones compare with published ones):

- Samples: sample i has z_i ~ N(0, I) and a label drawn with the training data's class frequencies,
  all from one generator seeded with ``eval.seed``, so every evaluation of a run sees the same noise.
  Rank r generates and embeds samples [r*N/W, (r+1)*N/W); the features are gathered in sample order
  (torchmetrics' gather), so the result does not depend on the world size W.
- Images are quantised to uint8 as saved images are ((x + 1) * 127.5, rounded), then embedded.
- Reference: the first ``eval.num_reference`` real images of ``eval.reference_url`` (default: the
  training data), embedded once and cached next to the dataset (``trainer.reference``).
- FID: mean and covariance (ddof=1) in float64; tr sqrt(S1 S2) from the eigenvalues of the symmetric
  S1^1/2 S2 S1^1/2, clipped at 0, so near-singular products and fewer samples than feature dimensions
  give a finite number instead of NaN or a complex square root.
- KID: the unbiased MMD^2 estimator with the cubic polynomial kernel (x.y/d + 1)^3, mean and standard
  deviation over 100 subsets of min(1000, N) samples.
- IS: exp(E_x KL(p(y|x) || p(y))) over 10 consecutive splits of the samples, mean and standard deviation.
- accuracy: the share of samples the dataset's classifier assigns to the class they were generated for,
  reported beside the classifier's accuracy on held-out real images.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from scipy.special import log_softmax
from torch import nn

from trainer.feature_extractors import (
    FeatureExtractor,
    check_extractor_name,
    classifier_extractor,
    efficientnet_extractor,
    inception_extractor,
)

log = logging.getLogger("trainer")

METRICS = ("fid", "kid", "is", "accuracy")
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: list(METRICS))  # []: no evaluation during training
    interval_steps: int = 0  # during training: every N steps and at the last step; 0: the last step only
    num_samples: int = 5000  # generated images per evaluation
    extractor: str = "classifier"  # classifier | efficientnet-lite0 | inception
    reference_url: str = ""  # real images to compare with (e.g. a test split); "" = data.url
    num_reference: int = 10000  # the first N real images of the reference; 0 = all
    batch_size: int = 250
    seed: int = 0  # the samples' noise and labels
    inception_weights: str = ""  # pt_inception-2015-12-05-6726825d.pth, for extractor=inception
    classifier_epochs: int = 2  # the dataset classifier, when it has to be trained
    classifier_width: int = 16

    def validate(self) -> None:
        """Raise a ValueError naming the first bad ``eval.*`` key."""
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"eval.metrics contains {unknown[0]!r}: choose from {', '.join(METRICS)}")
        check_extractor_name(self.extractor)
        for key in ("num_samples", "batch_size", "classifier_epochs", "classifier_width"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key}={getattr(self, key)!r} must be positive")
        if self.num_samples < 2:
            raise ValueError(
                f"eval.num_samples={self.num_samples} must be at least 2 (a covariance needs two)"
            )
        for key in ("interval_steps", "num_reference", "seed"):
            if getattr(self, key) < 0:
                raise ValueError(f"eval.{key}={getattr(self, key)!r} must not be negative")
        if self.extractor == "inception" and not self.inception_weights and set(self.metrics) - {"accuracy"}:
            raise ValueError(
                "eval.extractor=inception needs eval.inception_weights: the path of "
                "pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)"
            )


# --------------------------------------------------------------------------------------------------
# The metrics, on features and logits


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof=1) of (N, D) features, in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"statistics need at least 2 feature vectors of shape (N, D), got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) of two Gaussians, in float64.

    S1 S2 has the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2, so tr sqrt(S1 S2) is the
    sum of their square roots: no complex arithmetic, and a singular S1 or S2 is no special case.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: shapes do not match (mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
            f"mu2 {mu2.shape}, sigma2 {sigma2.shape})"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("frechet_distance: the statistics hold NaN or infinite values")
    root = _psd_sqrt(sigma1)
    product = root @ sigma2 @ root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    *,
    num_subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:
    """Mean and standard deviation over subsets of the unbiased MMD^2 with kernel (x.y/d + 1)^3."""
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {len(x)} and {len(y)}")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        k_aa, k_bb, k_ab = ((p @ q.T / d + 1.0) ** 3 for p, q in ((a, a), (b, b), (a, b)))
        within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        values[i] = within - 2.0 * k_ab.sum() / (m * m)
    return float(values.mean()), float(values.std())


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Mean and standard deviation over consecutive splits of exp(E KL(p(y|x) || p(y)))."""
    log_p = log_softmax(np.asarray(logits, np.float64), axis=1)
    n = len(log_p)
    splits = max(1, min(splits, n))
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits : (i + 1) * n // splits]
        p = np.exp(chunk)
        log_marginal = np.log(p.mean(axis=0))
        scores.append(np.exp((p * (chunk - log_marginal)).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class EvalResult:
    name: str  # G-EMA, G, or a real dataset
    step: int | None
    extractor: str
    extractor_fingerprint: str
    num_samples: int
    reference_url: str
    reference_hash: str
    num_reference: int
    metrics: dict[str, float]  # fid, kid, kid_std, is, is_std, accuracy
    classifier_accuracy: float | None  # the dataset classifier on held-out real images
    classifier_held_out: str
    world_size: int
    seconds: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def summary(self) -> str:
        m = self.metrics
        parts = [f"{self.name}" + (f" step {self.step}" if self.step is not None else "")]
        if "fid" in m:
            parts.append(f"FID {m['fid']:.2f}")
        if "kid" in m:
            parts.append(f"KID {m['kid'] * 1e3:.2f}e-3 ± {m['kid_std'] * 1e3:.2f}e-3")
        if "is" in m:
            parts.append(f"IS {m['is']:.2f} ± {m['is_std']:.2f}")
        if "accuracy" in m:
            parts.append(
                f"accuracy {100 * m['accuracy']:.1f}% (real {100 * (self.classifier_accuracy or 0):.1f}%)"
            )
        return (
            f"{', '.join(parts)} ({self.extractor}, {self.num_samples} samples vs {self.num_reference} real)"
        )


def eval_result_name(step: int, extractor: str) -> str:
    """Where an evaluation's JSON goes in a run folder, from training and from ``sagan eval`` alike."""
    return f"eval/step_{step:07d}-{extractor}.json"


def format_table(results: list[EvalResult]) -> str:
    header = ["", "step", "samples", "extractor", "FID", "KID ×1e3", "IS", "accuracy", "real acc."]
    rows = [header]
    for r in results:
        m = r.metrics
        rows.append(
            [
                r.name,
                "" if r.step is None else str(r.step),
                str(r.num_samples),
                r.extractor,
                f"{m['fid']:.2f}" if "fid" in m else "",
                f"{m['kid'] * 1e3:.2f} ± {m['kid_std'] * 1e3:.2f}" if "kid" in m else "",
                f"{m['is']:.2f} ± {m['is_std']:.2f}" if "is" in m else "",
                f"{100 * m['accuracy']:.1f}%" if "accuracy" in m else "",
                f"{100 * r.classifier_accuracy:.1f}%" if r.classifier_accuracy is not None else "",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# --------------------------------------------------------------------------------------------------
# The evaluator


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
        cfg.validate()
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
        from trainer.classifier import classifier_from_bytes, classifier_payload

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
        from trainer.reference import real_features

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
                from trainer.reference import read_images

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
