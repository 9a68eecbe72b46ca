"""The training loop: resume → (D steps, G step, EMA) × max_steps → log, samples, checkpoints."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.errors import ObjectNotFound
from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import parse_size, prepare
from data_pipeline.storage import open_store
from data_pipeline.stream import ShardStream
from models.ema import EMA
from models.sagan import attention_gammas, build_models
from trainer import samples
from trainer.checkpoint import (
    Checkpointer,
    CheckpointError,
    gather_rng_states,
    load_for_resume,
    refuse_other_model,
    restore_rng_state,
)
from trainer.config import Config, ConfigError, to_dict
from trainer.distributed import Runtime
from trainer.gan_step import make_backend
from trainer.metrics import Metrics
from trainer.run_log import RunLog

log = logging.getLogger("trainer")


def ensure_dataset(cfg: Config, runtime: Runtime) -> None:
    """Prepare the configured dataset on first use (rank 0 only; the others wait for the manifest)."""
    if not cfg.data.prepare_source or not runtime.is_main:
        return
    try:
        read_manifest(cfg.data.url)
    except ObjectNotFound:
        log.info("no dataset at %s yet: preparing %s", cfg.data.url, cfg.data.prepare_source)
        prepare(
            cfg.data.prepare_source,
            cfg.data.url,
            image_size=cfg.model.resolution,
            shard_size=parse_size(cfg.data.prepare_shard_size),
            seed=cfg.trainer.seed,
        )


def noise(
    seed: int, step: int, phase: int, global_batch: int, z_dim: int, num_classes: int, rank_slice: slice
):
    """This rank's share of the global batch's z and labels for one update.

    The global batch is a pure function of (seed, step, phase), so a resumed run draws the same noise,
    whatever its world size.
    """
    state = np.random.SeedSequence((seed, step, phase)).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    z = torch.randn(global_batch, z_dim, generator=generator)
    y = torch.randint(0, num_classes, (global_batch,), generator=generator)
    return z[rank_slice], y[rank_slice]


class Trainer:
    def __init__(self, cfg: Config, runtime: Runtime):
        self.cfg, self.runtime = cfg, runtime
        t = cfg.trainer
        if t.global_batch_size % runtime.world_size:
            raise ConfigError(
                f"trainer.global_batch_size={t.global_batch_size} is not divisible by the world size "
                f"{runtime.world_size}"
            )
        self.batch_size = t.global_batch_size // runtime.world_size
        self.rank_slice = slice(runtime.rank * self.batch_size, (runtime.rank + 1) * self.batch_size)
        torch.manual_seed(t.seed)
        self.run_store = open_store(cfg.run.dir)  # a local folder or s3://: log, samples, evaluation
        self.stream = ShardStream(
            cfg.data,
            rank=runtime.rank,
            world_size=runtime.world_size,
            batch_size=self.batch_size,
            seed=t.seed,
            resolution=cfg.model.resolution,
        )
        self.num_classes = cfg.model.num_classes or self.stream.manifest.num_classes
        if cfg.model.num_classes and cfg.model.num_classes != self.stream.manifest.num_classes:
            raise ConfigError(
                f"model.num_classes={cfg.model.num_classes} but the dataset at {cfg.data.url} has "
                f"{self.stream.manifest.num_classes} classes"
            )
        G, D = build_models(cfg.model, self.num_classes)
        self.backend = make_backend(G, D, t, runtime)
        self.ema = EMA(self.backend.G)
        self.metrics = Metrics(cfg.metrics, runtime, backend=t.backend, precision=t.precision)
        self.checkpointer = Checkpointer(
            cfg.checkpoint.url or self.run_store.url_of("checkpoints"),
            cfg.checkpoint.keep_last,
            metrics=self.metrics,
        )
        self.run_log = RunLog(cfg.run.dir)
        self.step = 0
        grid = samples.grid_classes(self.num_classes)
        self.grid_z, self.grid_y = samples.fixed_inputs(
            cfg.model.z_dim, grid, t.sample_columns, t.seed, runtime.device
        )

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every rank calls this (it gathers per-rank RNG states, and a backend may gather shards)."""
        return {
            "step": self.step,
            "backend": self.backend.state_dict(),
            "G_ema": self.ema.state_dict(),
            "data": json.dumps(self.stream.state_dict()),  # the same on every rank
            "rng": gather_rng_states(),  # rank order, on rank 0
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.backend.load_state_dict(state["backend"])
        self.ema.load_state_dict(state["G_ema"])
        self.stream.load_state_dict(json.loads(state["data"]))
        restore_rng_state(state.get("rng"), self.runtime.rank)

    def save_checkpoint(self, fid: float | None = None) -> None:
        """Stalls every rank only for the snapshot; rank 0 writes it in the background."""
        started = time.perf_counter()
        state = self.state_dict()
        if self.runtime.is_main:
            meta = {
                "config": to_dict(self.cfg),
                "num_classes": self.num_classes,
                "world_size": self.runtime.world_size,
                "backend": self.cfg.trainer.backend,
            }
            self.run_log.flush()  # the log is as complete as the checkpoint
            self.checkpointer.save(self.step, state, meta, fid=fid)
        self.metrics.checkpoint_seconds.labels("stall").set(time.perf_counter() - started)

    def maybe_resume(self) -> None:
        if self.runtime.is_main:
            self.checkpointer.wait()  # a save still running from an earlier train() call
        found = load_for_resume(
            self.checkpointer,
            rank=self.runtime.rank,
            world_size=self.runtime.world_size,
            resume=self.cfg.checkpoint.resume,
        )
        if found is None:
            return
        step, state, manifest = found
        where = self.checkpointer.store.url_of(f"step_{step}")
        refuse_other_model(manifest, to_dict(self.cfg.model), self.num_classes, where)
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{where} does not fit this run: {first_line}") from None
        log.info("resumed from %s at step %d", where, self.step)

    # --- the loop ----------------------------------------------------------------------------------
    def train(self) -> None:
        cfg, t, device = self.cfg, self.cfg.trainer, self.runtime.device
        self.maybe_resume()
        batches = iter(self.stream)
        progress = tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=not self.runtime.is_main,
            unit="step",
            dynamic_ncols=True,
        )
        d_update = g_update = None
        skipped = torch.zeros((), device=device)  # updates skipped since the last log, counted on the device
        while self.step < t.max_steps:
            started = time.perf_counter()
            data_wait = 0.0
            for phase in range(t.n_dis):
                fetch = time.perf_counter()
                images, labels = next(batches)
                data_wait += time.perf_counter() - fetch
                real = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
                y_real = labels.to(device, non_blocking=True)
                z, y_fake = self._noise(phase)
                d_update = self.backend.d_step(real, y_real, z, y_fake)
                skipped += d_update.skipped
            z, y_fake = self._noise(t.n_dis)
            g_update = self.backend.g_step(z, y_fake)
            skipped += g_update.skipped
            self.ema.update(self.backend.G, 0.0 if self.step < t.ema_start_step else t.ema_decay)
            self.step += 1
            self.metrics.record_step(time.perf_counter() - started, t.n_dis * self.batch_size, data_wait)
            progress.update()
            if self.step % t.log_interval == 0 or self.step == t.max_steps:
                self.metrics.nonfinite.inc(float(skipped))  # host synchronisations only when logging
                skipped.zero_()
                self._log(d_update.read(), g_update.read(), progress)
            if self.step % t.sample_interval == 0 or self.step == t.max_steps:
                self._save_samples()
            if self.step % cfg.checkpoint.interval_steps == 0 or self.step == t.max_steps:
                self.save_checkpoint()
        progress.close()
        if self.runtime.is_main:
            self.run_log.flush()
            self.checkpointer.wait()  # the job succeeds only once its last checkpoint is committed

    def _noise(self, phase: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.cfg.trainer
        z, y = noise(
            t.seed,
            self.step,
            phase,
            t.global_batch_size,
            self.cfg.model.z_dim,
            self.num_classes,
            self.rank_slice,
        )
        if self.runtime.device.type == "cuda":  # a copy from pinned memory does not wait for the device
            z, y = z.pin_memory(), y.pin_memory()
        return z.to(self.runtime.device, non_blocking=True), y.to(self.runtime.device, non_blocking=True)

    def _log(self, d_update, g_update, progress) -> None:
        m = self.metrics
        rate = m.close_interval()
        m.loss.labels("d").set(d_update.loss)
        m.loss.labels("g").set(g_update.loss)
        m.grad_norm.labels("d").set(d_update.grad_norm)
        m.grad_norm.labels("g").set(g_update.grad_norm)
        gammas = {}
        for net, module in (("g", self.backend.G), ("d", self.backend.D)):
            for layer, value in attention_gammas(module).items():
                m.gamma.labels(net, layer).set(value)
                gammas[f"gamma_{net}_{layer}"] = value
        m.record_data_counters(self.stream.counters())
        if self.runtime.is_main:
            row = {
                "step": self.step,
                "time": time.time(),
                "loss_d": d_update.loss,
                "loss_g": g_update.loss,
                "grad_norm_d": d_update.grad_norm,
                "grad_norm_g": g_update.grad_norm,
                "images_per_second": rate * self.runtime.world_size,
                "epoch": self.stream.epoch,
                **gammas,
            }
            self.run_log.append(row)
            progress.set_postfix(d=f"{d_update.loss:.3f}", g=f"{g_update.loss:.3f}", img_s=f"{rate:.0f}")

    def _save_samples(self) -> None:
        if not self.runtime.is_main:
            return
        images = samples.draw(self.ema.module, self.grid_z, self.grid_y)
        name = f"samples/step_{self.step:07d}.png"
        self.run_store.write_bytes(name, samples.encode_grid(images, self.cfg.trainer.sample_columns))
        log.info("samples: %s", self.run_store.url_of(name))
