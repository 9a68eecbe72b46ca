"""``sagan export``: every format gives the checkpoint's G-EMA images (fp32, max abs difference ≤ 1e-4), the
TorchScript file in a Python where this project cannot be imported, the ONNX file in onnxruntime; the
safetensors file loads into a plain ``Generator`` with no checkpoint code; the model card; bad input.

The checkpoint is the committed step-10 smoke checkpoint with its attention gamma raised to 0.5 (at step
10 it is 1e-4, which would hide a wrong attention path).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from data_pipeline.storage import open_store
from launch.cli import main
from models.export import load_exported_generator
from tests.support.paths import FIXTURES
from trainer.checkpoint.generator import load_generators

TOLERANCE = 1e-4


def checkpoint_with_attention(folder: Path, gamma: float = 0.5) -> Path:
    """The committed smoke checkpoint (32×32 digits, z 32, 10 classes) with G-EMA's attention gamma set to
    ``gamma`` (its batch-norm statistics kept as saved); returns the checkpoint folder."""
    shutil.copytree(FIXTURES / "checkpoint-before-redesign", folder)
    step = folder / "step_10"
    state = torch.load(step / "state.pt", weights_only=True)
    for key in state["G_ema"]:
        if key.endswith("gamma"):
            state["G_ema"][key] = torch.tensor(gamma)
    torch.save(state, step / "state.pt")
    payload = (step / "state.pt").read_bytes()
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    (step / "manifest.json").write_text(json.dumps(manifest))
    return folder


def inputs(batch: int = 20, z_dim: int = 32, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(batch, z_dim, generator=generator), torch.arange(batch) % num_classes


def without_this_project(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a Python that has torch but cannot import this project: isolated mode (no PYTHONPATH,
    no cwd on the path), and site-packages put on the path without running its .pth files, so the
    editable install's finder (which maps ``models``, ``trainer``, ``launch`` here) is not installed."""
    site_packages = sysconfig.get_paths()["purelib"]
    prologue = (
        f"import sys, importlib.util; sys.path.append({site_packages!r}); "
        "assert all(importlib.util.find_spec(m) is None for m in ('models', 'trainer', 'launch')), 'importable'\n"
    )
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", prologue + code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.Tensor]:
    """(checkpoint, export folder, G-EMA's images of ``inputs()`` as the trainer's loader gives them)."""
    root = tmp_path_factory.mktemp("export")
    checkpoint = checkpoint_with_attention(root / "checkpoints")
    G = load_generators(str(checkpoint)).nets["ema"]
    attention = G.blocks["attention32"]
    # the reference attends with the fused kernel at 32×32; the TorchScript and ONNX files on the math path
    assert (
        float(attention.gamma.detach()) == 0.5 and attention.kernel_for(torch.zeros(1, 1, 32, 32)) == "sdpa"
    )
    with torch.no_grad():
        reference = G(*inputs())
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(root / "out")]) == 0
    return checkpoint, root / "out", reference


def test_export_writes_every_format_and_a_model_card(exported, capsys):
    _, out, _ = exported
    names = {p.name for p in out.iterdir()}
    assert names == {
        "generator.safetensors",
        "generator.json",
        "generator.pt",
        "generator.onnx",
        "MODEL_CARD.md",
    }
    card = (out / "MODEL_CARD.md").read_text()
    assert "G-EMA of step 10" in card and "torch.jit.load" in card and "onnxruntime" in card
    assert '"g_channels": 8' in card  # the run's config
    description = json.loads((out / "generator.json").read_text())
    assert description["model"] == {
        "resolution": 32, "num_classes": 10, "z_dim": 32, "channels": 8, "attention_resolutions": None,
        "attention_impl": "auto", "init": "orthogonal", "sn_eps": 1e-6, "bn_eps": 1e-5,
    }  # fmt: skip
    tensors = description["state_dict"]["tensors"]
    assert "linear.weight" in tensors and not any(
        "parametrizations" in k or k.endswith("_u") for k in tensors
    )


