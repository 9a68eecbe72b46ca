"""Prometheus metrics of one rank. The names are a contract: dashboards and alerts use them.

Two kinds live here. The contract metrics (``docs/architecture.md``) and, beside them, what an operator
needs to run a job: learning rates, loss scales, memory, restarts, checkpoint age in steps, bytes read
from the object store (``docs/monitoring.md`` lists them all).

Cost: per step only host-side numbers are recorded (counters, the step time, the step). Everything
that may read a device (loss, gradient norm, gammas, the fp16 loss scale) is set at log intervals,
where the trainer reads the loss anyway. CUDA memory comes from the allocator's host-side statistics
and process memory is read from ``/proc`` when Prometheus scrapes, not by the training loop.
"""

from __future__ import annotations

import logging
import time

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from trainer.config import MetricsConfig
from trainer.runtime.distributed import Runtime

log = logging.getLogger("trainer")

EVAL_GAUGES = {  # metric key -> help; sagan_eval_<key>{extractor}, of G-EMA at the last evaluation
    "fid": "Frechet distance of G-EMA samples to the reference images",
    "kid": "Kernel Inception Distance (unbiased MMD^2, cubic kernel), mean over subsets",
    "kid_std": "Standard deviation of the KID over subsets",
    "is": "Inception Score (of the extractor's logits), mean over splits",
    "is_std": "Standard deviation of the Inception Score over splits",
    "accuracy": "Share of conditional samples the dataset classifier assigns to their class",
}
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every rank's gauges and counters, served on ``metrics.port + local_rank`` (port 0: not served)."""

    def __init__(
        self,
        cfg: MetricsConfig,
        runtime: Runtime,
        *,
        backend: str,
        precision: str,
        checkpoint_interval_steps: int = 0,
    ):
        self.registry = CollectorRegistry()
        r = self.registry
        self.steps = Counter("sagan_train_steps", "Generator updates done", registry=r)
        self.images = Counter("sagan_train_images", "Real images consumed by D on this rank", registry=r)
        self.step_seconds = Histogram(
            "sagan_step_duration_seconds", "Wall time of one training step", buckets=STEP_BUCKETS, registry=r
        )
        self.images_per_second = Gauge(
            "sagan_images_per_second",
            "Real images per second on this rank, over the last log interval",
            registry=r,
        )
        self.loss = Gauge("sagan_loss", "Last hinge loss", ["net"], registry=r)
        self.grad_norm = Gauge("sagan_grad_norm", "Last total gradient norm", ["net"], registry=r)
        self.gamma = Gauge("sagan_attention_gamma", "Self-attention gamma", ["net", "layer"], registry=r)
        self.data_wait = Counter("sagan_data_wait_seconds", "Time the step waited for data", registry=r)
        self.skipped = Counter("sagan_data_samples_skipped", "Samples skipped", ["reason"], registry=r)
        self.s3_retries = Counter("sagan_s3_retries", "Object-store reads retried", registry=r)
        self.checkpoint_seconds = Gauge(
            "sagan_checkpoint_seconds", "Duration of the last checkpoint phase", ["phase"], registry=r
        )
        self.checkpoint_last_success = Gauge(
            "sagan_checkpoint_last_success_timestamp_seconds",
            "When the last checkpoint was committed",
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "sagan_checkpoint_failures", "Checkpoint saves that failed", registry=r
        )
        self.nonfinite = Counter(
            "sagan_nonfinite_steps", "Updates skipped for a non-finite loss or gradient", registry=r
        )
        self.nonfinite_reloads = Counter(
            "sagan_nonfinite_reloads",
            "Checkpoints reloaded after trainer.nonfinite_reload_after non-finite updates in a row",
            registry=r,
        )
        self.stall_dumps = Counter(
            "sagan_stall_dumps",
            "Stack dumps: a stall (no step for trainer.stall_seconds), SIGUSR1, a request, out of memory",
            registry=r,
        )
        self.stall_deadline = Gauge(
            "sagan_stall_deadline_seconds",
            "Seconds without a completed step that the stall watchdog takes for a stall now (0: not yet known)",
            registry=r,
        )
        self.last_step_timestamp = Gauge(
            "sagan_last_step_timestamp_seconds", "Wall time this rank last completed a step", registry=r
        )
        self.world_size = Gauge("sagan_world_size", "Processes in the job", registry=r)
        self.eval = {
            key: Gauge(f"sagan_eval_{key}", text, ["extractor"], registry=r)
            for key, text in EVAL_GAUGES.items()
        }
        self.eval_step = Gauge("sagan_eval_step", "Training step of the last evaluation", registry=r)
        self.eval_seconds = Gauge(
            "sagan_eval_duration_seconds", "Wall time of the last evaluation", registry=r
        )
        self.eval_running_since = Gauge(
            "sagan_eval_running_since_timestamp_seconds",
            "When the evaluation under way started; 0 while none runs (training steps pause meanwhile)",
            registry=r,
        )
        self.eval_failures = Counter(
            "sagan_eval_failures",
            "Evaluations that failed (training went on without their scores)",
            registry=r,
        )
        self.rank_info = Gauge(
            "sagan_rank_info", "Constant 1, labelled with this rank's identity",
            ["rank", "local_rank", "backend", "precision", "device"], registry=r,
        )  # fmt: skip
        # --- for operators, beside the contract ---------------------------------------------------
        self.step = Gauge(
            "sagan_train_step", "The step this rank is at (generator updates of the run, resumes included)",
            registry=r,
        )  # fmt: skip
        self.learning_rate = Gauge("sagan_learning_rate", "Current learning rate", ["net"], registry=r)
        self.loss_scale = Gauge(
            "sagan_loss_scale", "Dynamic fp16 loss scale (1 without loss scaling)", ["net"], registry=r
        )
        self.s3_read_bytes = Counter(
            "sagan_s3_read_bytes", "Bytes of data shards read from the object store", registry=r
        )
        self.checkpoint_interval = Gauge(
            "sagan_checkpoint_interval_steps", "Configured steps between checkpoints", registry=r
        )
        self.checkpoint_last_step = Gauge(
            "sagan_checkpoint_last_success_step",
            "Step of the last committed checkpoint (the resumed step until the first save)",
            registry=r,
        )
        self.elastic_restarts = Gauge(
            "sagan_elastic_restarts", "Times torchrun restarted this job's workers (TORCHELASTIC_RESTART_COUNT)",
            registry=r,
        )  # fmt: skip
        self.cuda_allocated = Gauge(
            "sagan_cuda_memory_allocated_bytes", "CUDA memory held by tensors", ["device"], registry=r
        )
        self.cuda_reserved = Gauge(
            "sagan_cuda_memory_reserved_bytes", "CUDA memory reserved by the caching allocator", ["device"],
            registry=r,
        )  # fmt: skip
        self.cuda_peak = Gauge(
            "sagan_cuda_memory_max_allocated_bytes", "Peak CUDA memory held by tensors", ["device"],
            registry=r,
        )  # fmt: skip
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...

        self.world_size.set(runtime.world_size)
        self.rank_info.labels(
            str(runtime.rank), str(runtime.local_rank), backend, precision, str(runtime.device)
        ).set(1)
        self.elastic_restarts.set(runtime.restart_count)
        self.checkpoint_interval.set(checkpoint_interval_steps)
        self.device = runtime.device
        self._seen_skips: dict[str, int] = {}
        self._seen_retries = 0
        self._seen_read_bytes = 0
        self._interval_start = time.perf_counter()
        self._interval_images = 0
        self.port = 0
        if cfg.port:
            self.port = cfg.port + runtime.local_rank
            try:
                start_http_server(self.port, addr=cfg.host, registry=self.registry)
            except OSError as err:
                raise OSError(
                    f"metrics.port: cannot serve /metrics on {cfg.host}:{self.port} ({err.strerror}); "
                    "choose another port or metrics.port=0 to disable"
                ) from None
            log.info("metrics on http://%s:%d/metrics", cfg.host, self.port)

    def record_step(self, seconds: float, images: int, data_wait: float, step: int | None = None) -> None:
        self.steps.inc()
        self.images.inc(images)
        self.step_seconds.observe(seconds)
        self.data_wait.inc(data_wait)
        self._interval_images += images
        if step is not None:
            self.step.set(step)

    def record_data_counters(self, counters: dict) -> None:
        """Turn the stream's cumulative counters (DataLoader workers included) into counter increments."""
        for reason, total in counters.get("skipped", {}).items():
            delta = total - self._seen_skips.get(reason, 0)
            if delta > 0:
                self.skipped.labels(reason).inc(delta)
            self._seen_skips[reason] = total
        self._seen_retries = _advance(self.s3_retries, self._seen_retries, counters.get("s3_retries", 0))
        self._seen_read_bytes = _advance(
            self.s3_read_bytes, self._seen_read_bytes, counters.get("s3_read_bytes", 0)
        )

    def record_optimizers(self, learning_rates: dict[str, float], loss_scales: dict[str, float]) -> None:
        """Per net ("g", "d"): the current learning rate and loss scale. Call at log intervals."""
        for net, value in learning_rates.items():
            self.learning_rate.labels(net).set(value)
        for net, value in loss_scales.items():
            self.loss_scale.labels(net).set(value)

    def record_device_memory(self) -> None:
        """CUDA allocator statistics (host-side counters: no device synchronisation); nothing on CPU."""
        if self.device.type != "cuda":
            return
        device = str(self.device)
        self.cuda_allocated.labels(device).set(torch.cuda.memory_allocated(self.device))
        self.cuda_reserved.labels(device).set(torch.cuda.memory_reserved(self.device))
        self.cuda_peak.labels(device).set(torch.cuda.max_memory_allocated(self.device))

    def resumed_from(self, step: int) -> None:
        """The run continues from a checkpoint of ``step``: that is the newest checkpoint until the next."""
        self.step.set(step)
        self.checkpoint_last_step.set(step)

    def checkpoint_committed(self, step: int, write_seconds: float) -> None:
        self.checkpoint_seconds.labels("write").set(write_seconds)
        self.checkpoint_last_success.set_to_current_time()
        self.checkpoint_last_step.set(step)

    def record_eval(self, step: int, extractor: str, metrics: dict[str, float], seconds: float) -> None:
        for key, value in metrics.items():
            if key in self.eval:
                self.eval[key].labels(extractor).set(value)
        self.eval_step.set(step)
        self.eval_seconds.set(seconds)

    def close_interval(self) -> float:
        """Images per second since the previous call; also sets the gauge."""
        now = time.perf_counter()
        rate = self._interval_images / max(now - self._interval_start, 1e-9)
        self.images_per_second.set(rate)
        self._interval_start, self._interval_images = now, 0
        return rate


def _advance(counter: Counter, seen: int, total: int) -> int:
    """Increment ``counter`` by what a cumulative ``total`` gained since ``seen``; the new ``seen``."""
    if total > seen:
        counter.inc(total - seen)
    return total
