"""Checkpoints: atomic, asynchronous, resumable at any world size, in a local folder or under s3://.

Layout under the checkpoint URL::

    step_<N>/state.pt        every tensor, number and string of the run (``torch.save``; loaded weights_only)
    step_<N>/manifest.json   step, sha256 and size of state.pt, resolved config, world size, FID
    LATEST                   "step_<N>", the newest committed checkpoint

A checkpoint is committed by its manifest, written after the file it lists; ``LATEST`` moves after
that. Each object is written atomically (rename locally, one PUT on S3), so a reader sees a whole
checkpoint or none. Resume reads ``LATEST``, verifies the checksums and falls back to the newest good
checkpoint before it when the pointed-at one is missing or corrupt. Loading never unpickles code.

Saving stalls the loop only to copy tensors to the CPU; serialising, uploading, committing and the
purge (keep the last ``keep_last`` plus the best by FID) run in one background thread, one save at a
time, retried with backoff. Only rank 0 writes; what differs per rank (RNG states) is gathered in the
loop, never from the background thread.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import pickle
import re
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from data_pipeline.errors import DataError, ObjectNotFound
from data_pipeline.storage import LocalStore, Store, open_store, redact, split_url
from trainer.distributed import node_group

if TYPE_CHECKING:
    from trainer.metrics import Metrics

log = logging.getLogger("trainer")

FORMAT = 1
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
STEP_FOLDER = re.compile(r"^step_(\d+)$")
MAX_ATTEMPTS = 4
RETRY_SECONDS = 2.0  # the first retry waits this long, doubling each time
HASH_CHUNK_BYTES = 8 << 20
SPOOL_PREFIX = "sagan-checkpoint-"  # + "<pid>-step_<N>-<random>.pt" in the temporary folder
# What torch.load(..., weights_only=True) reads back besides tensors and containers.
SAFE_LEAVES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
# Settings that do not change the weights or what they compute: a checkpoint fits either way.
MODEL_KEYS_NOT_COMPARED = ("num_classes", "attention_impl", "init")
# Settings a resumed run keeps from its checkpoint whatever its config says (the data order goes on):
# a new value would not take effect, so it is refused.
KEPT_ON_RESUME = ("trainer.seed", "data.shuffle_block_shards", "data.shuffle_chunk_samples")


class CheckpointError(Exception):
    """A checkpoint that cannot be written, read or used by this run. The message is one line."""


class CheckpointUnusable(CheckpointError):
    """A checkpoint that is missing, half-deleted or fails its checksums: resume falls back past it."""


# --------------------------------------------------------------------------------------------------
# What a snapshot holds


def snapshot(state: Any) -> Any:
    """A copy of ``state`` whose tensors live on the CPU and share no memory with training.

    Raises a CheckpointError, here in the loop rather than at resume, for anything ``torch.load(...,
    weights_only=True)`` would refuse.
    """
    on_accelerator: list[torch.Tensor] = []

    def copy(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.device.type == "cpu":
                return value.clone()
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


# --------------------------------------------------------------------------------------------------
# Reading


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
        raise CheckpointUnusable(f"{url}/{STATE_FILE} cannot be read: {_first_line(err)}") from None
    if not isinstance(state, dict):
        raise CheckpointUnusable(f"{url}/{STATE_FILE} holds a {type(state).__name__}, not a state dict")
    return state


def load_folder(url: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, manifest) of one checkpoint folder: a local path or ``s3://bucket/prefix/step_<N>``."""
    parent, folder = _split(str(url))
    return read_checkpoint(_open(parent), folder)


def resolve(url: str | os.PathLike[str]) -> str:
    """The checkpoint folder meant by a run folder, a checkpoints folder or a step folder (local or s3://)."""
    url = str(url)
    for candidate in (url, f"{url.rstrip('/')}/checkpoints"):
        store = _open(candidate)
        try:
            if store.exists(MANIFEST_FILE):
                return candidate
        except DataError as err:
            raise CheckpointError(f"cannot read checkpoints at {url}: {err}") from None
        step = Checkpointer(candidate, store=store).newest()
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
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
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
        header = [(len(payload), manifest) if payload is not None else error]
        dist.broadcast_object_list(header, src=leader, group=group)
        if isinstance(header[0], tuple):
            size, manifest = header[0]
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
            error = header[0]
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


# --------------------------------------------------------------------------------------------------
# The checkpointer


