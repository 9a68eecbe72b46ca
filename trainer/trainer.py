"""The training loop: resume → (D steps, G step, EMA) × max_steps → log, samples, checkpoints."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.errors import DataError, ObjectNotFound
from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import parse_size, prepare
from data_pipeline.storage import open_store
from data_pipeline.stream import ShardStream
from models.ema import EMA, ema_decay
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
from trainer.config import Config, ConfigError, checkpoint_location, to_dict
from trainer.distributed import Runtime
from trainer.evaluation import Evaluator, eval_result_name
from trainer.gan_step import make_backend
from trainer.metrics import Metrics
from trainer.run_log import RunLog
from trainer.termination import StopRequest, Terminated

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


def batch_norm_inputs(seed: int, num_batches: int, batch_size: int, z_dim: int, num_classes: int, device):
    """The z and labels G-EMA's batch-norm statistics are measured on: the same every time, on every rank,
    from a generator of their own (the training RNG is not touched)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_batches):
        z = torch.randn(batch_size, z_dim, generator=generator)
        y = torch.randint(0, num_classes, (batch_size,), generator=generator)
        yield z.to(device), y.to(device)


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
        self.ema_statistics_step = -1  # the step G-EMA's batch-norm statistics were measured at
        self.metrics = Metrics(
            cfg.metrics,
            runtime,
            backend=t.backend,
            precision=t.precision,
            checkpoint_interval_steps=cfg.checkpoint.interval_steps,
        )
        self.checkpointer = Checkpointer(
            checkpoint_location(cfg),
            cfg.checkpoint.keep_last,
            metrics=self.metrics,
        )
        self.run_log = RunLog(cfg.run.dir)
        self.evaluator = None  # eval.metrics=[]: no evaluation during training
        if cfg.eval.metrics:
            self.evaluator = Evaluator(
                cfg.eval,
                data_url=cfg.data.url,
                resolution=cfg.model.resolution,
                z_dim=cfg.model.z_dim,
                num_classes=self.num_classes,
                rank=runtime.rank,
                world_size=runtime.world_size,
                device=runtime.device,
                num_workers=cfg.data.num_workers,
            )
        self.step = 0
        self.last_grid, self.last_eval = "", None  # for the closing note
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

    def ready_ema(self) -> torch.nn.Module:
        """G-EMA with batch-norm statistics measured on its own weights at this step (every rank calls this).

        Sample grids, evaluation and checkpoints all use it, so ``sagan sample`` and ``sagan eval`` of a
        checkpoint see the trainer's G-EMA. Training never reads G-EMA's statistics: measuring them
        changes neither the run nor its RNG.
        """
        if self.ema_statistics_step != self.step:
            t = self.cfg.trainer
            self.ema.recompute_batch_norm(
                batch_norm_inputs(
                    t.seed,
                    t.ema_bn_batches,
                    t.bn_group_size or self.batch_size,  # the batch G's statistics were taken over
                    self.cfg.model.z_dim,
                    self.num_classes,
                    self.runtime.device,
                )
            )
            self.ema_statistics_step = self.step
        return self.ema.module

    def save_checkpoint(self, fid: float | None = None) -> None:
        """Stalls every rank only for the snapshot; rank 0 writes it in the background."""
        started = time.perf_counter()
        self.ready_ema()
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
        self.metrics.resumed_from(self.step)
        log.info("resumed from %s at step %d", where, self.step)

    # --- the loop ----------------------------------------------------------------------------------
    def train(self) -> None:
        """Train to ``trainer.max_steps``; on SIGTERM, stop early with a checkpoint (raises Terminated)."""
        with StopRequest() as stop:  # before the DataLoader forks its workers: they inherit the handler
            self._loop(stop)

    def _loop(self, stop: StopRequest) -> None:
        cfg, t, device = self.cfg, self.cfg.trainer, self.runtime.device
        self.maybe_resume()
        if self.evaluator is not None:
            self.evaluator.setup()  # extractors, classifier, reference features: fail now, not at the end
        batches = iter(self.stream)
        progress = tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=not self.runtime.is_main,
            unit="step",
            dynamic_ncols=True,
        )
        d_update = g_update = None
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
                self.metrics.nonfinite.inc(0 if d_update.applied else 1)
            z, y_fake = self._noise(t.n_dis)
            g_update = self.backend.g_step(z, y_fake)
            self.metrics.nonfinite.inc(0 if g_update.applied else 1)
            decay = ema_decay(self.step, decay=t.ema_decay, start_step=t.ema_start_step, rampup=t.ema_rampup)
            self.ema.update(self.backend.G, decay)
            self.step += 1
            self.metrics.record_step(
                time.perf_counter() - started, t.n_dis * self.batch_size, data_wait, step=self.step
            )
            progress.update()
            if self.step % t.log_interval == 0 or self.step == t.max_steps:
                self._log(d_update, g_update, progress)
            if self.step % t.sample_interval == 0 or self.step == t.max_steps:
                self._save_samples()
            fid = self.evaluate() if self._evaluation_due() else None
            if self.step % cfg.checkpoint.interval_steps == 0 or self.step == t.max_steps:
                self.save_checkpoint(fid=fid)
            if self.step % t.log_interval == 0 and self.step < t.max_steps and stop.agreed(device):
                self._stop_with_checkpoint()
        progress.close()
        if self.runtime.is_main:
            self.run_log.flush()
            self.checkpointer.wait()  # the job succeeds only once its last checkpoint is committed
            log.info("%s", self.closing_note())

    def closing_note(self) -> str:
        """What the run left: the last grid and, when evaluated, G-EMA's classifier-FID and sample accuracy."""
        lines = [f"finished at step {self.step}: checkpoints in {self.checkpointer.url}"]
        if self.last_grid:
            lines.append(f"  samples, one row per class (G-EMA left, G right): {self.last_grid}")
        if self.last_eval is not None:
            lines.append(f"  {self.last_eval.summary()}")
        return "\n".join(lines)

    def _stop_with_checkpoint(self) -> None:
        if self.step % self.cfg.checkpoint.interval_steps:  # else this step's checkpoint is on its way
            self.save_checkpoint()
        if self.runtime.is_main:
            self.run_log.flush()
            self.checkpointer.wait()
        raise Terminated(self.step)

    def _evaluation_due(self) -> bool:
        every = self.cfg.eval.interval_steps
        return self.evaluator is not None and (
            self.step == self.cfg.trainer.max_steps or (every > 0 and self.step % every == 0)
        )

    def evaluate(self) -> float | None:
        """Score G-EMA (every rank): Prometheus gauges, a run-log row, ``<run>/eval/step_N-<extractor>.json``;
        returns FID. An evaluation that fails is logged and counted, and training (and this step's
        checkpoint) goes on without its scores; what it needs was checked before the first step."""
        self.metrics.eval_running_since.set_to_current_time()
        try:
            result = self.evaluator.evaluate(self.ready_ema(), step=self.step, name="G-EMA")
        except Exception as err:
            self.metrics.eval_failures.inc()
            log.error(
                "rank %d: evaluation at step %d failed, training goes on: %s",
                self.runtime.rank,
                self.step,
                err,
            )
            return None
        finally:
            self.metrics.eval_running_since.set(0)
        self.last_eval = result
        self.metrics.record_eval(self.step, result.extractor, result.metrics, result.seconds)
        if self.runtime.is_main:
            self.run_log.append(
                {
                    "step": self.step,
                    "time": time.time(),
                    **{f"eval_{k}": v for k, v in result.metrics.items()},
                }
            )
            name = eval_result_name(self.step, result.extractor)
            self.run_store.write_bytes(name, result.to_json())
            log.info("evaluation: %s -> %s", result.summary(), self.run_store.url_of(name))
        return result.metrics.get("fid")

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
        m.record_optimizers(self.backend.learning_rates(), self.backend.loss_scales())
        m.record_device_memory()
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
        G_ema = self.ready_ema()
        if not self.runtime.is_main:
            return
        panels = {
            "G-EMA": samples.draw(G_ema, self.grid_z, self.grid_y),
            "G": samples.draw(self.backend.G, self.grid_z, self.grid_y),
        }
        name = f"samples/step_{self.step:07d}.png"
        try:
            self.run_store.write_bytes(name, samples.encode_panels(panels, self.cfg.trainer.sample_columns))
        except DataError as err:  # storage down for longer than its retries: a grid never stops a run
            log.warning("samples: cannot write %s (%s); training goes on", name, err)
            return
        self.last_grid = self.run_store.url_of(name)
        log.info("samples (G-EMA left, G right): %s", self.last_grid)
