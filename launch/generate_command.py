"""``sagan generate``: N images of a checkpoint's generator, as class folders of PNGs or as a dataset of shards.

    sagan generate --checkpoint URL --num N --out URL [--classes 0,3,7] [--format png|shards] [--seed S]
                   [--batch-size B] [--generator ema|g] [--shard-samples K]

Semantics. Image i (0 <= i < N) has the class ``classes[i % len(classes)]`` (every class, or the listed
ones: balanced to within one image) and the noise ``z_i`` drawn from a generator seeded with (seed, i)
alone. The images are cut into parts of K consecutive indices (K = ``--shard-samples``); part p is made
by rank p mod world size. The generator runs in float64: in float32 the CPU's kernels round differently
for other batch shapes and thread counts (a rank of a job gets fewer threads than a lone process), which
moved a few uint8 values by one; in float64 the same N images come out, byte for byte, for any world
size, batch size and thread count. They may differ from float32 samples by one level in a few pixels.

- ``png``: ``<out>/<class>/<index>.png`` (zero-padded, so sorted names are numeric order: ImageFolder's
  class i is class i) and ``<out>/generation.json`` (what was generated, written first by rank 0). An
  image is committed by its atomic write; a re-run with the same arguments keeps the images there and
  makes the others; other arguments into the same folder are refused.
- ``shards``: WebDataset tar shards (``<index>.png``, ``<index>.cls``) and ``manifest.parquet`` in
  ``sagan prepare``'s format, made by its ``ShardMaker``; part p is shard p, committed by its tar and then
  its record, as ``sagan prepare`` does; after a barrier rank 0 writes the manifest (the commit point),
  then deletes the records. ``sagan eval --data``, ``sagan train`` and stock ``webdataset`` read it.

``--out`` is a local folder (shared by every rank) or ``s3://``. A progress bar runs on rank 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from data_pipeline.encodings import Encoding
from data_pipeline.errors import DataError, ObjectNotFound
from data_pipeline.images import Preprocess
from data_pipeline.manifest import read_manifest, write_manifest
from data_pipeline.prepare import KILLED_WRITE, SHARD_NAME
from data_pipeline.shard_plan import MadeShard, Plan, ShardMaker
from data_pipeline.sources import Source
from data_pipeline.storage import Store, open_store

SPEC_FILE = "generation.json"
PNG = Encoding("png")
WRITE_THREADS = 8  # concurrent image writes (S3 PUTs of small objects wait on latency, not bandwidth)


@dataclass(frozen=True)
class Generation:
    """Everything that determines the images: the same values give the same bytes."""

    checkpoint: str  # the step folder read (recorded, not part of the identity)
    state_sha256: str  # of its state.pt
    step: int
    generator: str  # ema | g
    num: int
    classes: tuple[int, ...]
    seed: int
    part_size: int  # images per part (per shard)
    format: str
    resolution: int
    z_dim: int
    num_classes: int

    @property
    def id(self) -> str:
        """A digest of what determines the bytes (the checkpoint by its content, not by the path it was read at)."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "checkpoint"}

    @property
    def num_parts(self) -> int:
        return -(-self.num // self.part_size)

    def part(self, index: int) -> range:
        return range(index * self.part_size, min((index + 1) * self.part_size, self.num))

    def label(self, i: int) -> int:
        return self.classes[i % len(self.classes)]

    def noise(self, i: int) -> np.ndarray:
        return np.random.default_rng((self.seed, i)).standard_normal(self.z_dim, dtype=np.float32)

    def png_name(self, i: int) -> str:
        class_width, index_width = len(str(self.num_classes - 1)), max(6, len(str(self.num - 1)))
        return f"{self.label(i):0{class_width}d}/{i:0{index_width}d}.png"


def parse_classes(text: str | None, num_classes: int) -> tuple[int, ...]:
    if not text:
        return tuple(range(num_classes))
    try:
        classes = tuple(dict.fromkeys(int(c) for c in text.split(",") if c.strip()))
    except ValueError:
        raise ValueError(f"--classes {text!r}: give comma-separated class ids such as 0,3,7") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"--classes {text!r}: the generator has classes 0..{num_classes - 1}")
    return classes


def check_counts(args: argparse.Namespace) -> None:
    for name, value in (
        ("--num", args.num),
        ("--batch-size", args.batch_size),
        ("--shard-samples", args.shard_samples),
    ):
        if value < 1:
            raise ValueError(f"{name} {value} must be at least 1")
    if args.seed < 0:
        raise ValueError(f"--seed {args.seed} must be >= 0")


