"""The quality bar: train the default conditional SAGAN for a fixed step budget, with and without attention.

    .venv/bin/python benchmarks/quality_bench.py --phase train --steps 1500      # the two trainings, in turn
    .venv/bin/python benchmarks/quality_bench.py --phase evaluate --num-samples 10000

Training runs `sagan train` (the default config) once per variant in its own run folder under
--root, one after the other, and records wall time and `uptime` load beside each run
(``bench.json``). A run that already reached the budget is not trained again.

Evaluation takes the newest checkpoint step that every variant has (so a cut-short training is
still compared at equal steps) and scores G and G-EMA with the dataset classifier against the
Fashion-MNIST test split (prepared with ``sagan prepare --source fashion-mnist:test`` if missing):
classifier-FID, KID, class accuracy of the samples; beside them the floor (the same number of real
training images against the test split) and the classifier's accuracy on the real test images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "attention": [],  # the default: self-attention at 32x32 in G and D
    "no-attention": ["model.attention_resolutions=[]"],
}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def train(
    variant: str, steps: int, root: Path, data_url: str, timeout: float, checkpoint_interval: int
) -> dict:
    run_dir = root / variant
    record_path = run_dir / "bench.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("steps") == steps and record.get("returncode") == 0:
            print(f"{variant}: trained already ({record_path})")
            return record
    run_dir.mkdir(parents=True, exist_ok=True)
    sagan = Path(sys.executable).parent / "sagan"
    command = [
        str(sagan),
        "train",
        f"trainer.max_steps={steps}",
        f"run.dir={run_dir}",
        f"data.url={data_url}",
        "metrics.port=0",
        "checkpoint.resume=false",
        f"checkpoint.interval_steps={checkpoint_interval}",
        "checkpoint.keep_last=20",  # every intermediate checkpoint stays, to compare at equal steps
        *VARIANTS[variant],
    ]
    print(f"{variant}: {' '.join(command)}", flush=True)
    load_before, started = load_average(), time.perf_counter()
    with open(run_dir / "train.log", "wb") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    record = {
        "variant": variant,
        "steps": steps,
        "overrides": VARIANTS[variant],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_before": load_before,
        "load_after": load_average(),
        "returncode": result.returncode,
    }
    record_path.write_text(json.dumps(record, indent=1))
    print(json.dumps(record), flush=True)
    return record


def committed_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name[5:]) for p in folder.glob("step_*") if (p / "manifest.json").is_file())


def wall_seconds_to(run_dir: Path, step: int) -> float | None:
    """Training wall time to ``step`` from the run log's timestamps (the steps before its first row at the
    pace of its first two rows)."""
    from trainer.run_log import read_run_log

    rows = [r for r in read_run_log(str(run_dir)).to_pylist() if r.get("loss_d") is not None]
    times = {r["step"]: r["time"] for r in rows}
    if len(rows) < 2 or step not in times:
        return None
    (s0, t0), (s1, t1) = sorted(times.items())[:2]
    return times[step] - t0 + s0 * (t1 - t0) / (s1 - s0)


def save_grids(run_dir: Path, step: int) -> list[Path]:
    """G-EMA's and G's grids of one checkpoint, the trainer's fixed noise, one row per class."""
    import torch

    from models.sagan import build_models
    from trainer import samples
    from trainer.checkpoint import load_folder
    from trainer.config import from_dict

    state, manifest = load_folder(run_dir / "checkpoints" / f"step_{step}")
    cfg = from_dict(manifest["config"])
    rows = samples.grid_classes(manifest["num_classes"])
    z, y = samples.fixed_inputs(
        cfg.model.z_dim, rows, cfg.trainer.sample_columns, cfg.trainer.seed, torch.device("cpu")
    )
    paths = []
    for label, weights in (("g-ema", state["G_ema"]), ("g", state["backend"]["G"])):
        G, _ = build_models(cfg.model, manifest["num_classes"])
        G.load_state_dict(weights)
        path = run_dir / f"grid-step_{step}-{label}.png"
        paths.append(samples.save_grid(samples.draw(G, z, y), path, cfg.trainer.sample_columns))
    return paths


def evaluate(args: argparse.Namespace) -> None:
    from launch.cli import main as sagan

    root, variants = args.root.resolve(), args.variants.split(",")
    if not Path(args.test_data).joinpath("manifest.parquet").exists():
        assert sagan(["prepare", "--source", "fashion-mnist:test", "--out", args.test_data]) == 0
    common = set.intersection(*(set(committed_steps(root / v)) for v in variants))
    if not common:
        raise SystemExit(f"no checkpoint step common to {variants} under {root}")
    step = max(common)
    shared = [
        "--reference",
        args.test_data,
        "--num-samples",
        str(args.num_samples),
        "--metrics",
        "fid,kid,accuracy",
    ]
    rows = []
    for variant in variants:
        out = root / variant / f"quality-step_{step}.json"
        folder = root / variant / "checkpoints" / f"step_{step}"
        assert (
            sagan(["eval", "--checkpoint", str(folder), "--generator", "both", *shared, "--out", str(out)])
            == 0
        )
        wall = wall_seconds_to(root / variant, step)
        print("grids:", *save_grids(root / variant, step))
        for result in json.loads(out.read_text()):
            rows.append((variant, result, wall))
    floor_out = root / f"floor-{args.num_samples}.json"
    assert sagan(["eval", "--data", args.data, *shared, "--out", str(floor_out)]) == 0
    floor = json.loads(floor_out.read_text())[0]
    print(f"\nstep {step}, {args.num_samples} samples, load {load_average()}")
    print(
        "| variant | net | classifier-FID | floor | KID ×1e3 | sample accuracy | real-test accuracy | wall to step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for variant, r, wall in rows:
        m = r["metrics"]
        print(
            f"| {variant} | {r['name']} | {m['fid']:.2f} | {floor['metrics']['fid']:.2f} | "
            f"{1e3 * m['kid']:.2f} ± {1e3 * m['kid_std']:.2f} | {100 * m['accuracy']:.1f}% | "
            f"{100 * r['classifier_accuracy']:.1f}% | {'' if wall is None else f'{wall / 60:.0f} min'} |"
        )
    print(
        f"floor: real training images vs test: FID {floor['metrics']['fid']:.2f}, KID ×1e3 "
        f"{1e3 * floor['metrics']['kid']:.2f}, accuracy {100 * floor['metrics']['accuracy']:.1f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("train", "evaluate", "all"), default="all")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--root", type=Path, default=Path("runs/quality"))
    parser.add_argument("--data", default="data/fashion-mnist-32")
    parser.add_argument("--test-data", default="data/fashion-mnist-32-test")
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated: attention,no-attention"
    )
    parser.add_argument("--checkpoint-interval", type=int, default=250)
    parser.add_argument("--train-timeout", type=float, default=2.5 * 3600, help="seconds per training")
    args = parser.parse_args()
    if args.phase in ("train", "all"):
        for variant in args.variants.split(","):
            train(
                variant,
                args.steps,
                args.root.resolve(),
                args.data,
                args.train_timeout,
                args.checkpoint_interval,
            )
    if args.phase in ("evaluate", "all"):
        evaluate(args)


if __name__ == "__main__":
    main()
