"""Screening the default run's settings: short trainings scored at the same steps, many G-EMA schedules at once.

    OMP_NUM_THREADS=1 python benchmarks/quality_screen.py train NAME [--steps 600] [--every 100] [key=value ...]
    python benchmarks/quality_screen.py evaluate NAME [NAME ...] [--num-samples 2000]

``train`` runs the built-in default config with the overrides, in this process, in ``--root/NAME``.
Beside the configured G-EMA it keeps a bank of G-EMA schedules (``SCHEDULES``), all updated from the
same G at every step; schedules never feed back into training, so one run compares them all. At every
checkpoint each is saved with its standing batch-norm statistics (``ema/<schedule>-step_N.pt``).

``evaluate`` scores, at every checkpoint step of each run: G; the configured G-EMA, with its standing
statistics and with G's statistics copied in (what G-EMA was before issue #14); and every schedule:
classifier-FID against the Fashion-MNIST test split and the classifier's accuracy on the samples.
Wall time per step comes from the run log; ``uptime`` load is printed with every table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from models.ema import EMA, batch_norm_layers, ema_decay

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
    from trainer.distributed import init_runtime

    run_dir = args.root / args.name
    overrides = [
        f"trainer.max_steps={args.steps}",
        f"run.dir={run_dir}",
        "metrics.port=0",
        "eval.metrics=[]",  # scored afterwards, by `evaluate`
        f"checkpoint.interval_steps={args.every}",
        "checkpoint.keep_last=1000",
        *args.overrides,
    ]
    cfg = load_config(None, overrides)
    runtime = init_runtime("cpu")
    trainer_module.ensure_dataset(cfg, runtime)

    class ScreenTrainer(trainer_module.Trainer):
        def save_checkpoint(self, fid=None):
            super().save_checkpoint(fid)
            inputs = dict(
                seed=cfg.trainer.seed,
                num_batches=cfg.trainer.ema_bn_batches,
                batch_size=self.batch_size,
                z_dim=cfg.model.z_dim,
                num_classes=self.num_classes,
                device=runtime.device,
            )
            (run_dir / "ema").mkdir(parents=True, exist_ok=True)
            for name, ema in self.ema.bank.items():
                ema.recompute_batch_norm(trainer_module.batch_norm_inputs(**inputs))
                torch.save(ema.state_dict(), run_dir / "ema" / f"{name}-step_{self.step}.pt")

    (run_dir).mkdir(parents=True, exist_ok=True)
    (run_dir / "screen.json").write_text(
        json.dumps({"overrides": args.overrides, "steps": args.steps, "load_before": os.getloadavg()})
    )
    trainer = ScreenTrainer(cfg, runtime)
    trainer.ema = EMABank(trainer, trainer.ema)
    started = time.perf_counter()
    trainer.train()
    record = json.loads((run_dir / "screen.json").read_text())
    record.update(wall_seconds=round(time.perf_counter() - started, 1), load_after=os.getloadavg())
    (run_dir / "screen.json").write_text(json.dumps(record))


def seconds_per_step(run_dir: Path) -> float | None:
    from trainer.run_log import read_run_log

    rows = sorted(
        (r["step"], r["time"]) for r in read_run_log(str(run_dir)).to_pylist() if r.get("loss_d") is not None
    )
    if len(rows) < 2:
        return None
    (s0, t0), (s1, t1) = rows[0], rows[-1]
    return (t1 - t0) / (s1 - s0)


def load_generator(cfg, num_classes: int, weights: dict, bn_from=None):
    """A generator with ``weights``; with ``bn_from``, that model's batch-norm statistics copied in
    (G-EMA's weights with G's statistics: G-EMA before issue #14)."""
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


def evaluate(args: argparse.Namespace) -> None:
    from trainer.checkpoint import load_folder
    from trainer.config import from_dict
    from trainer.evaluation import EvalConfig, Evaluator

    results = {}
    for name in args.names:
        run_dir = args.root / name
        out = run_dir / f"screen-eval-{args.num_samples}.json"
        scored = json.loads(out.read_text()) if out.exists() else {}
        folders = sorted(
            (p for p in (run_dir / "checkpoints").glob("step_*") if (p / "manifest.json").is_file()),
            key=lambda p: int(p.name[5:]),
        )
        evaluator = None
        for folder in folders:
            step = int(folder.name[5:])
            if args.steps and step not in args.steps:
                continue
            if str(step) in scored:
                continue
            state, manifest = load_folder(folder)
            cfg = from_dict(manifest["config"])
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

            def generator(weights, bn_from=None, cfg=cfg, num_classes=manifest["num_classes"]):
                return load_generator(cfg, num_classes, weights, bn_from)

            G = generator(state["backend"]["G"])
            nets = {"G": G, "G-EMA": generator(state["G_ema"]), "G-EMA, G's BN": generator(state["G_ema"], G)}
            for schedule in SCHEDULES:
                path = run_dir / "ema" / f"{schedule}-step_{step}.pt"
                if path.exists():
                    nets[f"ema {schedule}"] = generator(torch.load(path, weights_only=True))
            row = {}
            for label, net in nets.items():
                result = evaluator.evaluate(net, step=step, name=label)
                row[label] = {"fid": result.metrics["fid"], "accuracy": result.metrics["accuracy"]}
                print(
                    f"{name} step {step} {label}: FID {row[label]['fid']:.2f} acc {100 * row[label]['accuracy']:.1f}%",
                    flush=True,
                )
            scored[str(step)] = row
            out.write_text(json.dumps(scored, indent=1))
        results[name] = (scored, seconds_per_step(run_dir), evaluator)
    print(f"\nload {os.getloadavg()}, {args.num_samples} samples, classifier-FID vs test split / accuracy")
    for name, (scored, pace, evaluator) in results.items():
        real = evaluator.classifier_info.accuracy if evaluator and evaluator.classifier_info else float("nan")
        print(
            f"\n{name} ({'' if pace is None else f'{pace:.2f} s/step'}; classifier on real test {100 * real:.1f}%)"
        )
        labels = list(next(iter(scored.values())).keys()) if scored else []
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/screen"))
    sub = parser.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("train")
    p.add_argument("name")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=100, help="checkpoint (and score) every N steps")
    p = sub.add_parser("evaluate")
    p.add_argument("names", nargs="+")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--test-data", default="data/fashion-mnist-32-test")
    p.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=None)
    args, overrides = parser.parse_known_args()
    if args.phase == "train":
        args.overrides = overrides
    elif overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.root = args.root.resolve()
    if args.phase == "train":
        train(args)
    else:
        evaluate(args)


if __name__ == "__main__":
    main()
