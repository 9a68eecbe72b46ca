"""The older formats the data pipeline still reads, named here instead of as bare values in its logic.

- Data stream state (saved in checkpoints): format ``STREAM_STATE_FORMAT``. A state saved before
  chunked shuffling holds no ``shuffle_chunk_samples``: its order is ``ORDER_BEFORE_CHUNKS``. A state
  saved before uneven batches holds one ``batch_size`` for every rank; states written now still carry
  it (``state_batch_sizes``, ``even_split_batch_size``).
- Manifest: format 1 (before encodings) recorded no encoding, preprocessing or plan:
  its images are PNG made with a centre crop and Lanczos (``MANIFEST_V1_ENCODING``,
  ``MANIFEST_V1_PREPROCESS``, ``MANIFEST_V1_PLAN``). Manifests written before the sample index hold no
  sample offsets or CRC-32s: their shards are read from the start (``ShardInfo.indexed``).
"""

from __future__ import annotations

from typing import Any

STREAM_STATE_FORMAT = 1  # the format of ShardStream.state_dict(); another one is refused

# shuffle_chunk_samples of a stream state saved before chunks, and the config value that keeps that
# order: the samples of a shuffle block permuted one by one, shards read from their start
ORDER_BEFORE_CHUNKS = 0

# what a manifest of format 1 (before encodings) means by the metadata it lacks
MANIFEST_V1_ENCODING = '{"format": "png"}'  # metadata JSON, as Encoding.to_metadata writes it
MANIFEST_V1_PREPROCESS = "{}"  # metadata JSON: Preprocess(**{}) is the centre crop and Lanczos
MANIFEST_V1_PLAN = ""  # written by no plan of `sagan prepare` that is recorded


def state_chunk_samples(state: dict[str, Any]) -> int:
    """A stream state's ``shuffle_chunk_samples``; one saved before chunks has none."""
    return int(state.get("shuffle_chunk_samples", ORDER_BEFORE_CHUNKS))


def state_batch_sizes(state: dict[str, Any], world_size: int) -> tuple[int, ...]:
    """Every rank's batch in a stream state; one saved before uneven batches holds one ``batch_size``."""
    return tuple(int(b) for b in state.get("batch_sizes") or [state["batch_size"]] * world_size)


def even_split_batch_size(batch_sizes: tuple[int, ...]) -> int:
    """The ``batch_size`` a stream state still carries: what readers of the even-split format compare."""
    return batch_sizes[0]
