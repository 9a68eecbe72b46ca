"""Evaluation of a generator: FID, KID, Inception Score and class accuracy, distributed and offline.

How each number is made (``docs/evaluation.md`` says which ones compare with published ones):

- Samples: sample i has z_i ~ N(0, I) and a label drawn with the training data's class frequencies,
  all from one generator seeded with ``eval.seed``, so every evaluation of a run sees the same noise.
  Rank r generates and embeds samples [r*N/W, (r+1)*N/W); the features are gathered in sample order
  (torchmetrics' gather), so the result does not depend on the world size W.
- Images are quantised to uint8 as saved images are ((x + 1) * 127.5, rounded), then embedded.
- Reference: the first ``eval.num_reference`` real images of ``eval.reference_url`` (default: the
  training data), embedded once and cached next to the dataset (``evaluation.real``).
- FID: mean and covariance (ddof=1) in float64; tr sqrt(S1 S2) from the eigenvalues of the symmetric
  S1^1/2 S2 S1^1/2, clipped at 0, so near-singular products and fewer samples than feature dimensions
  give a finite number instead of NaN or a complex square root.
- KID: the unbiased MMD^2 estimator with the cubic polynomial kernel (x.y/d + 1)^3, mean and standard
  deviation over 100 subsets of min(1000, N) samples.
- IS: exp(E_x KL(p(y|x) || p(y))) over 10 consecutive splits of the samples, mean and standard deviation.
- accuracy: the share of samples the dataset's classifier assigns to the class they were generated for,
  reported beside the classifier's accuracy on held-out real images.
"""

from evaluation.config import METRICS, EvalConfig
from evaluation.evaluator import Evaluator
from evaluation.results import EvalResult, eval_result_name, format_table
from evaluation.scores import feature_statistics, frechet_distance, inception_score, kernel_inception_distance

__all__ = [
    "METRICS",
    "EvalConfig",
    "EvalResult",
    "Evaluator",
    "eval_result_name",
    "feature_statistics",
    "format_table",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
]
