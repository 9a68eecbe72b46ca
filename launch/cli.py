"""The ``sagan`` command line: prepare data, train, evaluate, draw samples, export a generator, generate
images, report on a run, dump a running job's stacks, submit to Kubernetes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from data_pipeline.storage import CredentialFilter
from launch import submit
from launch.outcome import USER_ERRORS, report, run_on_ranks

log = logging.getLogger("sagan")


def _prepare(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import parse_size, prepare
    from launch.prepare_ranks import COLLECTIVE_TIMEOUT_SECONDS, prepare_ranks
    from trainer.runtime.distributed import init_runtime

    shard_size = parse_size(args.shard_size)  # bad input fails before any rank waits for another
    runtime = init_runtime("cpu", COLLECTIVE_TIMEOUT_SECONDS)

    def work() -> None:
        summary = prepare(
            args.source,
            args.out,
            image_size=args.image_size,
            shard_size=shard_size,
            shard_samples=args.shard_samples,
            seed=args.seed,
            image_column=args.image_column,
            label_column=args.label_column,
            synsets=args.synsets,
            format=args.format,
            quality=args.quality,
            crop=args.crop,
            resize_filter=args.resize_filter,
            workers=args.workers,
            ranks=prepare_ranks(runtime),
            progress=runtime.is_main,
        )
        if runtime.is_main:
            print(summary, flush=True)

    return run_on_ranks("prepare", runtime, work)


def _train(args: argparse.Namespace) -> int:
    from trainer.config import config_arguments, first_use_target, load_config
    from trainer.runtime.distributed import init_runtime
    from trainer.trainer import Trainer, ensure_dataset

    config_file, overrides = config_arguments(args.config, args.overrides)
    cfg = load_config(config_file, overrides)
    runtime = init_runtime(cfg.trainer.device, cfg.trainer.timeout_seconds)

    def work() -> None:
        ensure_dataset(cfg, runtime, first_use_target(cfg, config_file, overrides))
        Trainer(cfg, runtime).train()

    return run_on_ranks("train", runtime, work)


def _sample(args: argparse.Namespace) -> int:
    from trainer.observability.grids import sample_grid

    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    path = sample_grid(
        args.checkpoint,
        args.out,
        classes=classes,
        columns=args.columns,
        seed=args.seed,
        generator=args.generator,
    )
    print(f"wrote {path}")
    return 0


def _report_run(args: argparse.Namespace) -> int:
    from trainer.observability.report import write_report

    print(f"wrote {write_report(args.run_url, args.out)}")
    return 0


def _stacks(args: argparse.Namespace) -> int:
    from launch.stacks_command import stacks

    return stacks(args)


def _eval(args: argparse.Namespace) -> int:
    from launch.eval_command import evaluate_command, train_classifier_command

    return train_classifier_command(args) if args.action == "train-classifier" else evaluate_command(args)


def _export(args: argparse.Namespace) -> int:
    from launch.export_command import export_command

    return export_command(args)


def _generate(args: argparse.Namespace) -> int:
    from launch.generate_command import generate_command

    return generate_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sagan", description="Distributed SAGAN training.")
    # The deepspeed launcher passes --local_rank=N before the subcommand; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prepare",
        help="turn images into WebDataset shards and a manifest",
        description="Under mpiexec, torchrun or srun the ranks share the work; a re-run of an interrupted "
        "prepare with the same arguments keeps the shards it committed.",
    )
    p.add_argument("--source", required=True, help="fashion-mnist | digits | imagefolder:DIR | parquet:FILE")
    p.add_argument("--out", required=True, help="a local folder or s3://bucket/prefix")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--shard-size", default="64MB", help="target bytes per shard, e.g. 64MB")
    p.add_argument(
        "--shard-samples", type=int, default=None, help="samples per shard (instead of --shard-size)"
    )
    p.add_argument("--seed", type=int, default=0, help="the shuffle before sharding")
    p.add_argument(
        "--format", default="png", choices=["png", "jpeg", "webp", "raw"], help="how images are stored"
    )
    p.add_argument("--quality", type=int, default=None, help="jpeg and webp: 1..100 (default 90)")
    p.add_argument("--crop", default="center", choices=["center", "none"], help="center: the centred square")
    p.add_argument(
        "--resize-filter",
        default="lanczos",
        choices=["lanczos", "bicubic", "bilinear", "hamming", "box", "nearest"],
        help="Pillow's filter for the resize after the crop",
    )
    p.add_argument(
        "--synsets",
        default=None,
        help="imagefolder: a synset mapping file (class i = line i, ImageNet order)",
    )
    p.add_argument("--workers", type=int, default=1, help="processes per rank that decode and encode")
    p.add_argument("--image-column", default="image", help="parquet sources: the image-bytes column")
    p.add_argument("--label-column", default="label", help="parquet sources: the integer label column")
    p.set_defaults(run=_prepare)

    p = sub.add_parser("train", help="train SAGAN (no arguments: the built-in default run)")
    p.add_argument("--config", default=None, help="a YAML config file (default: the built-in default)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.max_steps=100"
    )
    p.set_defaults(run=_train)

    p = sub.add_parser("eval", help="FID, KID, IS and class accuracy of a checkpoint (or of real images)")
    p.add_argument("action", nargs="?", choices=["train-classifier"], help="train the dataset's classifier")
    p.add_argument("--checkpoint", default=None, help="a run folder, checkpoints folder or step folder")
    p.add_argument("--data", default=None, help="real images to score instead (train-classifier: its data)")
    p.add_argument("--metrics", default=None, help="comma-separated: fid,kid,is,accuracy (default: all)")
    p.add_argument(
        "--num-samples", type=int, default=None, help="images to generate (default: eval.num_samples)"
    )
    p.add_argument("--extractor", default=None, help="classifier | efficientnet-lite0 | inception")
    p.add_argument("--weights", default=None, help="the Inception weights file, for --extractor inception")
    p.add_argument(
        "--reference", default=None, help="the real images to compare with (default: the training data)"
    )
    p.add_argument("--num-reference", type=int, default=None, help="first N reference images; 0: all")
    p.add_argument("--generator", choices=["ema", "g", "both"], default="ema", help="G-EMA, G, or both")
    p.add_argument("--test-data", default="", help="train-classifier: held-out real images (a test split)")
    p.add_argument("--epochs", type=int, default=None, help="train-classifier: epochs")
    p.add_argument(
        "--out", default=None, help="the JSON to write (default: <run>/eval/<step>-<extractor>.json)"
    )
    p.set_defaults(run=_eval)

    p = sub.add_parser("sample", help="draw a grid from a checkpoint's G-EMA and G, one row per class")
    p.add_argument("--checkpoint", required=True, help="a run folder, checkpoints folder or step folder")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--classes", default=None, help="comma-separated class ids (default: up to 10 classes)")
    p.add_argument("--columns", type=int, default=None, help="samples per class (default: the run's, 8)")
    p.add_argument("--seed", type=int, default=None, help="the noise (default: the run's, as in its grids)")
    p.add_argument(
        "--generator",
        choices=("both", "ema", "g"),
        default="both",
        help="both: G-EMA and G side by side (as the run's grids); ema or g: one of them",
    )
    p.set_defaults(run=_sample)

    p = sub.add_parser(
        "export",
        help="a checkpoint's generator as safetensors, TorchScript and ONNX files, with a model card",
    )
    p.add_argument("--checkpoint", required=True, help="a run folder, checkpoints folder or step folder")
    p.add_argument("--out", required=True, help="the folder to write (local or s3://…)")
    p.add_argument(
        "--format",
        default="safetensors,torchscript,onnx",
        help="comma-separated: safetensors,torchscript,onnx",
    )
    p.add_argument("--generator", choices=("ema", "g"), default="ema", help="G-EMA (default) or G")
    p.set_defaults(run=_export)

    p = sub.add_parser(
        "generate",
        help="N images of a checkpoint's generator as class folders of PNGs or as shards with a manifest",
        description="Under torchrun or mpiexec the ranks share the work; image i is a function of (seed, i), "
        "so any world size and batch size write the same images; a re-run keeps what was committed.",
    )
    p.add_argument("--checkpoint", required=True, help="a run folder, checkpoints folder or step folder")
    # --num-images: what to write under torchrun, whose own parser takes --num for its --numa-binding
    p.add_argument("--num", "--num-images", dest="num", type=int, required=True, help="how many images")
    p.add_argument("--out", required=True, help="the folder to write (local or s3://…)")
    p.add_argument("--classes", default=None, help="comma-separated class ids (default: every class)")
    p.add_argument(
        "--format",
        default="png",
        choices=("png", "shards"),
        help="png: <out>/<class>/<index>.png; shards: tar",
    )
    p.add_argument("--seed", type=int, default=0, help="the noise and the classes of the images")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--generator", choices=("ema", "g"), default="ema", help="G-EMA (default) or G")
    p.add_argument(
        "--shard-samples",
        type=int,
        default=1000,
        help="images per shard (png: per part), the unit a rank makes and a re-run keeps",
    )
    p.set_defaults(run=_generate)

    p = sub.add_parser("report", help="PNG plots of a run's log and its latest samples, in one index.html")
    p.add_argument("run_url", metavar="RUN_URL", help="the run folder (run.dir): a local folder or s3://…")
    p.add_argument("--out", required=True, help="the folder to write (local or s3://…)")
    p.set_defaults(run=_report_run)

    p = sub.add_parser(
        "stacks",
        help="every rank's stacks and collectives of a running job, without stopping it",
        description="Asks the job writing to RUN_URL (its run.dir) for the stall watchdog's dump on every "
        "rank: <run.dir>/diagnostics/request_<id>/rank_<R>.txt.",
    )
    p.add_argument("run_url", metavar="RUN_URL", help="the job's run folder (run.dir): local or s3://…")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for every rank (default 60)")
    p.set_defaults(run=_stacks)

    submit.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(CredentialFilter())
    try:
        return args.run(args)
    except USER_ERRORS as err:
        return report(args.command, err)
    except KeyboardInterrupt:
        print(f"sagan {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