def test_safetensors_load_into_a_plain_generator_that_draws_g_emas_images(exported):
    _, out, reference = exported
    G = load_exported_generator(out)
    assert not any(parametrize.is_parametrized(m) for m in G.modules()) and not G.training
    with torch.no_grad():
        images = G(*inputs())
    assert (images - reference).abs().max() <= TOLERANCE
    with torch.no_grad():
        sdpa = load_exported_generator(out, attention_impl="sdpa")(*inputs())
    assert (sdpa - reference).abs().max() <= TOLERANCE


def test_torchscript_runs_where_this_project_cannot_be_imported(exported, tmp_path):
    _, out, reference = exported
    z, y = inputs()
    torch.save({"z": z, "y": y}, tmp_path / "inputs.pt")
    code = (
        "import torch\n"
        f"G = torch.jit.load({str(out / 'generator.pt')!r})\n"
        "x = torch.load('inputs.pt')\n"
        "with torch.no_grad():\n"
        "    torch.save(G(x['z'], x['y']), 'images.pt')\n"
        "    assert G(x['z'][:3], x['y'][:3]).shape == (3, 3, 32, 32)\n"
    )
    done = without_this_project(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    images = torch.load(tmp_path / "images.pt")
    assert images.shape == reference.shape and (images - reference).abs().max() <= TOLERANCE


def test_onnx_runs_in_onnxruntime_with_any_batch(exported):
    import onnx
    import onnxruntime as ort

    _, out, reference = exported
    model = onnx.load(str(out / "generator.onnx"))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 20
    session = ort.InferenceSession(str(out / "generator.onnx"), providers=["CPUExecutionProvider"])
    z, y = inputs()
    images = session.run(["images"], {"z": z.numpy(), "y": y.numpy()})[0]
    assert images.shape == tuple(reference.shape)
    assert np.abs(images - reference.numpy()).max() <= TOLERANCE
    three = session.run(["images"], {"z": z[:3].numpy(), "y": y[:3].numpy()})[0]
    assert np.abs(three - reference[:3].numpy()).max() <= TOLERANCE


def test_export_of_g_and_of_one_format(exported, tmp_path):
    checkpoint, _, _ = exported
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path), "--format", "onnx",
                 "--generator", "g"]) == 0  # fmt: skip
    assert {p.name for p in tmp_path.iterdir()} == {"generator.onnx", "MODEL_CARD.md"}
    assert "G of step 10" in (tmp_path / "MODEL_CARD.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--format", "tflite"], "--format 'tflite': give some of safetensors,torchscript,onnx"),
        (["--format", ","], "give some of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(exported, tmp_path, capsys, argv, message):
    checkpoint, _, _ = exported
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_export_to_s3(exported, s3_bucket, capsys):
    checkpoint, out, _ = exported
    url = f"s3://{s3_bucket}/exported"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", url, "--format", "safetensors"]) == 0
    store = open_store(url)
    assert store.list("") == ["MODEL_CARD.md", "generator.json", "generator.safetensors"]
    assert store.read_bytes("generator.safetensors") == (out / "generator.safetensors").read_bytes()
    assert f"exported G-EMA of step 10 to {url}" in capsys.readouterr().out


def test_a_missing_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sagan export: error:") and len(err.splitlines()) == 1, err


def test_loading_a_folder_without_an_export_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="no exported generator at"):
        load_exported_generator(tmp_path)


def test_the_model_card_holds_the_trainers_and_sagan_evals_evaluations_of_the_step(tmp_path, capsys):
    """The trainer writes one result per file, ``sagan eval`` a list (one per net): both are read."""
    checkpoint = checkpoint_with_attention(tmp_path / "run" / "checkpoints")
    row = {"extractor": "classifier", "num_samples": 5000, "num_reference": 10000, "reference_url": "data/x"}
    evals = tmp_path / "run" / "eval"
    evals.mkdir()
    (evals / "step_0000010-classifier.json").write_text(
        json.dumps({"name": "G-EMA", **row, "metrics": {"fid": 2.77}})
    )
    (evals / "step_0000010-inception.json").write_text(
        json.dumps([{"name": "G", **row, "extractor": "inception", "metrics": {"fid": 41.5}}])
    )
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(tmp_path / "out"),
                "--format",
                "safetensors",
            ]
        )
        == 0
    )
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "| G-EMA | classifier | 5000 | 10000 of `data/x` | fid 2.77 |" in card
    assert "| G | inception | 5000 | 10000 of `data/x` | fid 41.5 |" in card