@dataclass
class _Save:
    step: int
    state: Any  # the CPU snapshot; dropped once written
    manifest: dict[str, Any]
    started: float  # perf_counter when the snapshot was taken
    error: CheckpointError | None = None


@dataclass(frozen=True)
class _Spool:
    path: str
    sha256: str
    size: int


class Checkpointer:
    """Saves (in the background, one at a time, retried), loads (verified, with fallback) and purges.

    ``save`` returns once the tensors are copied; ``wait`` blocks until the last save is committed and
    raises a CheckpointError if it could not be. Construct one on every rank; only rank 0 saves.
    """

    def __init__(
        self,
        url: str,
        keep_last: int = 3,
        *,
        metrics: Metrics | None = None,
        asynchronous: bool = True,
        max_attempts: int = MAX_ATTEMPTS,
        retry_seconds: float = RETRY_SECONDS,
        store: Store | None = None,
    ):
        if keep_last < 1:
            raise CheckpointError(f"checkpoint.keep_last={keep_last} must be at least 1")
        self.store = store if store is not None else _open(url)
        self.url = self.store.url
        self.keep_last = keep_last
        self.metrics = metrics
        self.asynchronous = asynchronous
        self.max_attempts = max(1, max_attempts)
        self.retry_seconds = retry_seconds
        self._pending: _Save | None = None
        self._thread: threading.Thread | None = None
        self._fids: dict[int, float | None] = {}

    # -- saving ---------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: dict[str, Any],
        meta: dict[str, Any] | None = None,
        *,
        fid: float | None = None,
    ):
        """Snapshot ``state`` and write it as ``step_<step>`` in the background (after the previous save).

        ``meta`` (JSON: resolved config, world size, ...) goes into the manifest, as does ``fid`` when
        the caller evaluated one; retention keeps the checkpoint with the lowest FID.
        """
        previous = self._join()
        if previous is not None and previous.error is not None:
            log.error(
                "checkpoint step_%d was never committed (%s); saving step_%d",
                previous.step,
                previous.error,
                step,
            )
        manifest = {"format": FORMAT, "step": step, **(meta or {}), "fid": fid}
        job = _Save(step, snapshot(state), manifest, time.perf_counter())
        self._pending = job
        if not self.asynchronous:
            self._write(job)
            self.wait()
            return
        # A daemon: a run that fails exits at once, as a distributed one does, rather than after an upload
        # that may take minutes (an uncommitted checkpoint is invisible; LATEST names the previous one).
        # The thread waits for `go` before its first instruction of work: started, it would hold the GIL
        # while Thread.start() waits to reacquire it, up to a whole switch interval (5 ms) of stall.
        go = threading.Event()
        self._thread = threading.Thread(
            target=self._write_when, args=(go, job), name=f"checkpoint-step_{step}", daemon=True
        )
        self._thread.start()
        go.set()

    @property
    def busy(self) -> bool:
        """True while a save is being written in the background."""
        return self._thread is not None and self._thread.is_alive()

    def idle(self, timeout: float = 0.0) -> bool:
        """True once no save is being written, after waiting up to ``timeout`` seconds for the one that is."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.busy

    def wait(self) -> None:
        """Block until the last save is committed; raise a CheckpointError if it could not be."""
        job = self._join()
        if job is not None and job.error is not None:
            raise job.error

    def _join(self) -> _Save | None:
        job, self._pending = self._pending, None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return job

    def _write_when(self, go: threading.Event, job: _Save) -> None:
        go.wait()
        self._write(job)

    def _write(self, job: _Save) -> None:
        """Serialise once, then upload and commit, retrying with backoff; then purge. Never raises."""
        spool: _Spool | None = None
        try:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    if spool is None or not os.path.exists(spool.path):
                        spool = _serialise(job.state, job.step)
                    self._commit(job, spool)
                    break
                # Whatever broke (disk, network, credentials, serialisation) is reported and retried.
                except Exception as err:
                    if self.metrics is not None:
                        self.metrics.checkpoint_failures.inc()
                    reason = _first_line(err)
                    if attempt == self.max_attempts:
                        job.error = CheckpointError(
                            f"checkpoint step_{job.step} could not be written to {self.url} after "
                            f"{attempt} attempts: {reason}"
                        )
                        log.error("%s", job.error)
                        return
                    delay = self.retry_seconds * 2 ** (attempt - 1)
                    log.warning(
                        "checkpoint step_%d: attempt %d of %d failed (%s); retrying in %.1fs",
                        job.step, attempt, self.max_attempts, reason, delay,
                    )  # fmt: skip
                    time.sleep(delay)
            seconds = time.perf_counter() - job.started
            if self.metrics is not None:
                self.metrics.checkpoint_committed(job.step, seconds)
            log.info(
                "checkpoint step_%d committed to %s (%.1f MB in %.2fs)",
                job.step, self.url, spool.size / 2**20 if spool else 0.0, seconds,
            )  # fmt: skip
            try:
                self.purge()
            except Exception as err:  # the checkpoint is committed; a purge that broke must not hide that
                log.warning("checkpoint purge failed: %s", _first_line(err))
        finally:
            job.state = None
            if spool is not None:
                with contextlib.suppress(OSError):
                    os.unlink(spool.path)

    def _commit(self, job: _Save, spool: _Spool) -> None:
        folder = f"step_{job.step}"
        # A save of a step that exists replaces it: uncommit it first, so no manifest ever lists other bytes.
        self.store.delete([f"{folder}/{MANIFEST_FILE}"])
        self.store.upload_file(f"{folder}/{STATE_FILE}", spool.path)
        manifest = {
            **job.manifest,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "files": {STATE_FILE: {"sha256": spool.sha256, "bytes": spool.size}},
        }
        self.store.write_bytes(f"{folder}/{MANIFEST_FILE}", json.dumps(manifest, indent=1).encode())
        self.store.write_bytes(LATEST_FILE, folder.encode())
        self._fids[job.step] = job.manifest.get("fid")

    # -- retention ------------------------------------------------------------------------------------
    def purge(self) -> list[int]:
        """Delete the checkpoints before ``LATEST`` that are neither among the last ``keep_last`` nor the
        best by FID, and abandoned partial saves. A deletion that fails is logged and tried again at the
        next purge. Returns the steps deleted."""
        try:
            latest = self.pointer()
            folders = self._folders()
        except CheckpointError as err:
            log.warning("checkpoint purge skipped: %s", err)
            return []
        if latest is None:
            return []
        committed = sorted(s for s, names in folders.items() if MANIFEST_FILE in names and s <= latest)
        keep = set(committed[-self.keep_last :]) | {latest}
        best = self._best_by_fid(committed)
        if best is not None:
            keep.add(best)
        deleted = []
        for step in sorted(s for s in folders if s < latest and s not in keep):
            names = folders[step]
            folder = f"step_{step}"
            try:
                # The manifest goes first: a half-deleted folder is never mistaken for a checkpoint.
                if MANIFEST_FILE in names:
                    self.store.delete([f"{folder}/{MANIFEST_FILE}"])
                self.store.delete([f"{folder}/{name}" for name in sorted(names) if name != MANIFEST_FILE])
            except (DataError, OSError) as err:
                log.warning(
                    "could not delete old checkpoint %s (%s); will try again", folder, _first_line(err)
                )
                continue
            if isinstance(self.store, LocalStore):
                _remove_empty_folders(self.store.root / folder)
            self._fids.pop(step, None)
            deleted.append(step)
        return deleted

    def _best_by_fid(self, steps: list[int]) -> int | None:
        scored = []
        for step in steps:
            if step not in self._fids:
                try:
                    manifest = json.loads(self.store.read_bytes(f"step_{step}/{MANIFEST_FILE}"))
                    self._fids[step] = manifest.get("fid")
                except (DataError, ValueError, AttributeError):
                    self._fids[step] = None
            fid = self._fids[step]
            if isinstance(fid, int | float):
                scored.append((fid, -step))
        return -min(scored)[1] if scored else None

    # -- reading --------------------------------------------------------------------------------------
    def _folders(self) -> dict[int, set[str]]:
        """step -> names of the files in ``step_<step>/``."""
        try:
            names = self.store.list()
        except DataError as err:
            raise CheckpointError(f"cannot list checkpoints at {self.url}: {err}") from None
        folders: dict[int, set[str]] = {}
        for name in names:
            top, _, rest = name.partition("/")
            match = STEP_FOLDER.match(top)
            if match and rest:
                folders.setdefault(int(match.group(1)), set()).add(rest)
        return folders

    def committed_steps(self) -> list[int]:
        """Steps whose manifest exists (not yet verified against their files), ascending."""
        return sorted(s for s, names in self._folders().items() if MANIFEST_FILE in names)

    def pointer(self) -> int | None:
        """The step ``LATEST`` names, or None when there is no readable pointer."""
        try:
            text = self.store.read_bytes(LATEST_FILE).decode("utf-8", errors="replace").strip()
        except ObjectNotFound:
            return None
        except DataError as err:
            raise CheckpointError(f"cannot read checkpoints at {self.url}: {err}") from None
        match = STEP_FOLDER.match(text)
        if match is None:
            log.warning("%s holds %r, not step_<N>: ignoring it", self.store.url_of(LATEST_FILE), text[:40])
            return None
        return int(match.group(1))

    def newest(self) -> int | None:
        """The step ``LATEST`` names if its manifest exists, else the newest committed step (unverified)."""
        latest, committed = self.pointer(), self.committed_steps()
        if latest is not None and latest in committed:
            return latest
        older = [s for s in committed if latest is None or s < latest]
        return older[-1] if older else None

    def load(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, manifest) of ``step_<step>``, verified; CheckpointError when it is unusable."""
        return read_checkpoint(self.store, f"step_{step}")

    def load_latest(self, at_most: int | None = None, *, with_payload: bool = False) -> tuple | None:
        """(step, state, manifest) of ``LATEST``, or of the newest good checkpoint before it when that one
        is missing or corrupt (said in a warning). None when there is no checkpoint at all. ``at_most``:
        only checkpoints of that step or before count. ``with_payload``: the bytes of state.pt too, last."""
        latest, committed = self.pointer(), self.committed_steps()
        older = [s for s in reversed(committed) if latest is None or s < latest]
        candidates = ([latest] if latest is not None else []) + older
        if at_most is not None:
            candidates = [s for s in candidates if s <= at_most]
        problems = []
        for step in candidates:
            try:
                payload, manifest = read_verified(self.store, f"step_{step}")
                state = decode_state(payload, self.store.url_of(f"step_{step}"))
            except CheckpointUnusable as err:
                log.warning("checkpoint step_%d is unusable: %s", step, err)
                problems.append(str(err))
                continue
            if problems:
                log.warning(
                    "falling back to checkpoint step_%d: the newer step_%d is unusable", step, candidates[0]
                )
            return (step, state, manifest, payload) if with_payload else (step, state, manifest)
        if problems:
            raise CheckpointError(
                f"no usable checkpoint at {self.url} (newest: {problems[0]}): repair or remove them, or "
                "set checkpoint.resume=false"
            )
        return None

    def check(self) -> None:
        """Fail now, with a CheckpointError, if the checkpoint URL cannot be used (bucket, credentials,
        a local path that cannot be a folder) rather than at the first save."""
        try:
            if isinstance(self.store, LocalStore):
                self.store.root.mkdir(parents=True, exist_ok=True)
            self.store.list(LATEST_FILE)
        except OSError as err:
            raise CheckpointError(
                f"checkpoint.url={self.url}: cannot create the folder ({err.strerror})"
            ) from None
        except DataError as err:
            raise CheckpointError(f"checkpoint.url={self.url}: {err}") from None


# --------------------------------------------------------------------------------------------------


def _serialise(state: Any, step: int) -> _Spool:
    """Write ``state`` to a local temporary file and hash it (the upload then streams from disk)."""
    _remove_abandoned_spools()
    handle, path = tempfile.mkstemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-step_{step}-", suffix=".pt")
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(state, out)
        digest = hashlib.sha256()
        with open(path, "rb") as written:
            while chunk := written.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        return _Spool(path, digest.hexdigest(), os.path.getsize(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _remove_abandoned_spools() -> None:
    """Delete the temporary files of processes killed mid-save (SIGKILL, OOM), which would fill the disk."""
    for path in Path(tempfile.gettempdir()).glob(f"{SPOOL_PREFIX}*.pt"):
        pid = path.name.removeprefix(SPOOL_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _open(url: str) -> Store:
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


def _remove_empty_folders(folder: Path) -> None:
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _unpickler_reason(err: BaseException) -> str:
    """The line of torch's weights-only refusal that names what was refused (e.g. ``GLOBAL posix.system``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "WeightsUnpickler error:" in line:
            return line.removeprefix("WeightsUnpickler error:").strip().rstrip(".")
    return lines[0] if lines else type(err).__name__
