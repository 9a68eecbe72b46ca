"""A corpus of bad inputs: each is a clear one-line error or a counted skip, nothing crashes, nothing
written before is lost.

Here: damaged shards read by the stream (truncated tar, garbage bytes, a zero-length image, a huge
declared image size, a label out of range, non-UTF-8 keys, a member name that climbs out of its
folder, shard bytes that do not match the manifest), bad source images for `sagan prepare`, and bad
input to `sagan train` (a missing manifest, bad config values, a bad URL, a missing bucket). Elsewhere:
wrong credentials and URLs carrying them (test_security.py), corrupt and pickled checkpoints
(tests/trainer/test_checkpoint.py), malformed config files and keys (tests/trainer/test_config.py), a
mistyped data.url (test_cli.py), unreachable and deleted shards (tests/data_pipeline/test_faults.py).
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.errors import DataError
from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import prepare
from data_pipeline.storage import open_store
from data_pipeline.stream import DataConfig
from data_pipeline.untrusted import MAX_IMAGE_PIXELS, UnsafeInput, check_member_name
from tests.data_pipeline.test_faults import IMAGE_SIZE, NUM_SAMPLES, one_epoch  # the same id dataset
from tests.support.datasets import png, recommit, write_id_parquet
from tests.support.jobs import SAGAN, TINY, error_lines, finish, start
from trainer.checkpoint.checkpointer import Checkpointer

DAMAGED_SHARD = 1
# Pillow warns about the 90 MP header before our own check refuses it.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def declared_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` RGB pixels, with a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


BOMB = declared_png(10_000, 9_000)  # 90 MP: Pillow only warns below 179 MP; our limit is 67 MP


def members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def tar_bytes(items: list[tuple[str, bytes]], mtime: int = 0) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def pngs_of(items):
    return [i for i, (name, _) in enumerate(items) if name.endswith(".png")]


def replace_nth_png(items, n: int, data: bytes):
    index = pngs_of(items)[n]
    return [*items[:index], (items[index][0], data), *items[index + 1 :]]


def damage(kind: str, data: bytes) -> tuple[bytes, bool]:
    """(new shard bytes, whether the manifest is re-committed to them: damaged at prepare time)."""
    items = members(data)
    if kind == "truncated_tar":
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            third = [m for m in tar if m.name.endswith(".png")][2]
        return data[: third.offset_data + 50], False
    if kind == "garbage_bytes":
        return np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes(), False
    if kind == "zero_length_image":
        return tar_bytes(replace_nth_png(items, 1, b"")), True
    if kind == "huge_declared_image":
        return tar_bytes(replace_nth_png(items, 1, BOMB)), True
    if kind == "label_out_of_range":
        cls = next(i for i, (name, _) in enumerate(items) if name.endswith(".cls"))
        return tar_bytes([*items[:cls], (items[cls][0], b"99"), *items[cls + 1 :]]), True
    if kind == "non_utf8_keys":  # b"\xff\xfe" in every name: read as U+FFFD, the samples unharmed
        return tar_bytes([(f"\udcff\udcfe{name}", item) for name, item in items]), True
    if kind == "path_traversal_member":
        third = pngs_of(items)[2]
        evil = [
            ("../../../tmp/evil.png", png(np.zeros((16, 16, 3), np.uint8))),
            ("../../../tmp/evil.cls", b"1"),
        ]
        return tar_bytes([*items[:third], *evil, *items[third:]]), True
    if kind == "checksum_mismatch":  # the same samples, other bytes: not what the manifest lists
        return tar_bytes(items, mtime=12345), False
    raise AssertionError(kind)


# (reason counted, how many of the damaged shard's samples)
EXPECTED = {
    "truncated_tar": ("truncated", lambda n: n - 2),
    "garbage_bytes": ("checksum", lambda n: n),  # every sample fails its CRC-32
    "zero_length_image": ("decode", lambda n: 1),
    "huge_declared_image": ("decode", lambda n: 1),
    "label_out_of_range": ("label", lambda n: 1),
    "non_utf8_keys": (None, lambda n: 0),
    "path_traversal_member": ("truncated", lambda n: n - 2),
    "checksum_mismatch": ("checksum", lambda n: n),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_damaged_shard_is_a_counted_skip(kind, num_workers, tmp_path):
    url = str(tmp_path / "ids")
    source = write_id_parquet(tmp_path / "ids.parquet", NUM_SAMPLES, IMAGE_SIZE)
    prepare(f"parquet:{source}", url, image_size=IMAGE_SIZE, shard_size=40 * 1024, progress=False)
    store = open_store(url)
    info = read_manifest(url).shards[DAMAGED_SHARD]
    data, recommitted = damage(kind, store.read_bytes(info.name))
    store.write_bytes(info.name, data)
    if recommitted:
        recommit(url, [DAMAGED_SHARD])
    manifest_before = store.read_bytes("manifest.parquet")
    ids, stream = one_epoch(DataConfig(url=url, prepare_source="", num_workers=num_workers))
    reason, count = EXPECTED[kind]
    skipped = stream.counters()["skipped"]
    assert skipped == ({reason: count(info.num_samples)} if reason else {}), skipped
    assert len(ids) == NUM_SAMPLES  # every slot filled, with a valid sample where one was skipped
    if not reason:
        assert sorted(ids) == list(range(NUM_SAMPLES))
    assert store.read_bytes("manifest.parquet") == manifest_before  # reading wrote nothing
    assert not Path("/tmp/evil.png").exists()


def test_member_names_and_declared_sizes_are_checked_before_use():
    for name in ("../x.png", "/etc/passwd", "a/../../b.cls", "C:/x.png", "..\\x.png", "a\0b.png", ""):
        with pytest.raises(UnsafeInput, match="unsafe member name"):
            check_member_name(name)
    assert check_member_name("000123.png") == "000123.png" and check_member_name("a/b..c.png") == "a/b..c.png"
    from data_pipeline.images import decode_rgb

    with pytest.raises(UnsafeInput, match=rf"declares 10000x9000 pixels, more than {MAX_IMAGE_PIXELS:,}"):
        decode_rgb(BOMB)


def test_prepare_skips_and_counts_bad_source_images_and_a_failed_prepare_keeps_the_old_dataset(tmp_path):
    source = tmp_path / "images"
    good = np.zeros((8, 8, 3), np.uint8)
    for label in ("a", "b"):
        (source / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(good + i).save(source / label / f"{i}.png")
    (source / "a" / "empty.png").write_bytes(b"")
    (source / "a" / "garbage.png").write_bytes(os.urandom(500))
    (source / "b" / "bomb.png").write_bytes(BOMB)
    Image.fromarray(good).save(os.path.join(os.fsencode(source / "b"), b"caf\xe9.png"))  # a non-UTF-8 name
    out = str(tmp_path / "data")
    summary = prepare(f"imagefolder:{source}", out, image_size=8, progress=False)
    assert (summary.num_samples, summary.num_skipped) == (9, 3)
    before = {name: open_store(out).read_bytes(name) for name in open_store(out).list()}

    bad_only = tmp_path / "bad-only"
    (bad_only / "a").mkdir(parents=True)
    (bad_only / "a" / "bomb.png").write_bytes(BOMB)
    with pytest.raises(
        DataError, match=r"none of the first 1 images of imagefolder:\S+ is readable"
    ) as raised:
        prepare(f"imagefolder:{bad_only}", out, image_size=8, progress=False)
    assert "\n" not in str(raised.value)
    after = {name: open_store(out).read_bytes(name) for name in open_store(out).list()}
    assert after == before  # the dataset prepared before is whole


CLI_CASES = {
    "missing manifest": (["data.url={empty}"], "no dataset at {empty} (manifest.parquet is missing)"),
    "negative reload count": (["trainer.nonfinite_reload_after=-1"], "trainer.nonfinite_reload_after=-1 must not be negative"),
    "grace period not a number": (["trainer.preemption_grace_seconds=soon"], "trainer.preemption_grace_seconds='soon' must be a number"),
    "bad checkpoint URL": (["checkpoint.url=gs://bucket/x"], "unsupported URL scheme in 'gs://bucket/x'"),
    "missing bucket": (["checkpoint.url=s3://no-such-bucket-here/c"], "S3 bucket 'no-such-bucket-here' does not exist"),
}  # fmt: skip
if not torch.cuda.is_available():  # a GPU pod without one: a line, never a silent CPU run
    CLI_CASES["cuda without a GPU"] = (["trainer.device=cuda"], "trainer.device=cuda but ")


@pytest.mark.slow
def test_bad_input_to_sagan_train_is_one_line_and_keeps_the_run_s_checkpoint(
    digits_data, moto_server, tmp_path
):
    run_dir, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    checkpoints = Checkpointer(str(run_dir / "checkpoints"))
    checkpoints.save(7, {"step": 7})  # a run's checkpoint, which no failed start may touch
    checkpoints.wait()
    jobs = {}
    for case, (overrides, _) in CLI_CASES.items():
        args = [o.format(empty=empty) for o in overrides]
        command = [SAGAN, "train", *TINY, f"data.url={digits_data}", f"run.dir={run_dir}", *args]
        jobs[case] = start(command, moto_server.env)  # at once: each only starts and refuses
    for case, job in jobs.items():
        code, output = finish(job)
        lines = error_lines(output)
        expected = CLI_CASES[case][1].format(empty=empty)
        assert code == 2 and len(lines) == 1 and expected in lines[0], f"{case}: {output[-2000:]}"
        assert "Traceback" not in output, case
    assert checkpoints.pointer() == 7 and checkpoints.load(7)[0] == {"step": 7}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["LATEST", "step_7"]
