"""The quality bar: train the default conditional SAGAN, score G and a bank of G-EMA schedules at every checkpoint.

    OMP_NUM_THREADS=1 python benchmarks/quality_bench.py train NAME [--steps 2000] [--every 250] [key=value ...]
    python benchmarks/quality_bench.py evaluate NAME [NAME ...] [--num-samples 2000] [--steps 500,1000] [--nets G,r0.1]
    python benchmarks/quality_bench.py grid NAME --step N --ema SCHEDULE --out PNG

``train`` runs the built-in default config with the overrides (e.g. ``model.attention_resolutions=[]``),
in this process, in ``--root/NAME``. Beside the configured G-EMA it keeps a bank of G-EMA schedules
(``SCHEDULES``), all updated from the same G at every step; they never feed back into training, so
one run compares them all on the same G. At every checkpoint each is saved with its standing
batch-norm statistics (``ema/<schedule>-step_N.pt``).

``evaluate`` scores, at every checkpoint step of each run, with the dataset classifier against the
Fashion-MNIST test split: G; every schedule; and "d0.999 with G's BN": decay 0.999 from step 0 with G's
batch-norm statistics copied in, i.e. G-EMA of the same G as it was before issue #14. Per net:
classifier-FID and the classifier's accuracy on the samples; beside them the floor (as many real
training images against the test split) and the classifier's accuracy on the real test images.
Wall time per step comes from the run log; ``uptime`` load is printed with every table.

``grid`` draws one schedule's grid of a checkpoint beside G's (the trainer's fixed noise, one row per
class), as ``sagan sample`` draws the configured G-EMA.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from models.ema import EMA, batch_norm_inputs, batch_norm_layers, ema_decay

# name -> ema_decay keyword arguments (decay, start_step, rampup)
SCHEDULES = {
    "d0.999": dict(decay=0.999),  # the old default: decay 0.999 from step 0
    "d0.99": dict(decay=0.99),
    "r0.05": dict(decay=0.9999, rampup=0.05),
    "r0.1": dict(decay=0.9999, rampup=0.1),
    "r0.2": dict(decay=0.9999, rampup=0.2),
    "r0.3": dict(decay=0.9999, rampup=0.3),
    "r0.5": dict(decay=0.9999, rampup=0.5),
}
OLD_G_EMA = "d0.999 with G's BN"


class EMABank:
    """The trainer's EMA, plus one EMA per schedule, updated together."""

    def __init__(self, trainer, primary: EMA):
        self.trainer, self.primary = trainer, primary
        self.bank = {name: EMA(trainer.backend.G) for name in SCHEDULES}

    def update(self, model, decay: float) -> None:
        self.primary.update(model, decay)
        for name, ema in self.bank.items():
            ema.update(model, ema_decay(self.trainer.step, **SCHEDULES[name]))

    def __getattr__(self, name):
        return getattr(self.primary, name)


def train(args: argparse.Namespace) -> None:
    from trainer import trainer as trainer_module
    from trainer.config import load_config
    from trainer.runtime.distributed import init_runtime

    torch.set_num_threads(1)
    run_dir = args.root / args.name
    overrides = [
        f"trainer.max_steps={args.steps}",
        f"run.dir={run_dir}",
        "metrics.port=0",
        "eval.metrics=[]",  # scored afterwards, by `evaluate`
        f"checkpoint.interval_steps={args.every}",
        f"trainer.sample_interval={args.every}",
        "checkpoint.keep_last=1000",
        *args.overrides,
    ]
    cfg = load_config(None, overrides)
    runtime = init_runtime("cpu")
    trainer_module.ensure_dataset(cfg, runtime)

    class BenchTrainer(trainer_module.Trainer):
        def save_checkpoint(self, fid=None):
            super().save_checkpoint(fid)
            inputs = dict(
                **self.ema_statistics_recipe(),
                z_dim=cfg.model.z_dim,
                num_classes=self.num_classes,
                device=runtime.device,
            )
            (run_dir / "ema").mkdir(parents=True, exist_ok=True)
            for name, ema in self.ema.bank.items():
                ema.recompute_batch_norm(batch_norm_inputs(**inputs))
                torch.save(ema.state_dict(), run_dir / "ema" / f"{name}-step_{self.step}.pt")

    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"overrides": args.overrides, "steps": args.steps, "load_before": os.getloadavg()}
    (run_dir / "bench.json").write_text(json.dumps(record))
    trainer = BenchTrainer(cfg, runtime)
    trainer.ema = EMABank(trainer, trainer.ema)
    started = time.perf_counter()
    trainer.train()
    record.update(wall_seconds=round(time.perf_counter() - started, 1), load_after=os.getloadavg())
    (run_dir / "bench.json").write_text(json.dumps(record))


