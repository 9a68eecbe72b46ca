"""``sagan export``: a checkpoint's generator as files that need neither this project's training code nor,
for TorchScript and ONNX, this project at all.

    sagan export --checkpoint URL --out DIR [--format safetensors,torchscript,onnx] [--generator ema|g]

The generator is loaded by ``trainer.checkpoint.generator.load_generators`` (G-EMA with its own batch-norm
statistics), then spectral norm is folded into plain weights and batch norm runs in eval mode
(``models.export.fold_spectral_norm``). Each format is written into a local temporary folder and then
copied to ``--out`` (a local folder or ``s3://``):

- ``safetensors``: ``generator.safetensors`` + ``generator.json``, loaded by ``models.export.load_exported_generator``;
- ``torchscript``: ``generator.pt``, ``G(z, y)`` traced on the math attention path; ``torch.jit.load`` runs it;
- ``onnx``: ``generator.onnx``, opset ``ONNX_OPSET``, batch axis dynamic; onnxruntime runs it.

``MODEL_CARD.md`` beside them says where the generator came from and how to call each file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipeline.errors import DataError
from data_pipeline.storage import open_store, split_url
from models.export import fold_spectral_norm, for_tracing, write_exported_generator
from models.sagan import Generator, ModelConfig

FORMATS = ("safetensors", "torchscript", "onnx")
FILES = {
    "safetensors": ("generator.safetensors", "generator.json"),
    "torchscript": ("generator.pt",),
    "onnx": ("generator.onnx",),
}
CARD_FILE = "MODEL_CARD.md"
# The highest opset of torch's TorchScript-based ONNX exporter; the torch.export-based one needs onnxscript.
ONNX_OPSET = 20


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"--format {text!r}: give some of {','.join(FORMATS)}")
    return formats


def generator_arguments(model: ModelConfig, num_classes: int) -> dict[str, Any]:
    """The ``models.sagan.Generator`` keyword arguments of a run's ``model`` section."""
    return {
        "resolution": model.resolution,
        "num_classes": num_classes,
        "z_dim": model.z_dim,
        "channels": model.g_channels,
        "attention_resolutions": model.attention_resolutions,
        "attention_impl": model.attention_impl,
        "init": model.init,
        "sn_eps": model.sn_eps,
        "bn_eps": model.bn_eps,
    }


def example_inputs(G: Generator, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(batch, G.z_dim, generator=torch.Generator().manual_seed(0))
    return z, torch.arange(batch) % G.num_classes


def export_generator(G: nn.Module, model: dict[str, Any], folder: Path, formats: tuple[str, ...]) -> dict:
    """Write ``formats`` of ``G`` into the local ``folder``: {format: seconds}. ``G`` is folded and traced in
    place, so hand over a generator of its own (``load_generators`` returns a fresh one)."""
    G = for_tracing(fold_spectral_norm(G.cpu().float()))
    seconds = {}
    for name in formats:
        started = time.perf_counter()
        if name == "safetensors":
            write_exported_generator(G, model, folder)
        elif name == "torchscript":
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's, said in every call
                traced = torch.jit.trace(G, example_inputs(G))
            config = json.dumps({"model": model, "inputs": ["z", "y"], "output": "images"})
            traced.save(str(folder / "generator.pt"), _extra_files={"generator.json": config})
        else:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the deprecation of this exporter, said above
                torch.onnx.export(
                    G, example_inputs(G), str(folder / "generator.onnx"), dynamo=False,
                    opset_version=ONNX_OPSET, input_names=["z", "y"], output_names=["images"],
                    dynamic_axes={"z": {0: "batch"}, "y": {0: "batch"}, "images": {0: "batch"}},
                )  # fmt: skip
        seconds[name] = time.perf_counter() - started
    return seconds


def export_command(args: argparse.Namespace) -> int:
    from trainer.checkpoint.generator import GENERATORS, load_generators

    formats = parse_formats(args.format)
    if args.generator not in GENERATORS:
        raise ValueError(f"--generator {args.generator!r} is not one of {', '.join(GENERATORS)}")
    store = open_store(args.out)
    loaded = load_generators(args.checkpoint, (args.generator,))
    model = generator_arguments(loaded.config.model, loaded.num_classes)
    with tempfile.TemporaryDirectory(prefix="sagan-export-") as tmp:
        work = Path(tmp)
        seconds = export_generator(loaded.nets[args.generator], model, work, formats)
        (work / CARD_FILE).write_text(model_card(loaded, args.generator, model, formats, store.url))
        for name in (*[f for fmt in formats for f in FILES[fmt]], CARD_FILE):
            store.upload_file(name, work / name)
    timing = ", ".join(f"{name} {s:.2f}s" for name, s in seconds.items())
    print(f"exported {GENERATORS[args.generator]} of step {loaded.step} to {store.url} ({timing})")
    return 0


# --------------------------------------------------------------------------------------------------
# The model card


def _data_line(data_url: str) -> str:
    from evaluation.real import dataset_hash

    try:
        return f"`{data_url}`, manifest sha256 `{dataset_hash(data_url)}…` (first 16 hex digits)"
    except (DataError, OSError) as err:
        return f"`{data_url}` (its manifest is not readable from where this was exported: {err})"


def _evaluations(folder: str, cfg: Any, step: int) -> list[dict[str, Any]]:
    """The evaluations of ``step`` in the checkpoint's run folder (``<run>/eval/step_<N>-<extractor>.json``):
    the folder around ``<run>/checkpoints/step_<N>``, else the config's run.dir (checkpoints elsewhere)."""
    around = split_url(split_url(folder)[0])[0]
    for run_dir in dict.fromkeys([around, cfg.run.dir]):
        try:
            store = open_store(run_dir)
            found = [json.loads(store.read_bytes(name)) for name in store.list(f"eval/step_{step:07d}-")]
        except (DataError, OSError, ValueError):
            continue
        if found:  # ``sagan eval`` writes a list (one row per net), the trainer one result
            return [row for rows in found for row in (rows if isinstance(rows, list) else [rows])]
    return []


def _evaluation_table(results: list[dict[str, Any]]) -> str:
    if not results:
        return (
            "No evaluation of this step was found in the run folder (`sagan eval --checkpoint` makes one).\n"
        )
    lines = ["| net | extractor | samples | reference | metrics |", "|---|---|---|---|---|"]
    for r in results:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(r.get("metrics", {}).items()))
        lines.append(
            f"| {r.get('name')} | {r.get('extractor')} | {r.get('num_samples')} | "
            f"{r.get('num_reference')} of `{r.get('reference_url')}` | {metrics} |"
        )
    return "\n".join(lines) + "\n"


