"""Prometheus metrics of one rank. The names are a contract: dashboards and alerts use them."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from trainer.config import MetricsConfig
from trainer.distributed import Runtime

log = logging.getLogger("trainer")

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every rank's gauges and counters, served on ``metrics.port + local_rank`` (port 0: not served)."""

    def __init__(self, cfg: MetricsConfig, runtime: Runtime, *, backend: str, precision: str):
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
        self.world_size = Gauge("sagan_world_size", "Processes in the job", registry=r)
        self.rank_info = Gauge(
            "sagan_rank_info", "Constant 1, labelled with this rank's identity",
            ["rank", "local_rank", "backend", "precision", "device"], registry=r,
        )  # fmt: skip
        self.world_size.set(runtime.world_size)
        self.rank_info.labels(
            str(runtime.rank), str(runtime.local_rank), backend, precision, str(runtime.device)
        ).set(1)
        self._seen_skips: dict[str, int] = {}
        self._seen_retries = 0
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

    def record_step(self, seconds: float, images: int, data_wait: float) -> None:
        self.steps.inc()
        self.images.inc(images)
        self.step_seconds.observe(seconds)
        self.data_wait.inc(data_wait)
        self._interval_images += images

    def record_data_counters(self, counters: dict) -> None:
        """Turn the stream's cumulative counters into counter increments."""
        for reason, total in counters.get("skipped", {}).items():
            delta = total - self._seen_skips.get(reason, 0)
            if delta > 0:
                self.skipped.labels(reason).inc(delta)
            self._seen_skips[reason] = total
        retries = counters.get("s3_retries", 0)
        if retries > self._seen_retries:
            self.s3_retries.inc(retries - self._seen_retries)
        self._seen_retries = retries

    def close_interval(self) -> float:
        """Images per second since the previous call; also sets the gauge."""
        now = time.perf_counter()
        rate = self._interval_images / max(now - self._interval_start, 1e-9)
        self.images_per_second.set(rate)
        self._interval_start, self._interval_images = now, 0
        return rate
