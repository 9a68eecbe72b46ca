"""The training loop: resume → (D steps, G step, EMA) × max_steps → log, samples, checkpoints."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.errors import DataError, first_line
from data_pipeline.first_use import open_or_prepare
from data_pipeline.storage import open_store
from data_pipeline.stream import ShardStream, split_batch
from evaluation import Evaluator, eval_result_name
from models.ema import EMA, batch_norm_inputs, ema_decay
from models.sagan import attention_gammas, build_models
from trainer.backends import make_backend
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.format import CheckpointError
from trainer.checkpoint.resume import (
    changed_settings,
    gather_rng_states,
    load_for_resume,
    refuse_other_model,
    refuse_settings_kept_on_resume,
    restore_rng_state,
)
from trainer.config import Config, ConfigError, checkpoint_location, to_dict
from trainer.observability import grids
from trainer.observability.metrics import Metrics
from trainer.observability.run_log import RunLog
from trainer.runtime.coordination import ControlGroup
from trainer.runtime.distributed import Runtime
from trainer.runtime.host_memory import keep_freed_memory
from trainer.runtime.nonfinite import Diverged, NonFiniteGuard
from trainer.runtime.preemption import EXIT_SECONDS, Preempted, Preemption
from trainer.runtime.watchdog import OutOfMemory, StallWatchdog

log = logging.getLogger("trainer")

# Where a rank is in its step, for the stall watchdog (on CUDA the host runs ahead of the device: a
# dump's flight-recorder trace says which collective the device waits in).
D_STEP = "D step: G's forward, D's forward and backward (all_reduce of D's gradients), Adam"
G_STEP = "G step: G's and D's forward, backward (all_reduce of G's gradients), Adam, G-EMA"


def ensure_dataset(cfg: Config, runtime: Runtime, prepare_into: str | None = None) -> None:
    """Prepare the configured dataset on first use (``data_pipeline.first_use``: rank 0 prepares, the
    others wait); ``prepare_into`` (``config.first_use_target``) is the only data.url it may fill."""
    open_or_prepare(
        cfg.data,
        image_size=cfg.model.resolution,
        seed=cfg.trainer.seed,
        rank=runtime.rank,
        prepare_into=prepare_into,
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
        if t.keep_host_memory:
            keep_freed_memory()  # before the run's first large allocation; a no-op without glibc
        if t.global_batch_size < runtime.world_size:
            raise ConfigError(
                f"trainer.global_batch_size={t.global_batch_size} is smaller than the world size "
                f"{runtime.world_size}: every rank needs a sample"
            )
        # A world size that does not divide the global batch (an elastic job at any size) gives some ranks
        # one sample more; the backends weight each rank's loss so the gradient is the global-batch mean.
        batch_sizes = split_batch(t.global_batch_size, runtime.world_size)
        self.batch_size = batch_sizes[runtime.rank]
        first = sum(batch_sizes[: runtime.rank])
        self.rank_slice = slice(first, first + self.batch_size)
        torch.manual_seed(t.seed)
        self.run_store = open_store(cfg.run.dir)  # a local folder or s3://: log, samples, evaluation
        self.stream = ShardStream(
            cfg.data,
            rank=runtime.rank,
            world_size=runtime.world_size,
            batch_size=self.batch_size,
            seed=t.seed,
            resolution=cfg.model.resolution,
            batch_sizes=batch_sizes,
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
            interval_steps=cfg.checkpoint.interval_steps,
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
        self.control = ControlGroup(runtime, t.timeout_seconds)
        self.preemption = Preemption(t.preemption_grace_seconds)
        self.watchdog = StallWatchdog(
            runtime,
            cfg.run.dir,
            stall_seconds=t.stall_seconds,
            on_stall=t.on_stall,
            long_phase_seconds=t.timeout_seconds,
            dumps_counter=self.metrics.stall_dumps,
            last_step_gauge=self.metrics.last_step_timestamp,
            deadline_gauge=self.metrics.stall_deadline,
        )
        self.batch_shape: tuple[int, ...] | None = None  # this rank's last batch, for an out-of-memory dump
        if t.memory_history and runtime.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=t.memory_history)
        self.step = 0
        self.saved_step: int | None = None  # the step of the last checkpoint handed to the writer
        self.progress: tqdm | None = None
        self.nonfinite = NonFiniteGuard(t.nonfinite_reload_after, t.nonfinite_max_reloads)
        self.last_grid, self.last_eval = "", None  # for the closing note
        grid = grids.grid_classes(self.num_classes)
        self.grid_z, self.grid_y = grids.fixed_inputs(
            cfg.model.z_dim, grid, t.sample_columns, t.seed, runtime.device
        )

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every rank calls this (it gathers per-rank RNG states, and a backend may gather shards)."""
        return {
            "step": self.step,
            "backend": self.backend.state_dict(),
            "G_ema": self.ema.state_dict(),
            # Its batch-norm statistics are this step's only if measured at this step (for a grid or an
            # evaluation); otherwise a reader measures them (models.ema.load_ema_generator), not the loop.
            "G_ema_statistics": {**self.ema_statistics_recipe(), "step": self.ema_statistics_step},
            "data": json.dumps(self.stream.state_dict()),  # the same on every rank
            "rng": gather_rng_states(),  # rank order, on rank 0
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.backend.load_state_dict(state["backend"])
        self.ema.load_state_dict(state["G_ema"])
        self.ema_statistics_step = -1  # new weights, maybe at a step measured before: measure again
        self.stream.load_state_dict(json.loads(state["data"]))
        restore_rng_state(state.get("rng"), self.runtime.rank)

    def ema_with_own_statistics(self) -> torch.nn.Module:
        """G-EMA with batch-norm statistics measured on its own weights at this step (every rank calls this).

        Sample grids and evaluation use it. A checkpoint saves G-EMA with the recipe of these statistics
        and the step they were measured at; ``sagan sample`` and ``sagan eval`` of a checkpoint of another
        step measure them the same way (``models.ema.load_ema_generator``), so they see the trainer's
        G-EMA while a save never waits for it. Training never reads G-EMA's statistics: measuring them
        changes neither the run nor its RNG.
        """
        if self.ema_statistics_step != self.step:
            recipe = self.ema_statistics_recipe()
            inputs = batch_norm_inputs(
                **recipe, z_dim=self.cfg.model.z_dim, num_classes=self.num_classes, device=self.runtime.device
            )
            self.ema.recompute_batch_norm(inputs)
            self.ema_statistics_step = self.step
        return self.ema.module

    def ema_statistics_recipe(self) -> dict[str, int]:
        """What G-EMA's batch-norm statistics are measured on (``models.ema.batch_norm_inputs``)."""
        t = self.cfg.trainer
        # The batch G's statistics were taken over (rank 0's, in a checkpoint).
        return {
            "seed": t.seed,
            "num_batches": t.ema_bn_batches,
            "batch_size": t.bn_group_size or self.batch_size,
        }

    def save_checkpoint(self, fid: float | None = None) -> None:
        """Stalls every rank only for the snapshot; rank 0 writes it in the background (after the previous
        save, which every rank waits for in short collectives, never one as long as the upload)."""
        with self.watchdog.phase("checkpoint"):
            self.control.wait_for_rank0(self.checkpointer.wait_until_idle)
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
        self.saved_step = self.step
        self.metrics.checkpoint_seconds.labels("stall").set(time.perf_counter() - started)

    def wait_for_checkpoint(self, deadline: float | None = None) -> None:
        """Every rank: return once rank 0's last save is committed; raise its CheckpointError on every rank
        when it could not be (or, given a ``deadline`` in time.monotonic(), was not by then)."""
        with self.watchdog.phase("checkpoint"):
            in_time = self._wait_for_writer(deadline)
        error = None
        if self.runtime.is_main:
            try:
                if not in_time:
                    raise CheckpointError(self._not_committed_in_time(self.saved_step))
                self.checkpointer.wait()
            except CheckpointError as err:
                error = str(err)
        error = self.control.from_rank0(error)
        if error:
            raise CheckpointError(error)

    def _wait_for_writer(self, deadline: float | None = None) -> bool:
        """Every rank, in collectives of a second each: until rank 0 writes no checkpoint, or the deadline
        passed (then False on every rank)."""
        late = False

        def idle(seconds: float) -> bool:
            nonlocal late
            if deadline is not None:
                seconds = max(0.0, min(seconds, deadline - time.monotonic()))
            if self.checkpointer.wait_until_idle(seconds):
                return True
            late = deadline is not None and time.monotonic() >= deadline
            return late

        self.control.wait_for_rank0(idle)
        return not self.control.from_rank0(late)

    def _not_committed_in_time(self, step: int | None) -> str:
        return (
            f"checkpoint step_{step} was not committed to {self.checkpointer.url} within "
            f"trainer.preemption_grace_seconds={self.cfg.trainer.preemption_grace_seconds:g}; the previous "
            "checkpoint stays LATEST"
        )

    def maybe_resume(self) -> None:
        self.wait_for_checkpoint()  # a save still running from an earlier train() call
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
        refuse_settings_kept_on_resume(manifest, to_dict(self.cfg), where)
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{where} does not fit this run: {first_line(err)}") from None
        self.metrics.resumed_from(self.step)
        log.info("resumed from %s at step %d", where, self.step)
        for change in changed_settings(manifest, to_dict(self.cfg)):
            log.info("resumed with %s", change)  # these take effect from here on

    # --- the loop ----------------------------------------------------------------------------------
    def train(self) -> None:
        self.preemption.install()
        self.watchdog.start()  # stacks on a stall or SIGUSR1
        try:
            self._train()
        except torch.OutOfMemoryError as err:
            step = self.step + 1
            url = self.watchdog.dump_out_of_memory(err, step, self.batch_shape)
            raise OutOfMemory(
                f"{self.runtime.device} ran out of memory in step {step} with batches of shape "
                f"{list(self.batch_shape or [])} per rank: lower trainer.global_batch_size (or use more "
                f"GPUs); the memory snapshot and stacks are in {url}"
            ) from None
        finally:
            self.watchdog.stop()
            self.preemption.uninstall()
            if self.progress is not None:
                self.progress.close()  # ends the bar's line: an error message after it starts its own

    def _train(self) -> None:
        t, device = self.cfg.trainer, self.runtime.device
        self.maybe_resume()
        if self.evaluator is not None:
            self.evaluator.setup()  # extractors, classifier, reference features: fail now, not at the end
        batches = iter(self.stream)
        progress = self.progress = tqdm(
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
                self.watchdog.at("data: the next batch")
                fetch = time.perf_counter()
                images, labels = next(batches)
                self.batch_shape = tuple(images.shape)
                data_wait += time.perf_counter() - fetch
                real = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
                y_real = labels.to(device, non_blocking=True)
                z, y_fake = self._noise(phase)
                self.watchdog.at(D_STEP)
                d_update = self.backend.d_step(real, y_real, z, y_fake)
                skipped += d_update.skipped
                self.nonfinite.observe(d_update.skipped, self.step)
            z, y_fake = self._noise(t.n_dis)
            self.watchdog.at(G_STEP)
            g_update = self.backend.g_step(z, y_fake)
            skipped += g_update.skipped
            self.nonfinite.observe(g_update.skipped, self.step)
            decay = ema_decay(self.step, decay=t.ema_decay, start_step=t.ema_start_step, rampup=t.ema_rampup)
            self.ema.update(self.backend.G, decay)
            self.step += 1
            self.watchdog.mark_step(self.step)
            logging_step = self.step % t.log_interval == 0 or self.step == t.max_steps
            if logging_step:  # host synchronisations only when logging
                self.metrics.nonfinite.inc(float(skipped))
                skipped.zero_()
                if self.nonfinite.poll():
                    self._reload_last_good()
                    continue
            self.metrics.record_step(
                time.perf_counter() - started, t.n_dis * self.batch_size, data_wait, step=self.step
            )
            progress.update()
            if logging_step:
                self.watchdog.at("logging (all_reduce of the losses)")
                self._log(d_update.read(), g_update.read(), progress)
            if self.step % t.sample_interval == 0 or self.step == t.max_steps:
                self._save_samples()
            fid = self.evaluate() if self._evaluation_due() else None
            if self.checkpointer.due(self.step, t.max_steps):
                self.save_checkpoint(fid=fid)
            self.watchdog.at("stop check (all_reduce of the stop signal, control group)")
            stop_signal = self.control.lagged_max(self.preemption.signum or 0)
            if stop_signal and self.step < t.max_steps:
                progress.close()
                self._stop_preempted(stop_signal)
        progress.close()
        self.control.close()
        if self.runtime.is_main:
            self.run_log.flush()
        self.wait_for_checkpoint()  # the job succeeds only once its last checkpoint is committed
        if self.runtime.is_main:
            log.info("%s", self.closing_note())

    def closing_note(self) -> str:
        """What the run left: the last grid and, when evaluated, G-EMA's classifier-FID and sample accuracy."""
        lines = [f"finished at step {self.step}: checkpoints in {self.checkpointer.url}"]
        if self.last_grid:
            lines.append(f"  samples, one row per class (G-EMA left, G right): {self.last_grid}")
        if self.last_eval is not None:
            lines.append(f"  {self.last_eval.summary()}")
        return "\n".join(lines)

    def _reload_last_good(self) -> None:
        """Every rank, at the same step: back to the newest checkpoint from before the run of non-finite
        updates (weights, optimizers, EMA, step); the data stream goes on where it is."""
        back_to = self.nonfinite.check_reload_allowed()
        skipped = self.nonfinite.consecutive
        self._wait_for_writer()  # a save in flight is committed (or failed) before choosing
        found = load_for_resume(
            self.checkpointer, rank=self.runtime.rank, world_size=self.runtime.world_size, at_most=back_to
        )
        if found is None:
            raise Diverged(
                f"{skipped} consecutive non-finite updates since step {back_to} and no checkpoint from before "
                f"them at {self.checkpointer.url} to go back to: lower the learning rates or check the data"
            )
        step, state, _ = found
        self.step = int(state["step"])
        self.backend.load_state_dict(state["backend"])
        self.ema.load_state_dict(state["G_ema"])
        self.ema_statistics_step = -1  # new weights, maybe at a step measured before: measure again
        self.nonfinite.reloaded()
        self.metrics.nonfinite_reloads.inc()
        log.warning(
            "%d consecutive non-finite updates since step %d: reloaded checkpoint step_%d (reload %d of %d); "
            "the data stream goes on",
            skipped, back_to, step, self.nonfinite.reloads, self.nonfinite.max_reloads,
        )  # fmt: skip
        if self.progress is not None:
            self.progress.n = self.step
            self.progress.refresh()

    def _stop_preempted(self, signum: int) -> None:
        """Every rank, at the same step: checkpoint it, wait for the commit until the grace period's deadline."""
        self.control.close()
        log.warning("rank %d: stopping at step %d for a pre-emption", self.runtime.rank, self.step)
        deadline = self.preemption.deadline or (
            time.monotonic() + self.cfg.trainer.preemption_grace_seconds - EXIT_SECONDS
        )
        if self.saved_step != self.step:
            if not self._wait_for_writer(deadline):  # the save before this one is still being written
                raise CheckpointError(self._not_committed_in_time(self.saved_step))
            self.save_checkpoint()
        if self.runtime.is_main:
            self.run_log.flush()
        self.wait_for_checkpoint(deadline)
        raise Preempted(signum, self.step, self.checkpointer.store.url_of(f"step_{self.step}"))

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
            with self.watchdog.phase("evaluation"):
                G_ema = self.ema_with_own_statistics()
                result = self.evaluator.evaluate(G_ema, step=self.step, name="G-EMA")
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
        G_ema = self.ema_with_own_statistics()
        if not self.runtime.is_main:
            return
        panels = {
            "G-EMA": grids.draw(G_ema, self.grid_z, self.grid_y),
            "G": grids.draw(self.backend.G, self.grid_z, self.grid_y),
        }
        name = f"samples/step_{self.step:07d}.png"
        try:
            self.run_store.write_bytes(name, grids.encode_panels(panels, self.cfg.trainer.sample_columns))
        except DataError as err:  # storage down for longer than its retries: a grid never stops a run
            log.warning("samples: cannot write %s (%s); training goes on", name, err)
            return
        self.last_grid = self.run_store.url_of(name)
        log.info("samples (G-EMA left, G right): %s", self.last_grid)
