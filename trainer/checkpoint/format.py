"""The checkpoint format: what a checkpoint folder holds, how it is read back verified, and the errors.

Layout under the checkpoint URL::

    step_<N>/state.pt        every tensor, number and string of the run (``torch.save``; loaded weights_only)
    step_<N>/manifest.json   step, sha256 and size of state.pt, resolved config, world size, FID
    LATEST                   "step_<N>", the newest committed checkpoint

A checkpoint is committed by its manifest, written after the file it lists; ``LATEST`` moves after
that. Loading never unpickles code. Old formats are named in ``trainer.checkpoint.compat``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from data_pipeline.errors import DataError, ObjectNotFound, first_line
from data_pipeline.storage import Store, open_store, redact, split_url
from trainer.checkpoint.compat import upgrade_state

log = logging.getLogger("trainer")

FORMAT = 1
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
STEP_FOLDER = re.compile(r"^step_(\d+)$")
# What torch.load(..., weights_only=True) reads back besides tensors and containers.
SAFE_LEAVES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(Exception):
    """A checkpoint that cannot be written, read or used by this run. The message is one line."""


class CheckpointUnusable(CheckpointError):
    """A checkpoint that is missing, half-deleted or fails its checksums: resume falls back past it."""


class HostBuffers:
    """Pinned host tensors for the accelerator tensors of a snapshot, made at the first save and reused by
    every later one (the state's tensors keep their shapes): the caching host allocator rounds each
    pinned allocation up and never returns it, so a buffer per tensor per save would grow without end.
    A save reuses them only after the previous one was written (``CheckpointWriter.save`` joins first)."""

    def __init__(self) -> None:
        self._pools: dict[tuple, list[torch.Tensor]] = {}
        self._taken: dict[tuple, int] = {}

    def start(self) -> None:
        """A new snapshot: every buffer is free again."""
        self._taken.clear()

    def like(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (tuple(tensor.shape), tensor.stride(), tensor.dtype)
        pool, index = self._pools.setdefault(key, []), self._taken.get(key, 0)
        if index == len(pool):
            pool.append(
                torch.empty_strided(
                    tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu", pin_memory=True
                )
            )
        self._taken[key] = index + 1
        return pool[index]


def snapshot(state: Any, buffers: HostBuffers | None = None) -> Any:
    """A copy of ``state`` whose tensors live on the CPU and share no memory with training; accelerator
    tensors are copied into ``buffers`` (pinned, reused) when given, else into new pinned memory.

    Raises a CheckpointError, here in the loop rather than at resume, for anything ``torch.load(...,
    weights_only=True)`` would refuse.
    """
    on_accelerator: list[torch.Tensor] = []
    if buffers is not None:
        buffers.start()

    def copy(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.device.type == "cpu":
                return value.clone()
            if buffers is not None and value.device.type == "cuda":
                host = buffers.like(value)
            else:
                host = torch.empty_like(value, device="cpu", pin_memory=torch.cuda.is_available())
            on_accelerator.append(host)
            return host.copy_(value, non_blocking=True)
        if type(value) in (dict, OrderedDict):
            copied = type(value)((key, copy(item, f"{where}[{key!r}]")) for key, item in value.items())
            if hasattr(value, "_metadata"):  # module state dicts carry per-layer versions
                copied._metadata = value._metadata
            return copied
        if type(value) in (list, tuple):
            return type(value)(copy(item, f"{where}[{i}]") for i, item in enumerate(value))
        if isinstance(value, SAFE_LEAVES):
            return value
        raise CheckpointError(
            f"checkpoint state{where} is a {type(value).__name__}; a checkpoint holds only tensors, numbers, "
            "strings and dicts, lists or tuples of them"
        )

    copied = copy(state, "")
    if on_accelerator and torch.cuda.is_available():
        torch.cuda.synchronize()
    return copied


def read_checkpoint(store: Store, folder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, manifest) of the checkpoint ``folder`` of ``store``, verified against its manifest."""
    payload, manifest = read_verified(store, folder)
    return decode_state(payload, store.url_of(folder)), manifest


def read_verified(store: Store, folder: str) -> tuple[bytes, dict[str, Any]]:
    """(bytes of state.pt, manifest) of the checkpoint ``folder``, the bytes checked against the manifest."""
    url = store.url_of(folder)
    try:
        manifest = json.loads(store.read_bytes(f"{folder}/{MANIFEST_FILE}"))
    except ObjectNotFound:
        raise CheckpointUnusable(f"{url} is not a committed checkpoint: {MANIFEST_FILE} is missing") from None
    except DataError as err:
        raise CheckpointError(f"cannot read checkpoint {url}: {err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointUnusable(f"{url}/{MANIFEST_FILE} is not valid JSON") from None
    entry = manifest.get("files", {}).get(STATE_FILE) if isinstance(manifest, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise CheckpointUnusable(f"{url}/{MANIFEST_FILE} does not list {STATE_FILE} with its sha256")
    try:
        payload = store.read_bytes(f"{folder}/{STATE_FILE}")
    except ObjectNotFound:
        raise CheckpointUnusable(f"{url} is incomplete: {STATE_FILE} is missing") from None
    except DataError as err:
        raise CheckpointError(f"cannot read checkpoint {url}: {err}") from None
    if (
        len(payload) != entry.get("bytes", len(payload))
        or hashlib.sha256(payload).hexdigest() != entry["sha256"]
    ):
        raise CheckpointUnusable(f"{url}/{STATE_FILE} does not match the sha256 in its manifest (corrupt)")
    return payload, manifest


def decode_state(payload: bytes | memoryview, url: str) -> dict[str, Any]:
    """The state dict in verified state.pt bytes, loaded without unpickling code."""
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{url}/{STATE_FILE} was refused, not loaded: it holds pickled objects other than tensors "
            f"({_unpickler_reason(err)}); use a checkpoint you trust"
        ) from None
    # torch raises RuntimeError, EOFError, ValueError, ... for bytes that are not a zip of tensors
    except Exception as err:
        raise CheckpointUnusable(f"{url}/{STATE_FILE} cannot be read: {first_line(err)}") from None
    if not isinstance(state, dict):
        raise CheckpointUnusable(f"{url}/{STATE_FILE} holds a {type(state).__name__}, not a state dict")
    return upgrade_state(state)


def load_folder(url: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, manifest) of one checkpoint folder: a local path or ``s3://bucket/prefix/step_<N>``."""
    parent, folder = _split(str(url))
    return read_checkpoint(open_checkpoint_store(parent), folder)


# --------------------------------------------------------------------------------------------------
# The folders of a checkpoint URL


def step_folders(store: Store) -> dict[int, set[str]]:
    """step -> names of the files in ``step_<step>/``."""
    try:
        names = store.list()
    except DataError as err:
        raise CheckpointError(f"cannot list checkpoints at {store.url}: {err}") from None
    folders: dict[int, set[str]] = {}
    for name in names:
        top, _, rest = name.partition("/")
        match = STEP_FOLDER.match(top)
        if match and rest:
            folders.setdefault(int(match.group(1)), set()).add(rest)
    return folders


def committed_steps(store: Store) -> list[int]:
    """Steps whose manifest exists (not yet verified against their files), ascending."""
    return sorted(s for s, names in step_folders(store).items() if MANIFEST_FILE in names)


def read_pointer(store: Store) -> int | None:
    """The step ``LATEST`` names, or None when there is no readable pointer."""
    try:
        text = store.read_bytes(LATEST_FILE).decode("utf-8", errors="replace").strip()
    except ObjectNotFound:
        return None
    except DataError as err:
        raise CheckpointError(f"cannot read checkpoints at {store.url}: {err}") from None
    match = STEP_FOLDER.match(text)
    if match is None:
        log.warning("%s holds %r, not step_<N>: ignoring it", store.url_of(LATEST_FILE), text[:40])
        return None
    return int(match.group(1))


def newest_step(store: Store) -> int | None:
    """The step ``LATEST`` names if its manifest exists, else the newest committed step (unverified)."""
    latest, committed = read_pointer(store), committed_steps(store)
    if latest is not None and latest in committed:
        return latest
    older = [s for s in committed if latest is None or s < latest]
    return older[-1] if older else None


def open_checkpoint_store(url: str) -> Store:
    try:
        return open_store(url)
    except DataError as err:
        raise CheckpointError(f"checkpoint URL {redact(url)!r}: {err}") from None


def _split(url: str) -> tuple[str, str]:
    """(parent URL, folder name) of a checkpoint folder URL or path."""
    if "://" not in url:
        url = str(Path(url).absolute())
    try:
        return split_url(url)
    except DataError as err:
        raise CheckpointError(str(err)) from None


def _unpickler_reason(err: BaseException) -> str:
    """The line of torch's weights-only refusal that names what was refused (e.g. ``GLOBAL posix.system``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "WeightsUnpickler error:" in line:
            return line.removeprefix("WeightsUnpickler error:").strip().rstrip(".")
    return lines[0] if lines else type(err).__name__
