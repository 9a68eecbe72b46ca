"""The GAN update on DeepSpeed: one engine for G and one for D, each with its own config.

Two engines keep the two time-scale update rule: each has its own Adam (``lr_g``/``betas_g`` and
``lr_d``/``betas_d``), ZeRO stage (``trainer.zero_stage``: 0, 1 or 2) and loss scaler. Precision
follows ``trainer.precision``: fp32; bf16 (DeepSpeed keeps bf16 weights in the modules and fp32
master weights in the optimizer); fp16 with a dynamic loss scale (needs an accelerator with fp16:
CUDA; DeepSpeed's CPU accelerator has none on most CPUs, which is rejected with a clear message).

The G step calls D's module directly with D's parameters frozen, so its backward reaches G's engine
only; D's engine never sees a backward it did not run the forward for.

``state_dict()`` is independent of the world size and has the same layout as ``DDPBackend``'s, so
either backend resumes the other's checkpoints on any number of ranks:

- ``G``, ``D``: module state dicts with the fp32 master weights (gathered from every rank's ZeRO
  partition) and the buffers in fp32;
- ``opt_g``, ``opt_d``: ``torch.optim.Adam`` state dicts (``step``, full ``exp_avg`` and
  ``exp_avg_sq`` per parameter, gathered the same way, in ``parameters()`` order);
- ``scaler_g``, ``scaler_d``: fp16 only, the dynamic loss scale in ``torch.amp.GradScaler``'s layout;
  the count of overflow-free steps restarts after a resume. Empty for fp32 and bf16.

Gathering is a collective: every rank must call ``state_dict()`` (the tensors are the same on all).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from trainer.backends.base import (
    GANBackend,
    Nets,
    Update,
    batch_norm_groups,
    fused_adam,
    lay_out_like_parameters,
    loss_weight,
    mean_over_ranks,
    rank_batch_size,
    step_if_finite,
    use_configured_hyperparameters,
)
from trainer.config import ConfigError, TrainerConfig
from trainer.runtime.distributed import Runtime, ensure_process_group

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read by deepspeed when it is first imported
import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

log = logging.getLogger("trainer")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
INITIAL_LOSS_SCALE_POWER = 16
LOSS_SCALE_WINDOW = 2000  # overflow-free steps before the loss scale doubles, as torch's GradScaler


def engine_config(cfg: TrainerConfig, per_rank_batch: int) -> dict[str, Any]:
    """The DeepSpeed config of one engine; the optimizer is ours, so lr and betas are not in it."""
    return {
        "train_micro_batch_size_per_gpu": per_rank_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": True},
        "fp16": {
            "enabled": cfg.precision == "fp16",
            "loss_scale": 0,  # 0: dynamic
            "initial_scale_power": INITIAL_LOSS_SCALE_POWER,
            "loss_scale_window": LOSS_SCALE_WINDOW,
            "hysteresis": 1,
            "min_loss_scale": 1,
        },
        # Buffers (batch-norm statistics, spectral norm's u and v) in the weights' precision, as the
        # power iteration multiplies them with the weights.
        "data_types": {"buffer_dtype": cfg.precision} if cfg.precision != "fp32" else {},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def check_supported(cfg: TrainerConfig) -> None:
    if cfg.zero_stage not in (0, 1, 2):
        raise ConfigError(
            f"trainer.zero_stage={cfg.zero_stage} is not supported: stage 3 partitions the weights, and the G "
            "step runs D's module outside its engine, which needs D's full weights; use 0, 1 or 2"
        )
    accelerator = get_accelerator()
    if cfg.precision == "fp16" and not accelerator.is_fp16_supported():
        raise ConfigError(
            f"trainer.precision=fp16: DeepSpeed's {accelerator.device_name()} accelerator here has no fp16 "
            "support; use trainer.precision=bf16 (or fp16 on a CUDA machine)"
        )
    if cfg.precision == "bf16" and not accelerator.is_bf16_supported():
        raise ConfigError(
            f"trainer.precision=bf16: DeepSpeed's {accelerator.device_name()} accelerator here has no bf16 "
            "support; use trainer.precision=fp16 or fp32"
        )


class DeepSpeedBackend(GANBackend):
    """DeepSpeed engines for G and D behind the same interface as ``DDPBackend``."""

    def __init__(self, G: nn.Module, D: nn.Module, cfg: TrainerConfig, runtime: Runtime):
        check_supported(cfg)
        if runtime.device.type == "cuda":
            # DeepSpeed puts its engines on cuda:$LOCAL_RANK: make that this rank's device (init_runtime's
            # choice), which differs where each rank sees one GPU (srun without torchrun).
            os.environ["LOCAL_RANK"] = str(runtime.device.index)
        ensure_process_group(runtime)
        if cfg.channels_last:
            log.info(
                "trainer.channels_last: not applied by the deepspeed backend (it broadcasts weights as bytes)"
            )
        if cfg.compile:
            log.warning("trainer.compile=true: not applied by the deepspeed backend; training runs eagerly")
        self.cfg = cfg
        self.world_size = runtime.world_size
        self.dtype = DTYPES[cfg.precision]
        per_rank_batch = rank_batch_size(cfg, runtime)
        self.loss_weight = loss_weight(cfg, runtime)  # uneven per-rank batches: see base.loss_weight
        G, D = G.to(runtime.device), D.to(runtime.device)
        _start_equal(G, D)
        self.g_engine = self._engine(
            batch_norm_groups(G, cfg, runtime), G, cfg.lr_g, cfg.betas_g, per_rank_batch
        )
        self.d_engine = self._engine(D, D, cfg.lr_d, cfg.betas_d, per_rank_batch)
        self.G, self.D = G, D  # the engines' modules, in the engines' precision
        self.device = runtime.device

    def _engine(self, module: nn.Module, net: nn.Module, lr: float, betas: list[float], batch: int):
        optimizer = fused_adam(net, lr, betas)
        engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=engine_config(self.cfg, batch), dist_init_required=False
        )
        if engine.optimizer is not optimizer and not engine.zero_optimization():
            # DeepSpeed's fp16/bf16 optimizer without ZeRO creates Adam's state with a step on zero
            # gradients; Adam would then count that step in its bias correction. Start from nothing.
            optimizer.state.clear()
        return engine

    # --- the update ----------------------------------------------------------------------------------
    def _nets(self) -> Nets:
        return Nets(
            generate_for_d=self.g_engine.module, d_train=self.d_engine, g_train=self.g_engine, d_frozen=self.D
        )

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.dtype)

    def _noise(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(self.dtype)

    def _apply(self, loss: torch.Tensor, net: str) -> Update:
        engine = self.g_engine if net == "g" else self.d_engine
        loss_mean = mean_over_ranks(loss, self.world_size)  # NaN on every rank when any rank's loss is
        if engine.optimizer is engine.basic_optimizer:
            # fp32 without ZeRO: DeepSpeed calls our fused Adam as is, so the decision is ours, on the device.
            engine.backward(loss)
            norm, skipped = step_if_finite(
                engine.optimizer, loss_mean, engine.module, self.device, step=engine.step
            )
            return Update(loss_mean, norm, skipped)
        # DeepSpeed's own optimizer checks the averaged gradients for inf/NaN on the host and skips such a
        # step. A non-finite mean loss makes every gradient NaN here (x * 1.0 is x), so all ranks skip alike.
        engine.backward(loss * torch.where(torch.isfinite(loss_mean), 1.0, torch.nan).to(loss.dtype))
        engine.step()
        norm = engine.get_global_grad_norm()
        norm = torch.as_tensor(torch.nan if norm is None else norm, dtype=torch.float32, device=self.device)
        skipped = torch.tensor(0.0 if engine.was_step_applied() else 1.0, device=self.device)
        return Update(loss_mean, norm.reshape(()), skipped)

    def learning_rates(self) -> dict[str, float]:
        return {"g": self.g_engine.get_lr()[0], "d": self.d_engine.get_lr()[0]}

    def loss_scales(self) -> dict[str, float]:
        return {
            net: float(engine.optimizer.loss_scale) if engine.fp16_enabled() else 1.0
            for net, engine in (("g", self.g_engine), ("d", self.d_engine))
        }

    # --- world-size-independent state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Full fp32 tensors in DDPBackend's layout; a collective: every rank calls it."""
        return {
            "G": _module_state(self.g_engine, self.G),
            "D": _module_state(self.d_engine, self.D),
            "opt_g": _adam_state(self.g_engine, self.G),
            "opt_d": _adam_state(self.d_engine, self.D),
            "scaler_g": _scaler_state(self.g_engine),
            "scaler_d": _scaler_state(self.d_engine),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for engine, net, key in ((self.g_engine, self.G, "G"), (self.d_engine, self.D, "D")):
            _load_module_state(engine, net, state[key])
            _load_adam_state(engine, net, state[f"opt_{key.lower()}"])
            _load_scaler_state(engine, state.get(f"scaler_{key.lower()}"))
            lr, betas = (self.cfg.lr_g, self.cfg.betas_g) if key == "G" else (self.cfg.lr_d, self.cfg.betas_d)
            use_configured_hyperparameters(engine.basic_optimizer, lr, betas)


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """On the CPU, floating point in fp32 (the checkpointer snapshots before training goes on)."""
    dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to("cpu", dtype)


def _masters(engine, net: nn.Module) -> dict[str, torch.Tensor] | None:
    """The optimizer's own fp32 copies of ``net``'s weights, by name, when it keeps separate ones."""
    if engine.zero_optimization():
        return None  # partitioned: gathered parameter by parameter
    if engine.optimizer is engine.basic_optimizer:
        return {}  # fp32 without ZeRO: the weights are the masters
    # fp16/bf16 without ZeRO: DeepSpeed's unfused optimizer pairs each weight with an fp32 copy.
    copies = {
        id(low): high
        for lows, highs in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups)
        for low, high in zip(lows, highs)
    }
    return {name: copies[id(param)] for name, param in net.named_parameters()}