@torch.no_grad()
def draw(G: nn.Module, gen: Generation, indices: range, batch_size: int) -> Iterator[tuple[int, Image.Image]]:
    """(index, image) of ``indices`` drawn by the float64 ``G``, in passes of ``batch_size`` rows."""
    device = next(G.parameters()).device
    for start in range(indices.start, indices.stop, batch_size):
        batch = range(start, min(start + batch_size, indices.stop))
        z = torch.from_numpy(np.stack([gen.noise(i) for i in batch])).to(device, torch.float64)
        y = torch.tensor([gen.label(i) for i in batch], device=device)
        # to uint8 as evaluation.evaluator.quantise does, from the float64 values (not rounded to float32 first)
        pixels = (
            ((G(z, y).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        )
        for row, i in enumerate(batch):
            yield i, Image.fromarray(pixels[row])


class _Drawn:
    """A part's images drawn ahead, handed out by index: the ``load`` of the shards' ``Source``."""

    def __init__(self) -> None:
        self.images: dict[int, tuple[Image.Image, int]] = {}

    def fill(self, G: nn.Module, gen: Generation, indices: range, batch_size: int) -> None:
        self.images = {i: (image, gen.label(i)) for i, image in draw(G, gen, indices, batch_size)}

    def load(self, i: int) -> tuple[Image.Image, int]:
        return self.images.pop(i)


# --------------------------------------------------------------------------------------------------
# The two formats, on one rank


def _png_parts(G, gen: Generation, store: Store, parts: list[int], batch_size: int, bar: tqdm) -> int:
    """Write the images of ``parts`` not committed before; returns how many were kept from before."""
    present = set(store.list(""))
    kept = 0
    with ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="png-write") as pool:
        for p in parts:
            indices = gen.part(p)
            missing = {i for i in indices if gen.png_name(i) not in present}
            kept += len(indices) - len(missing)
            if missing:  # the whole part is drawn again: its passes, and so its pixels, are the same
                writes = [
                    pool.submit(store.write_bytes, gen.png_name(i), PNG.encode(image))
                    for i, image in draw(G, gen, indices, batch_size)
                    if i in missing
                ]
                for write in writes:
                    write.result()
            bar.update(len(indices))
    return kept


def _plan(gen: Generation) -> Plan:
    fingerprint = f"{gen.state_sha256[:16]}-{gen.step}-{gen.generator}"
    return Plan(gen.id, fingerprint, gen.num, gen.part_size, gen.resolution, PNG, Preprocess())


def _source(gen: Generation, drawn: _Drawn, class_names: list[str]) -> Source:
    name = f"generate {gen.generator} step {gen.step} of {gen.checkpoint}"
    return Source(name, gen.num, gen.num_classes, class_names, drawn.load, _plan(gen).fingerprint)


def _committed_shards(store: Store, plan: Plan) -> dict[int, MadeShard]:
    made = {}
    for name in store.list(f"shard-{plan.id}-"):
        if name.endswith(".json"):
            try:
                record = MadeShard.from_record(store.read_bytes(name))
            except (ObjectNotFound, ValueError, KeyError, TypeError):
                continue  # a damaged record: its shard is made again
            if name == plan.record_name(record.index):
                made[record.index] = record
    return made


def _shard_parts(
    G, gen: Generation, store: Store, parts: list[int], batch_size: int, bar: tqdm, names
) -> int:
    plan, drawn = _plan(gen), _Drawn()
    committed = _committed_shards(store, plan)
    with tempfile.TemporaryDirectory(prefix="sagan-generate-") as workdir:
        maker = ShardMaker(_source(gen, drawn, names), np.arange(gen.num), plan, Path(workdir))
        for p in parts:
            if p not in committed:
                drawn.fill(G, gen, gen.part(p), batch_size)
                made = maker.make(p)
                store.upload_file(made.info.name, Path(workdir) / made.info.name)
                store.write_bytes(plan.record_name(p), made.record())  # the shard's commit
                (Path(workdir) / made.info.name).unlink()
            bar.update(len(gen.part(p)))
    return sum(len(gen.part(p)) for p in parts if p in committed)


def _write_manifest(gen: Generation, store: Store, out: str, names: list[str]) -> None:
    """Rank 0, after every rank committed its shards: the manifest, then the records and older shards go."""
    plan = _plan(gen)
    made = _committed_shards(store, plan)
    missing = [p for p in range(gen.num_parts) if p not in made]
    if missing:
        raise DataError(
            f"{len(missing)} shards of generation {gen.id} were not committed (first: {missing[0]})"
        )
    shards = [made[p].info for p in range(gen.num_parts)]
    write_manifest(
        out, shards, image_size=gen.resolution, num_classes=gen.num_classes, source=_source(gen, _Drawn(), names).name,
        classes=names, encoding=PNG, preprocess=plan.preprocess.to_metadata(), plan=plan.id,
    )  # fmt: skip
    keep = {s.name for s in shards}
    store.delete(n for n in store.list("shard-") if SHARD_NAME.match(n) and n not in keep)
    store.delete(n for n in store.list(".") if KILLED_WRITE.match(n))


# --------------------------------------------------------------------------------------------------
# The command


def refuse_another_generation(store: Store, gen: Generation) -> None:
    """``--out`` holds nothing yet or this very generation (a re-run completes it); else a one-line error."""
    try:
        before = json.loads(store.read_bytes(SPEC_FILE))
    except ObjectNotFound:
        return
    if before.get("id") != gen.id:
        differ = [k for k, v in gen.identity().items() if json.dumps(before.get(k)) != json.dumps(v)]
        raise ValueError(
            f"{store.url} holds another generation ({', '.join(differ)} differ): use another --out, or the "
            "same arguments to complete it"
        )


def _claim(store: Store, gen: Generation) -> bool:
    """Rank 0: record what ``--out`` holds (before any image); True when the generation is complete."""
    if gen.format == "shards":
        try:
            if read_manifest(store.url).plan == gen.id:
                return True
        except DataError:
            pass
    if not store.exists(SPEC_FILE):
        store.write_bytes(SPEC_FILE, json.dumps({"id": gen.id, **asdict(gen)}, indent=1).encode())
    return False


def _class_names(data_url: str, num_classes: int) -> list[str]:
    """The training data's class names where its manifest is readable, else the class ids."""
    try:
        names = read_manifest(data_url).classes
    except (DataError, OSError):
        names = []
    return list(names) if len(names) == num_classes else [str(c) for c in range(num_classes)]


def generate_command(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from launch.outcome import run_on_ranks
    from trainer.checkpoint.generator import GENERATORS, load_generators
    from trainer.runtime.distributed import broadcast_object, init_runtime

    # Bad input fails here, before the ranks wait for each other (a failure in ``work`` ends the process).
    check_counts(args)
    started = time.perf_counter()
    store = open_store(args.out)
    loaded = load_generators(args.checkpoint, (args.generator,))
    model = loaded.config.model
    gen = Generation(
        checkpoint=loaded.folder, state_sha256=loaded.manifest["files"]["state.pt"]["sha256"],
        step=loaded.step, generator=args.generator, num=args.num,
        classes=parse_classes(args.classes, loaded.num_classes), seed=args.seed,
        part_size=args.shard_samples, format=args.format,
        resolution=model.resolution, z_dim=model.z_dim, num_classes=loaded.num_classes,
    )  # fmt: skip
    refuse_another_generation(store, gen)
    runtime = init_runtime("auto")

    def work() -> None:
        G = loaded.nets[args.generator].to(runtime.device).double()
        done = _claim(store, gen) if runtime.is_main else None
        done = broadcast_object(done) if runtime.world_size > 1 else done
        names = _class_names(loaded.config.data.url, gen.num_classes)
        parts = [p for p in range(gen.num_parts) if p % runtime.world_size == runtime.rank]
        kept = 0
        if not done:
            mine = sum(len(gen.part(p)) for p in parts)
            desc = "generate" + (f" (rank 0 of {runtime.world_size})" if runtime.world_size > 1 else "")
            with tqdm(total=mine, desc=desc, unit="img", disable=not runtime.is_main) as bar:
                make = _png_parts if gen.format == "png" else _shard_parts
                extra = () if gen.format == "png" else (names,)
                kept = make(G, gen, store, parts, args.batch_size, bar, *extra)
        if runtime.world_size > 1:
            dist.barrier()
        if runtime.is_main:
            if gen.format == "shards" and not done:
                _write_manifest(gen, store, store.url, names)
            print(
                summary(
                    gen, store.url, done, kept, runtime.world_size, time.perf_counter() - started, GENERATORS
                )
            )

    return run_on_ranks("generate", runtime, work)


def summary(gen: Generation, url: str, done: bool, kept: int, world_size: int, seconds: float, names) -> str:
    what = (
        f"{gen.num} images of {names[gen.generator]} step {gen.step} ({len(gen.classes)} classes, "
        f"{gen.resolution}x{gen.resolution}, {'PNG folders' if gen.format == 'png' else 'shards'}) at {url}"
    )
    if done:
        return f"already generated: {what}"
    text = f"generated {what} in {seconds:.1f}s" + (f" ({world_size} ranks)" if world_size > 1 else "")
    return text + (f"; kept {kept} images committed before (rank 0's parts)" if kept else "")