def seconds_per_step(run_dir: Path) -> float | None:
    from trainer.observability.run_log import read_run_log

    rows = sorted(
        (r["step"], r["time"]) for r in read_run_log(str(run_dir)).to_pylist() if r.get("loss_d") is not None
    )
    if len(rows) < 2:
        return None
    (s0, t0), (s1, t1) = rows[0], rows[-1]
    return (t1 - t0) / (s1 - s0)


def load_generator(cfg, num_classes: int, weights: dict, bn_from=None):
    """A generator with ``weights``; with ``bn_from``, that model's batch-norm statistics copied in."""
    from models.sagan import build_models

    G, _ = build_models(cfg.model, num_classes)
    G.load_state_dict(weights)
    if bn_from is not None:
        source = dict(bn_from.named_modules())
        bn_layers = set(batch_norm_layers(G))
        for name, layer in G.named_modules():
            if layer in bn_layers:
                layer.load_state_dict(source[name].state_dict())
    return G


def checkpoint_nets(run_dir: Path, folder: Path) -> tuple[dict, dict, object]:
    """G, every schedule of the bank (standing statistics) and the old G-EMA, of one checkpoint."""
    from trainer.checkpoint.format import load_folder
    from trainer.config import from_dict

    step = int(folder.name[5:])
    state, manifest = load_folder(folder)
    cfg, num_classes = from_dict(manifest["config"]), manifest["num_classes"]
    G = load_generator(cfg, num_classes, state["backend"]["G"])
    nets = {"G": G}
    for schedule in SCHEDULES:
        path = run_dir / "ema" / f"{schedule}-step_{step}.pt"
        if path.exists():
            nets[schedule] = load_generator(cfg, num_classes, torch.load(path, weights_only=True))
    if "d0.999" in nets:
        weights = torch.load(run_dir / "ema" / f"d0.999-step_{step}.pt", weights_only=True)
        nets[OLD_G_EMA] = load_generator(cfg, num_classes, weights, bn_from=G)
    return nets, manifest, cfg


def checkpoint_folders(run_dir: Path) -> list[Path]:
    return sorted(
        (p for p in (run_dir / "checkpoints").glob("step_*") if (p / "manifest.json").is_file()),
        key=lambda p: int(p.name[5:]),
    )