def _module_state(engine, net: nn.Module) -> dict[str, torch.Tensor]:
    state = {name: _copy(value) for name, value in net.state_dict().items()}
    masters = _masters(engine, net)
    for name, param in net.named_parameters():
        if masters is None:
            state[name] = _copy(safe_get_full_fp32_param(param))
        elif name in masters:
            state[name] = _copy(masters[name])
    return state


def _load_module_state(engine, net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    net.load_state_dict(state)  # the weights in the engine's precision, and the buffers
    masters = _masters(engine, net)
    with torch.no_grad():
        for name, param in net.named_parameters():
            value = state[name].to(param.device, torch.float32)
            if masters is None:
                safe_set_full_fp32_param(param, value)
            elif name in masters:
                masters[name].copy_(value)


def _adam_state(engine, net: nn.Module) -> dict[str, Any]:
    """``torch.optim.Adam.state_dict()`` of the whole net: parameter i is ``list(net.parameters())[i]``."""
    adam = engine.basic_optimizer
    if not engine.zero_optimization():
        # One group holding the weights (or their fp32 copies) in parameters() order: Adam's own layout.
        return {
            "state": {i: {k: _copy(v) for k, v in s.items()} for i, s in adam.state_dict()["state"].items()},
            "param_groups": adam.state_dict()["param_groups"],
        }
    params = list(net.parameters())
    group = {key: value for key, value in adam.param_groups[0].items() if key != "params"}
    flat = adam.state.get(adam.param_groups[0]["params"][0])
    state: dict[int, dict[str, torch.Tensor]] = {}
    if flat:  # Adam creates its state at the first step
        for index, param in enumerate(params):
            moments = {key: _copy(safe_get_full_optimizer_state(param, key)) for key in ADAM_MOMENTS}
            state[index] = {"step": _copy(flat["step"]), **moments}
    return {"state": state, "param_groups": [{**group, "params": list(range(len(params)))}]}


def _load_adam_state(engine, net: nn.Module, saved: dict[str, Any]) -> None:
    adam = engine.basic_optimizer
    if not engine.zero_optimization():
        adam.load_state_dict(saved)
        lay_out_like_parameters(adam)  # a DDPBackend checkpoint's moments may be NHWC
        return
    hyper = {key: value for key, value in saved["param_groups"][0].items() if key != "params"}
    for group in adam.param_groups:
        group.update(hyper)
    if not saved["state"]:
        return
    step = next(iter(saved["state"].values()))["step"]
    for group in adam.param_groups:
        for flat in group["params"]:  # this rank's partition: moments filled in below
            adam.state[flat] = {
                "step": torch.as_tensor(step, dtype=torch.float32).to(
                    flat.device, copy=True
                ),  # fused Adam: on its device
                **{key: torch.zeros_like(flat) for key in ADAM_MOMENTS},
            }
    engine.optimizer._hp_optimizer_states_linked = False  # point each weight's fragment at the new state
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    for index, param in enumerate(net.parameters()):
        for key in ADAM_MOMENTS:
            saved_moment = saved["state"].get(index, {}).get(key)
            if saved_moment is not None:
                safe_set_full_optimizer_state(param, saved_moment.to(param.device, torch.float32), key)


def _scaler_state(engine) -> dict[str, Any]:
    """fp16: the dynamic loss scale in torch.amp.GradScaler's layout; otherwise nothing."""
    if not engine.fp16_enabled():
        return {}
    return {
        "scale": float(engine.optimizer.loss_scale),
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": LOSS_SCALE_WINDOW,
        "_growth_tracker": 0,
    }


def _load_scaler_state(engine, saved: dict[str, Any] | None) -> None:
    if engine.fp16_enabled() and saved:
        engine.optimizer.loss_scale = float(saved["scale"])


def _start_equal(*nets: nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere, before DeepSpeed casts them.

    DeepSpeed broadcasts parameters (not buffers) itself, as bytes, which fails for 0-dim tensors
    (attention's gamma): those are broadcast here and marked so that DeepSpeed skips them.
    """
    for net in nets:
        if torch.distributed.get_world_size() > 1:
            for tensor in [*net.parameters(), *net.buffers()]:
                torch.distributed.broadcast(tensor.data, 0)
        for param in net.parameters():
            if param.dim() == 0:
                param.ds_optim_param = True  # DeepSpeed's engine does not broadcast parameters so marked
