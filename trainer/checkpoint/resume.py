"""Resuming: choosing the checkpoint every rank resumes from, reading it once per node, and checking
that it fits this run; the per-rank RNG states a checkpoint carries."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from data_pipeline.errors import DataError
from trainer.checkpoint.format import (
    MANIFEST_FILE,
    CheckpointError,
    decode_state,
    newest_step,
    open_checkpoint_store,
    read_verified,
)
from trainer.runtime.distributed import broadcast_object, node_group

if TYPE_CHECKING:
    from trainer.checkpoint.checkpointer import Checkpointer

log = logging.getLogger("trainer")

# Settings that do not change the weights or what they compute: a checkpoint fits either way.
MODEL_KEYS_NOT_COMPARED = ("num_classes", "attention_impl", "init")
# Settings a resumed run keeps from its checkpoint whatever its config says (the data order goes on):
# a new value would not take effect, so it is refused.
KEPT_ON_RESUME = ("trainer.seed", "data.shuffle_block_shards", "data.shuffle_chunk_samples")


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states: CPU, and the current CUDA device when there is one."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng_states() -> list[dict[str, torch.Tensor]] | None:
    """Every rank's RNG states in rank order on rank 0, None on the others. A collective when distributed."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered


def restore_rng_state(states: list[dict[str, torch.Tensor]] | None, rank: int) -> None:
    """Set this rank's RNG states from a checkpoint; a rank the checkpoint did not have keeps its seed."""
    if not states or rank >= len(states):
        log.info("rank %d: no RNG state saved for it (the checkpoint has %d ranks)", rank, len(states or []))
        return
    torch.set_rng_state(states[rank]["cpu"])
    if "cuda" in states[rank] and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]["cuda"])


def refuse_other_model(manifest: dict[str, Any], model: dict[str, Any], num_classes: int, where: str) -> None:
    """Raise a CheckpointError naming the first model setting in which the checkpoint differs from this run."""
    saved = manifest.get("config", {}).get("model", {})
    for key, value in saved.items():
        if key in MODEL_KEYS_NOT_COMPARED or key not in model:
            continue
        if model[key] != value:
            raise CheckpointError(
                f"{where} was trained with model.{key}={value!r}, this run has {model[key]!r}: "
                "use another checkpoint.url or the same model config"
            )
    saved_classes = manifest.get("num_classes")
    if saved_classes is not None and saved_classes != num_classes:
        raise CheckpointError(
            f"{where} was trained on {saved_classes} classes, this run has {num_classes}: "
            "use another checkpoint.url or the same dataset"
        )


def refuse_settings_kept_on_resume(manifest: dict[str, Any], config: dict[str, Any], where: str) -> None:
    """Raise a CheckpointError naming the first setting this run changes that a resume cannot apply."""
    for key in KEPT_ON_RESUME:
        saved, now = _setting(manifest.get("config", {}), key), _setting(config, key)
        if saved is not None and saved != now:
            raise CheckpointError(
                f"{key}={now!r} but {where} was trained with {saved!r}, and a resumed run keeps it (its data "
                f"order goes on): drop the override, or set checkpoint.resume=false to start over"
            )


def changed_settings(manifest: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """``key=new (checkpoint: old)`` for each trainer/data setting of this run that differs from the
    checkpoint's: the ones a resumed run applies (learning rates, betas, batch size, ...)."""
    saved_config = manifest.get("config", {})
    changes = []
    for section in ("trainer", "data"):
        for key, now in config.get(section, {}).items():
            saved = saved_config.get(section, {}).get(key, now)
            if saved != now:
                changes.append(f"{section}.{key}={now!r} (checkpoint: {saved!r})")
    return changes


def _setting(config: dict[str, Any], key: str) -> Any:
    section, _, name = key.partition(".")
    return config.get(section, {}).get(name)


def resolve(url: str | os.PathLike[str]) -> str:
    """The checkpoint folder meant by a run folder, a checkpoints folder or a step folder (local or s3://)."""
    url = str(url)
    for candidate in (url, f"{url.rstrip('/')}/checkpoints"):
        store = open_checkpoint_store(candidate)
        try:
            if store.exists(MANIFEST_FILE):
                return candidate
        except DataError as err:
            raise CheckpointError(f"cannot read checkpoints at {url}: {err}") from None
        step = newest_step(store)
        if step is not None:
            return store.url_of(f"step_{step}")
    raise CheckpointError(f"no checkpoint found at {url}")


def load_for_resume(
    checkpointer: Checkpointer, *, rank: int, world_size: int, resume: bool = True, at_most: int | None = None
) -> tuple[int, dict, dict] | None:
    """(step, state, manifest) to resume from, the same on every rank; None when there is none (or
    ``resume`` is false, in which case only the checkpoint URL is checked).

    Rank 0 alone checks the URL, reads ``LATEST`` and chooses (falling back past unusable checkpoints),
    then tells the others which step to load, so all ranks resume from one committed checkpoint. The
    checkpoint is read from storage once per node: by the node's lowest rank (rank 0 on its own node),
    which hands the verified bytes to the node's other ranks. A collective when ``world_size > 1``; an
    error on any rank is raised on every rank instead of leaving the others waiting. ``at_most``: the
    newest checkpoint of that step or before.
    """
    found = None
    choice: int | str | None = None
    if rank == 0:
        try:
            checkpointer.check()
            found = checkpointer.load_latest(at_most, with_payload=world_size > 1) if resume else None
            choice = found[0] if found else None
        except CheckpointError as err:
            choice = str(err)
    if world_size > 1:
        choice = broadcast_object(choice)
    if isinstance(choice, str):
        raise CheckpointError(choice)
    if choice is None:
        return None
    if world_size == 1:
        return found
    return _load_once_per_node(checkpointer, choice, found, rank)


def _load_once_per_node(checkpointer: Checkpointer, step: int, found: tuple | None, rank: int) -> tuple:
    group, ranks = node_group()
    leader, where = ranks[0], checkpointer.store.url_of(f"step_{step}")
    payload, state, manifest, error = None, None, None, None
    if found is not None:
        _, state, manifest, payload = found
    elif rank == leader:
        try:
            payload, manifest = read_verified(checkpointer.store, f"step_{step}")
        except CheckpointError as err:
            error = (
                f"rank {rank} cannot read the checkpoint rank 0 resumes from ({err}); checkpoint.url must "
                "be storage every node reads: s3:// or a shared filesystem"
            )
    if len(ranks) > 1:
        header = broadcast_object(
            (len(payload), manifest) if payload is not None else error, src=leader, group=group
        )
        if isinstance(header, tuple):
            size, manifest = header
            buffer = (
                torch.frombuffer(bytearray(payload), dtype=torch.uint8)
                if rank == leader
                else torch.empty(size, dtype=torch.uint8)
            )
            dist.broadcast(buffer, src=leader, group=group)
            if rank != leader:
                payload = buffer.numpy().tobytes()
                del buffer
        else:
            error = header
    if state is None and error is None:
        try:
            state = decode_state(payload, where)
        except CheckpointError as err:
            error = f"rank {rank}: {err}"
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)
    return step, state, manifest
