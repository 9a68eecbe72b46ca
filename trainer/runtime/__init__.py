"""The processes a run lives in: process groups and launchers (``distributed``), the control group that
tells every rank of a failure (``coordination``), pre-emption signals, the non-finite guard, host memory."""

from trainer.runtime.distributed import Runtime, init_runtime, shutdown

__all__ = ["Runtime", "init_runtime", "shutdown"]
