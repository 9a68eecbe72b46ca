"""The typed config tree: dataclasses, loaded from YAML and overridden by dotted ``key=value`` arguments."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.config import DataConfig  # checks itself when built: data.* is validated there
from data_pipeline.errors import first_line
from evaluation.config import EvalConfig
from models.sagan import ModelConfig


class ConfigError(Exception):
    """A bad config file, key or value. The message is one line and names the key."""


@dataclass
class TrainerConfig:
    backend: str = "ddp"  # ddp | deepspeed
    max_steps: int = 2000  # generator updates
    global_batch_size: int = 32  # real images per D step, summed over ranks
    n_dis: int = 1  # D updates per G update
    # The default run's learning rates (docs/quality.md); the paper's 1e-4 / 4e-4 are in sagan_imagenet128.yaml.
    lr_g: float = 2e-4
    lr_d: float = 8e-4
    betas_g: list[float] = field(default_factory=lambda: [0.0, 0.9])
    betas_d: list[float] = field(default_factory=lambda: [0.0, 0.9])
    precision: str = "fp32"  # fp32 | bf16 | fp16
    seed: int = 0
    ema_decay: float = 0.9999  # G-EMA's decay once ramped up
    ema_start_step: int = 0  # before this step G-EMA copies G
    ema_rampup: float = 0.1  # G-EMA averages over at most this share of the steps so far; 0: no ramp-up
    ema_bn_batches: int = 16  # batches of G-EMA's own forward passes that measure its batch-norm statistics
    device: str = "auto"  # auto | cpu | cuda
    log_interval: int = 20
    sample_interval: int = 500
    sample_columns: int = 8
    zero_stage: int = 1  # DeepSpeed ZeRO stage (0, 1 or 2)
    bn_group_size: int = 0  # G's batch-norm statistics per group of this many samples; 0: the rank's batch
    timeout_seconds: int = 600  # a collective that waits longer fails the job instead of hanging it
    preemption_grace_seconds: float = 25.0  # SIGTERM/SIGINT to exit: finish the step, checkpoint, leave
    nonfinite_reload_after: int = 100  # skipped updates in a row before reloading a checkpoint; 0: never
    nonfinite_max_reloads: int = 3  # then the run stops: it diverges
    channels_last: bool = True  # NHWC weights and activations (ddp backend): faster convolutions
    compile: bool = False  # torch.compile the step's passes (ddp backend); eager when it cannot
    keep_host_memory: bool = (
        True  # glibc: freed host memory kept for the next step (trainer/runtime/host_memory.py)
    )
    # No step completed for this long: every thread's stack to <run.dir>/diagnostics (runtime/watchdog.py);
    # 0: max(300 s, 20 x the median step). on_stall: dump | restart (exit, torchrun restarts) | auto
    # (restart under torchrun with --max-restarts > 0, else dump).
    stall_seconds: float = 0.0
    on_stall: str = "auto"
    # CUDA: the out-of-memory snapshot (diagnostics/step_<N>/rank_<R>-memory.pickle) also holds the last N
    # allocations with their Python stacks (torch.cuda.memory._record_memory_history); 0: the blocks alone,
    # at no cost (recording takes host time at every allocation).
    memory_history: int = 0


@dataclass
class CheckpointConfig:
    url: str = ""  # "" = <run.dir>/checkpoints; a local path or s3://bucket/prefix
    interval_steps: int = 500
    keep_last: int = 3
    resume: bool = True  # continue from the newest checkpoint under url when there is one


@dataclass
class MetricsConfig:
    port: int = 9400  # every rank serves /metrics on port + local_rank; 0 disables
    host: str = "127.0.0.1"


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[Any, ...]] = {
    "trainer.backend": ("ddp", "deepspeed"),
    "trainer.precision": ("fp32", "bf16", "fp16"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.zero_stage": (0, 1, 2),
    "trainer.on_stall": ("auto", "dump", "restart"),
}
POSITIVE = (
    "trainer.max_steps",
    "trainer.global_batch_size",
    "trainer.n_dis",
    "trainer.lr_g",
    "trainer.lr_d",
    "trainer.log_interval",
    "trainer.sample_interval",
    "trainer.sample_columns",
    "trainer.timeout_seconds",
    "trainer.preemption_grace_seconds",
    "trainer.ema_bn_batches",
    "checkpoint.interval_steps",
    "checkpoint.keep_last",
)
NON_NEGATIVE = (
    "metrics.port",
    "trainer.seed",
    "trainer.bn_group_size",
    "trainer.nonfinite_reload_after",
    "trainer.nonfinite_max_reloads",
    "trainer.ema_start_step",
    "trainer.ema_rampup",
    "trainer.stall_seconds",
    "trainer.memory_history",
)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The default config, updated by the YAML file at ``path`` and then by ``key=value`` overrides."""
    tree = _read_file(path)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is a value, not a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def config_arguments(config_file: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """A command line's config file and overrides: ``--config FILE`` or a first argument without ``=``."""
    overrides = list(overrides)
    if overrides and config_file is None and "=" not in overrides[0]:
        config_file = overrides.pop(0)  # `sagan train configs/smoke.yaml` reads as well as --config
    return config_file, overrides


def config_from_arguments(config_file: str | None, overrides: list[str]) -> Config:
    """The config of a command line (see ``config_arguments``)."""
    return load_config(*config_arguments(config_file, overrides))


def _read_file(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {first_line(err)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(loaded).__name__}")
    return loaded or {}


def first_use_target(cfg: Config, path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> str:
    """The data.url that data.prepare_source may fill on first use: the data.url configured in the same
    place as the source (the YAML file, or the built-in default), or any data.url when the command line
    names the source itself. So a data.url given elsewhere (a typo on the command line, a file that sets
    data.url but not the source) is never filled with a stock dataset."""
    if "data.prepare_source" in {item.partition("=")[0].strip() for item in overrides}:
        return cfg.data.url
    data = _read_file(path).get("data")
    if isinstance(data, dict) and "prepare_source" in data:
        return str(data.get("url", DataConfig().url))
    return DataConfig().url


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(tree: dict[str, Any]) -> Config:
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def checkpoint_location(cfg: Config) -> str:
    """Where the run's checkpoints go: ``checkpoint.url``, or ``<run.dir>/checkpoints`` when it is empty."""
    return cfg.checkpoint.url or f"{cfg.run.dir.rstrip('/')}/checkpoints"


def get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")
    for key in POSITIVE:
        if get(cfg, key) <= 0:
            raise ConfigError(f"{key}={get(cfg, key)!r} must be positive")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise ConfigError(f"{key}={get(cfg, key)!r} must not be negative")
    for key in ("trainer.betas_g", "trainer.betas_d"):
        betas = get(cfg, key)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"{key}={betas!r} must be two numbers in [0, 1)")
    if not 0.0 <= cfg.trainer.ema_decay < 1.0:
        raise ConfigError(f"trainer.ema_decay={cfg.trainer.ema_decay!r} must be in [0, 1)")
    if not cfg.data.url:
        raise ConfigError("data.url is empty: give a shard folder or an s3:// prefix")


def _build(cls: type, tree: Any, prefix: str) -> Any:
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a section (a mapping), not {tree!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{dotted}: unknown key{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, kind, dotted)
    try:
        return cls(**kwargs)  # a section's dataclass checks its own values (models, data, evaluation)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _coerce(value: Any, kind: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is not str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-4 as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    raise ConfigError(f"{key}: unsupported type {kind}")
