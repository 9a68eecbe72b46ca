"""The ``sagan`` command line: prepare data, train, draw samples."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence

from data_pipeline.errors import DataError
from data_pipeline.storage import CredentialFilter, scrub_credentials
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError

log = logging.getLogger("sagan")

# Bad input from the user: reported in one line, exit status 2.
USER_ERRORS = (ConfigError, DataError, CheckpointError, ValueError, OSError)


def _report(command: str, err: BaseException) -> int:
    print(f"sagan {command}: error: {_one_line(err)}", file=sys.stderr, flush=True)
    return 2


def _one_line(err: BaseException) -> str:
    """The first line of an error, without the ``[file.cc:123] `` prefix of torch's C++ errors, and
    without credentials."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return scrub_credentials(re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", line))


def _prepare(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import parse_size, prepare

    summary = prepare(
        args.source,
        args.out,
        image_size=args.image_size,
        shard_size=parse_size(args.shard_size),
        seed=args.seed,
        image_column=args.image_column,
        label_column=args.label_column,
    )
    print(summary)
    return 0


def _train(args: argparse.Namespace) -> int:
    from trainer.config import first_use_target, load_config
    from trainer.coordination import FailureNotice, record_for_launcher
    from trainer.distributed import init_runtime, shutdown
    from trainer.nonfinite import Diverged
    from trainer.preemption import Preempted
    from trainer.trainer import Trainer, ensure_dataset

    overrides = list(args.overrides)
    config_file = args.config
    if overrides and config_file is None and "=" not in overrides[0]:
        config_file = overrides.pop(0)  # `sagan train configs/smoke.yaml` reads as well as --config
    cfg = load_config(config_file, overrides)
    runtime = init_runtime(cfg.trainer.device, cfg.trainer.timeout_seconds)
    exit_code, together = 1, False
    notice = FailureNotice(runtime)  # another rank's failure ends this one at once, with its message
    try:
        ensure_dataset(cfg, runtime, first_use_target(cfg, config_file, overrides))
        Trainer(cfg, runtime).train()
        exit_code = 0
    except Preempted as stop:  # every rank stopped at the same step, its checkpoint committed
        if runtime.is_main:
            print(f"sagan train: {stop}", file=sys.stderr, flush=True)
        exit_code, together = stop.exit_code, True
    except BaseException as err:
        if not isinstance(err, (*USER_ERRORS, Diverged)):
            log.exception("rank %d failed", runtime.rank)  # the traceback, for what no one foresaw
        message, exit_code = notice.publish(_one_line(err), 2 if isinstance(err, USER_ERRORS) else 1)
        print(f"sagan train: error: {message}", file=sys.stderr, flush=True)
        record_for_launcher(message)
    finally:
        notice.stop()
        shutdown(runtime, exit_code, together=together or exit_code == 0)
    return exit_code


def _sample(args: argparse.Namespace) -> int:
    from trainer.samples import sample_grid

    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    path = sample_grid(args.checkpoint, args.out, classes=classes, columns=args.columns, seed=args.seed)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sagan", description="Distributed SAGAN training.")
    # The deepspeed launcher passes --local_rank=N before the subcommand; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="turn images into WebDataset shards and a manifest")
    p.add_argument("--source", required=True, help="fashion-mnist | digits | imagefolder:DIR | parquet:FILE")
    p.add_argument("--out", required=True, help="a local folder or s3://bucket/prefix")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--shard-size", default="64MB", help="target bytes per shard, e.g. 64MB")
    p.add_argument("--seed", type=int, default=0, help="the shuffle before sharding")
    p.add_argument("--image-column", default="image", help="parquet sources: the image-bytes column")
    p.add_argument("--label-column", default="label", help="parquet sources: the integer label column")
    p.set_defaults(run=_prepare)

    p = sub.add_parser("train", help="train SAGAN (no arguments: the built-in default run)")
    p.add_argument("--config", default=None, help="a YAML config file (default: the built-in default)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.max_steps=100"
    )
    p.set_defaults(run=_train)

    p = sub.add_parser("sample", help="draw a grid from a checkpoint's G-EMA, one row per class")
    p.add_argument("--checkpoint", required=True, help="a run folder, checkpoints folder or step folder")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--classes", default=None, help="comma-separated class ids (default: up to 10 classes)")
    p.add_argument("--columns", type=int, default=8, help="samples per class")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_sample)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(CredentialFilter())
    try:
        return args.run(args)
    except USER_ERRORS as err:
        return _report(args.command, err)
    except KeyboardInterrupt:
        print(f"sagan {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
