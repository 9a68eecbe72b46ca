"""``sagan eval``: score a checkpoint's generators (or a set of real images) and train the dataset classifier.

    sagan eval --checkpoint runs/default [--generator ema|g|both] [--metrics fid,kid,is,accuracy]
               [--num-samples N] [--extractor classifier|efficientnet-lite0|inception] [--weights FILE]
               [--reference URL] [--out FILE]
    sagan eval --data URL --reference URL        # real images against real images: the floor of FID
    sagan eval train-classifier --data URL [--test-data URL] [--epochs N]

Settings not given on the command line come from the checkpoint's ``eval`` config section (the
defaults of ``EvalConfig`` for ``--data``). The table goes to stdout, the JSON to ``--out``
(default: ``<run.dir>/eval/step_<N>-<extractor>.json`` of the checkpoint's run, ``eval.json`` for ``--data``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from data_pipeline.storage import open_store, split_url
from evaluation import EvalConfig, EvalResult, Evaluator, eval_result_name, format_table


def _eval_config(base: EvalConfig, args: argparse.Namespace) -> EvalConfig:
    changes = {
        "metrics": [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None,
        "num_samples": args.num_samples,
        "extractor": args.extractor,
        "inception_weights": args.weights,
        "reference_url": args.reference,
        "num_reference": args.num_reference,
    }
    cfg = dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})
    if not cfg.metrics:
        raise ValueError("--metrics is empty: give some of fid,kid,is,accuracy")
    return cfg


def _write(results: list[EvalResult], out: str) -> str:
    parent, name = split_url(out) if "/" in out.rstrip("/") else (".", out)
    store = open_store(parent)
    store.write_bytes(name, json.dumps([dataclasses.asdict(r) for r in results], indent=1).encode())
    return store.url_of(name)


def evaluate_command(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (args.data is None):
        raise ValueError("give either --checkpoint URL (score a generator) or --data URL (score real images)")
    if args.checkpoint is not None:
        return _evaluate_checkpoint(args)
    from data_pipeline.manifest import read_manifest

    cfg = _eval_config(EvalConfig(), args)
    manifest = read_manifest(args.data)
    evaluator = Evaluator(
        cfg,
        data_url=args.data,
        resolution=manifest.image_size,
        z_dim=1,
        num_classes=manifest.num_classes,
    )
    result = evaluator.evaluate_real(args.data, name=f"real {args.data}")
    print(format_table([result]))
    print(f"wrote {_write([result], args.out or 'eval.json')}")
    return 0


def _evaluate_checkpoint(args: argparse.Namespace) -> int:
    from launch.outcome import run_on_ranks
    from trainer.checkpoint.generator import GENERATORS, load_generators
    from trainer.runtime.distributed import init_runtime

    which = tuple(GENERATORS) if args.generator == "both" else (args.generator,)
    loaded = load_generators(args.checkpoint, which)  # laid out as the trainer evaluated them
    folder, cfg, num_classes, step = loaded.folder, loaded.config, loaded.num_classes, loaded.step
    eval_cfg = _eval_config(cfg.eval, args)
    generators = {GENERATORS[key]: G for key, G in loaded.nets.items()}
    runtime = init_runtime("auto")
    # The checkpoint's run folder, where the trainer writes its own evaluations: the checkpoints' parent
    # when they are in the default place (wherever the run folder is now), else the config's run.dir.
    run_dir = split_url(split_url(folder)[0])[0] if not cfg.checkpoint.url else cfg.run.dir

    def work() -> None:
        evaluator = Evaluator(
            eval_cfg,
            data_url=cfg.data.url,
            resolution=cfg.model.resolution,
            z_dim=cfg.model.z_dim,
            num_classes=num_classes,
            rank=runtime.rank,
            world_size=runtime.world_size,
            device=runtime.device,
        )
        results = [
            evaluator.evaluate(G.to(runtime.device), step=step, name=label) for label, G in generators.items()
        ]
        if runtime.is_main:
            print(format_table(results))
            out = args.out or open_store(run_dir).url_of(eval_result_name(step, eval_cfg.extractor))
            print(f"wrote {_write(results, out)}")

    return run_on_ranks("eval", runtime, work)


def train_classifier_command(args: argparse.Namespace) -> int:
    from evaluation.extractors.classifier import save_classifier, train_classifier

    if not args.data:
        raise ValueError("sagan eval train-classifier needs --data URL (a prepared dataset)")
    defaults = EvalConfig()
    model, info = train_classifier(
        args.data,
        test_url=args.test_data,
        epochs=args.epochs or defaults.classifier_epochs,
        width=defaults.classifier_width,
    )
    where = save_classifier(args.data, model, info)
    print(
        f"classifier for {args.data}: {100 * info.accuracy:.2f}% on {info.num_held_out} held-out images "
        f"({info.held_out}); {info.num_train} training images, {info.epochs} epochs, {info.seconds:.0f}s; "
        f"saved to {where}"
    )
    return 0