def evaluate(args: argparse.Namespace) -> None:
    from evaluation import EvalConfig, Evaluator
    from launch.cli import main as sagan

    torch.set_num_threads(1)
    if not Path(args.test_data).joinpath("manifest.parquet").exists():
        assert sagan(["prepare", "--source", "fashion-mnist:test", "--out", args.test_data]) == 0
    results, floor = {}, None
    for name in args.names:
        run_dir = args.root / name
        out = run_dir / f"bench-eval-{args.num_samples}.json"
        scored = json.loads(out.read_text()) if out.exists() else {}
        evaluator = None
        for folder in checkpoint_folders(run_dir):
            step = int(folder.name[5:])
            if args.steps and step not in args.steps:
                continue
            nets, manifest, cfg = checkpoint_nets(run_dir, folder)
            row = scored.setdefault(str(step), {})
            nets = {k: v for k, v in nets.items() if k not in row and (not args.nets or k in args.nets)}
            if not nets:
                continue
            if evaluator is None:
                eval_cfg = EvalConfig(
                    metrics=["fid", "accuracy"],
                    num_samples=args.num_samples,
                    reference_url=args.test_data,
                    num_reference=10000,
                )
                evaluator = Evaluator(
                    eval_cfg,
                    data_url=cfg.data.url,
                    resolution=cfg.model.resolution,
                    z_dim=cfg.model.z_dim,
                    num_classes=manifest["num_classes"],
                )
            for label, net in nets.items():  # each score is kept as soon as it is known
                result = evaluator.evaluate(net, step=step, name=label)
                row[label] = {"fid": result.metrics["fid"], "accuracy": result.metrics["accuracy"]}
                print(f"{name} step {step} {label}: {result.summary()} [{result.seconds:.0f} s]", flush=True)
                out.write_text(json.dumps(scored, indent=1))
        if evaluator is not None and floor is None:
            real = evaluator.evaluate_real(evaluator.data_url, limit=args.num_samples, name="real train")
            floor = {
                "fid": real.metrics["fid"],
                "accuracy": real.metrics["accuracy"],
                "test_accuracy": evaluator.classifier_info.accuracy,
            }
            (args.root / f"floor-{args.num_samples}.json").write_text(json.dumps(floor))
        results[name] = (scored, seconds_per_step(run_dir))
    if floor is None and (args.root / f"floor-{args.num_samples}.json").exists():
        floor = json.loads((args.root / f"floor-{args.num_samples}.json").read_text())
    print(
        f"\nload {os.getloadavg()}, {args.num_samples} samples, classifier-FID vs test split / sample accuracy"
    )
    if floor:
        print(
            f"floor: {args.num_samples} real training images vs test: FID {floor['fid']:.2f}, "
            f"accuracy {100 * floor['accuracy']:.1f}%; classifier on real test {100 * floor['test_accuracy']:.1f}%"
        )
    for name, (scored, pace) in results.items():
        print(f"\n{name}" + ("" if pace is None else f" ({pace:.2f} s/step)"))
        labels = list(dict.fromkeys(label for row in scored.values() for label in row))
        print("| step | " + " | ".join(labels) + " |")
        print("|---" * (len(labels) + 1) + "|")
        for step in sorted(scored, key=int):
            cells = [
                f"{scored[step][lb]['fid']:.2f} / {100 * scored[step][lb]['accuracy']:.0f}%"
                if lb in scored[step]
                else ""
                for lb in labels
            ]
            print(f"| {step} | " + " | ".join(cells) + " |")


def grid(args: argparse.Namespace) -> None:
    from trainer.observability import grids

    run_dir = args.root / args.name
    nets, manifest, cfg = checkpoint_nets(run_dir, run_dir / "checkpoints" / f"step_{args.step}")
    rows = grids.grid_classes(manifest["num_classes"])
    z, y = grids.fixed_inputs(
        cfg.model.z_dim, rows, cfg.trainer.sample_columns, cfg.trainer.seed, torch.device("cpu")
    )
    panels = {f"G-EMA {args.ema}": grids.draw(nets[args.ema], z, y), "G": grids.draw(nets["G"], z, y)}
    print("wrote", grids.write_atomically(grids.encode_panels(panels, cfg.trainer.sample_columns), args.out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/quality"))
    sub = parser.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("train")
    p.add_argument("name")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=250, help="checkpoint (and score) every N steps")
    p = sub.add_parser("evaluate")
    p.add_argument("names", nargs="+")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--test-data", default="data/fashion-mnist-32-test")
    p.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--nets", type=lambda s: s.split(","), default=None, help="e.g. G,r0.1 (default: all)")
    p = sub.add_parser("grid")
    p.add_argument("name")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--ema", choices=[*SCHEDULES, OLD_G_EMA], required=True)
    p.add_argument("--out", type=Path, required=True)
    args, overrides = parser.parse_known_args()
    if args.phase == "train":
        args.overrides = overrides
    elif overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.root = args.root.resolve()
    {"train": train, "evaluate": evaluate, "grid": grid}[args.phase](args)


if __name__ == "__main__":
    main()
