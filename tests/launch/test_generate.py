"""``sagan generate``: the images are G's for (seed, i); one process and two ranks (torchrun, gloo, other
batch sizes and thread counts) write the same bytes, as PNG folders and as shards, to a folder and to S3
(moto); the shards read back by ``sagan eval --data`` and stock ``webdataset``; a re-run keeps what was
committed; another generation into the same folder and bad arguments are one line and exit status 2.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline.manifest import read_manifest
from data_pipeline.storage import open_store
from launch.cli import main
from launch.generate_command import Generation
from tests.launch.test_export import checkpoint_with_attention
from tests.support.jobs import SAGAN, TORCHRUN, error_lines, finish, run, start
from trainer.checkpoint.generator import load_generators

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(checkpoint_with_attention(tmp_path_factory.mktemp("generate") / "checkpoints"))


def two_ranks(*argv: str) -> str:
    """``sagan generate`` under torchrun with 2 ranks (gloo on the CPU, one thread each)."""
    command = [TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "launch.cli", "generate", *argv]
    return run(command)


def files_of(url: str) -> dict[str, bytes]:
    store = open_store(url)
    return {name: store.read_bytes(name) for name in store.list("")}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_png_folders_hold_gs_images_and_two_ranks_write_the_same_bytes(checkpoint, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    argv = ["--checkpoint", checkpoint, "--out", str(one), "--num", "45", "--classes", "0,3,7", "--seed", "5"]
    assert main(["generate", *argv, "--batch-size", "8", "--shard-samples", "10"]) == 0
    assert "generated 45 images of G-EMA step 10 (3 classes" in capsys.readouterr().out
    two_ranks(
        *argv[:3], str(two), "--num-images", "45", *argv[6:], "--batch-size", "3", "--shard-samples", "10"
    )

    images = files_of(str(one))
    assert images == files_of(str(two))  # every name and every byte
    pngs = sorted(name for name in images if name.endswith(".png"))
    assert len(pngs) == 45 and sorted({name.split("/")[0] for name in pngs}) == ["0", "3", "7"]
    assert [sum(n.startswith(f"{c}/") for n in pngs) for c in "037"] == [15, 15, 15]
    assert pngs[:2] == ["0/000000.png", "0/000003.png"]  # image i has class classes[i % 3]

    # What they are: G-EMA in float64 on image i's own z; float32 moves at most a few values by one level.
    spec = json.loads(images["generation.json"])
    gen = Generation(**{k: v for k, v in spec.items() if k != "id"} | {"classes": (0, 3, 7)})
    G = load_generators(checkpoint).nets["ema"]
    z = torch.from_numpy(np.stack([gen.noise(i) for i in range(45)]))
    y = torch.tensor([gen.label(i) for i in range(45)])
    with torch.no_grad():
        exact = ((G.double()(z.double(), y).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        single = ((G.float()(z, y).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    drawn = np.stack([pixels(images[gen.png_name(i)]) for i in range(45)])
    assert np.array_equal(drawn, exact.permute(0, 2, 3, 1).numpy())
    difference = np.abs(drawn.astype(int) - single.permute(0, 2, 3, 1).numpy().astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_shards_from_two_ranks_on_s3_equal_one_process_and_read_back(checkpoint, s3_bucket, tmp_path, capsys):
    local, remote = tmp_path / "shards", f"s3://{s3_bucket}/generated"
    argv = ["--checkpoint", checkpoint, "--num", "50", "--format", "shards", "--shard-samples", "16"]
    assert main(["generate", *argv[:2], "--out", str(local), *argv[2:], "--batch-size", "50"]) == 0
    two_ranks(*argv[:2], "--out", remote, "--num-images", "50", *argv[4:], "--batch-size", "7")
    written = files_of(str(local))
    assert written == files_of(remote)
    assert len([n for n in written if n.endswith(".tar")]) == 4
    assert not [n for n in written if n.startswith("shard-") and n.endswith(".json")]  # records gone

    manifest = read_manifest(remote)
    assert manifest.num_samples == 50 and manifest.num_classes == 10 and manifest.image_size == 32
    assert [sum(s.class_counts[c] for s in manifest.shards) for c in range(10)] == [5] * 10

    urls = [str(local / s.name) for s in read_manifest(str(local)).shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "cls"))
    assert [key for key, _, _ in samples] == [f"{i:06d}" for i in range(50)]
    assert [label for _, _, label in samples] == [i % 10 for i in range(50)]
    assert all(image.size == (32, 32) for _, image, _ in samples)

    capsys.readouterr()
    out = tmp_path / "self.json"
    assert main(["eval", "--data", remote, "--reference", str(local), "--metrics", "fid", "--num-samples", "50",
                 "--num-reference", "0", "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())[0]
    assert (
        result["num_samples"] == 50 and result["num_reference"] == 50 and abs(result["metrics"]["fid"]) < 1e-6
    )


def test_a_rerun_keeps_what_was_committed_and_makes_the_rest(checkpoint, tmp_path, capsys):
    shards, pngs, clean = tmp_path / "shards", tmp_path / "pngs", tmp_path / "clean"
    shard_args = ["--checkpoint", checkpoint, "--num", "40", "--format", "shards", "--shard-samples", "10"]
    png_args = ["--checkpoint", checkpoint, "--num", "40", "--shard-samples", "10"]
    assert main(["generate", *shard_args, "--out", str(clean)]) == 0

    # A crash after the shards, before the manifest (a folder in its place makes its write fail); then one
    # shard loses its record (not committed) and another its tar and record (never made).
    (shards / "manifest.parquet").mkdir(parents=True)
    code, output = finish(start([SAGAN, "generate", *shard_args, "--out", str(shards)]))  # it exits at once
    assert code == 2 and len(error_lines(output, "generate")) == 1, output[-3000:]
    (shards / "manifest.parquet").rmdir()
    tars = sorted(shards.glob("shard-*.tar"))
    records = sorted(shards.glob("shard-*.json"))
    assert len(tars) == len(records) == 4
    records[1].unlink()
    tars[2].unlink(), records[2].unlink()
    inodes = {tars[i].name: tars[i].stat().st_ino for i in (0, 3)}
    capsys.readouterr()
    assert main(["generate", *shard_args, "--out", str(shards)]) == 0
    assert "kept 20 images committed before" in capsys.readouterr().out  # shards 0 and 3
    assert files_of(str(shards)) == files_of(str(clean))
    assert all((shards / name).stat().st_ino == inode for name, inode in inodes.items())

    assert main(["generate", *png_args, "--out", str(pngs)]) == 0
    complete = files_of(str(pngs))
    for name in ("3/000003.png", "3/000013.png", "5/000035.png"):
        (pngs / name).unlink()
    inodes = {p: p.stat().st_ino for p in pngs.rglob("*.png")}
    assert main(["generate", *png_args, "--out", str(pngs)]) == 0
    assert files_of(str(pngs)) == complete
    assert all(p.stat().st_ino == inode for p, inode in inodes.items())  # the images there were kept

    capsys.readouterr()
    assert main(["generate", *shard_args, "--out", str(shards)]) == 0
    assert "already generated: 40 images" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--classes", "0,12"], "--classes '0,12': the generator has classes 0..9"),
        (["--classes", "a"], "give comma-separated class ids"),
        (["--num", "0"], "--num 0 must be at least 1"),
        (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
        (["--seed", "-1"], "--seed -1 must be >= 0"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(checkpoint, tmp_path, capsys, argv, message):
    base = ["generate", "--checkpoint", checkpoint, "--out", str(tmp_path / "o"), "--num", "4"]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_another_generation_into_the_same_folder_is_refused(checkpoint, tmp_path, capsys):
    base = ["generate", "--checkpoint", checkpoint, "--out", str(tmp_path), "--num", "4"]
    assert main(base) == 0
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    assert main([*base, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds another generation (seed differ)" in err and len(err.splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == before


def test_one_process_writes_png_to_s3(checkpoint, s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/pngs"
    argv = ["generate", "--checkpoint", checkpoint, "--num", "12", "--seed", "2"]
    assert main([*argv, "--out", url]) == 0
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert files_of(url) == files_of(str(tmp_path)) and len(files_of(url)) == 13
