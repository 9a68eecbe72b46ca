"""The quality bar: train the default conditional SAGAN for a fixed step budget, with and without attention.

    .venv/bin/python benchmarks/quality_bench.py --phase train --steps 500       # the two trainings, in turn
    .venv/bin/python benchmarks/quality_bench.py --phase evaluate                 # G and G-EMA of each

Training runs `sagan train` (the default config) once per variant in its own run folder under
--root, one after the other, and records wall time and `uptime` load beside each run
(``bench.json``). A run that already reached the budget is not trained again.
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


def train(variant: str, steps: int, root: Path, data_url: str, timeout: float, checkpoint_interval: int) -> dict:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("train", "evaluate", "all"), default="all")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--root", type=Path, default=Path("runs/quality"))
    parser.add_argument("--data", default="data/fashion-mnist-32")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: attention,no-attention")
    parser.add_argument("--checkpoint-interval", type=int, default=200)
    parser.add_argument("--train-timeout", type=float, default=2.5 * 3600, help="seconds per training")
    args = parser.parse_args()
    if args.phase in ("train", "all"):
        for variant in args.variants.split(","):
            train(variant, args.steps, args.root.resolve(), args.data, args.train_timeout, args.checkpoint_interval)


if __name__ == "__main__":
    main()
