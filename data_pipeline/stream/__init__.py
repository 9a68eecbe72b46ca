"""The per-rank resumable stream of whole batches: ``order`` (which positions each rank's batches
hold, a pure function of seed, epoch and manifest), ``reader`` (positions -> decoded batches, in the
DataLoader workers) and ``loader`` (``ShardStream``: one DataLoader for the run, ``state_dict()``)."""

from data_pipeline.config import DataConfig
from data_pipeline.stream.loader import ShardStream
from data_pipeline.stream.order import EpochOrder, split_batch

__all__ = ["DataConfig", "EpochOrder", "ShardStream", "split_batch"]