def model_card(loaded: Any, which: str, model: dict[str, Any], formats: tuple[str, ...], where: str) -> str:
    from trainer.checkpoint.generator import GENERATORS
    from trainer.config import to_dict

    cfg, step, res = loaded.config, loaded.step, model["resolution"]
    z_dim, classes = model["z_dim"], model["num_classes"]
    usage = {
        "safetensors": f"""```python
from models.export import load_exported_generator   # this project's `models` package, nothing else of it
G = load_exported_generator("{where}")                    # a models.sagan.Generator, spectral norm folded, eval mode
images = G(torch.randn(8, {z_dim}), torch.randint(0, {classes}, (8,)))
```""",
        "torchscript": f"""```python
import torch                                          # torch only: this project need not be installed
G = torch.jit.load("{where}/generator.pt")
images = G(torch.randn(8, {z_dim}), torch.randint(0, {classes}, (8,)))
```""",
        "onnx": f"""```python
import numpy as np, onnxruntime as ort                # opset {ONNX_OPSET}, the batch axis is dynamic
session = ort.InferenceSession("{where}/generator.onnx")
z = np.random.randn(8, {z_dim}).astype(np.float32); y = np.random.randint(0, {classes}, 8).astype(np.int64)
images = session.run(["images"], {{"z": z, "y": y}})[0]
```""",
    }
    how = "\n\n".join(f"**{fmt}** ({', '.join(FILES[fmt])}):\n\n{usage[fmt]}" for fmt in formats)
    return f"""# SAGAN generator: {GENERATORS[which]} of step {step}

A class-conditional SAGAN generator, {res}×{res} RGB, {classes} classes, z of {z_dim} dimensions.
Exported by `sagan export` from `{loaded.folder}` (step {step}, {GENERATORS[which]}).

- Inputs: `z` float32 (batch, {z_dim}) drawn from N(0, 1); `y` int64 (batch,) class ids 0..{classes - 1}.
- Output: `images` float32 (batch, 3, {res}, {res}) in [-1, 1]; to uint8: `((x + 1) * 127.5).round()`.
- Spectral norm folded into plain weights (W/σ), batch norm in eval mode with
  {"G-EMA's own statistics measured at this step" if which == "ema" else "G's running statistics"},
  attention on its math path in the TorchScript and ONNX files; weights fp32, NCHW.
- Every file gives the same images as the checkpoint's generator for the same `z, y`
  (fp32, max abs difference ≤ 1e-4; `tests/launch/test_export.py`).

## Data

{_data_line(cfg.data.url)}

## Evaluation at step {step}

{_evaluation_table(_evaluations(loaded.folder, cfg, step))}
## How to call it

{how}

## Generator arguments

```json
{json.dumps(model, indent=1)}
```

## The run's resolved config

```json
{json.dumps(to_dict(cfg), indent=1)}
```
"""
