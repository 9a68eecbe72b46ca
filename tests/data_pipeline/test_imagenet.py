"""ImageNet conventions in ``sagan prepare``: class indices from a synset mapping file (or sorted folder
names), the centre crop and the named resize filter, all recorded in the manifest."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.encodings import decode_raw
from data_pipeline.errors import DataError
from data_pipeline.manifest import read_manifest
from data_pipeline.prepare import prepare
from tests.support.paths import ROOT

SAGAN = str(Path(sys.executable).with_name("sagan"))
# Not in sorted order, as in ImageNet's LOC_synset_mapping.txt: the file's order is the class order.
SYNSETS = [
    ("n03000134", "chainlink fence"),
    ("n01440764", "tench, Tinca tinca"),
    ("n09999999", "a class without images here"),
    ("n02085620", "Chihuahua"),
]
COLOURS = {"n03000134": (250, 0, 0), "n01440764": (0, 250, 0), "n02085620": (0, 0, 250)}


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> tuple[Path, Path]:
    """A train/<wnid>/<wnid>_<i>.JPEG folder whose images are each their class's colour, and its mapping."""
    root = tmp_path_factory.mktemp("imagenet")
    for wnid, colour in COLOURS.items():
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(2 + int(wnid[-1]) % 3):
            Image.new("RGB", (50, 30), colour).save(root / "train" / wnid / f"{wnid}_{i}.JPEG", quality=95)
    mapping = root / "LOC_synset_mapping.txt"
    mapping.write_text("".join(f"{wnid} {description}\n" for wnid, description in SYNSETS))
    return root / "train", mapping


def class_of_each_sample(url: Path) -> list[tuple[int, tuple[int, int, int]]]:
    """(label, rounded mean colour) of every sample."""
    out = []
    for shard in read_manifest(str(url)).shards:
        with tarfile.open(url / shard.name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name in sorted(members):
            if name.endswith(".cls"):
                image = np.asarray(Image.open(io.BytesIO(members[name.replace(".cls", ".png")])))
                mean = tuple(int(round(c / 50) * 50) for c in image.reshape(-1, 3).mean(0))
                out.append((int(members[name]), mean))
    return out


def test_classes_follow_the_synset_mapping_file(imagenet_like, tmp_path):
    train, mapping = imagenet_like
    summary = prepare(
        f"imagefolder:{train}", str(tmp_path / "ds"), image_size=8, synsets=str(mapping), progress=False
    )
    manifest = read_manifest(str(tmp_path / "ds"))
    wnids = [wnid for wnid, _ in SYNSETS]
    assert (summary.num_classes, manifest.num_classes, manifest.classes) == (4, 4, wnids)
    assert manifest.class_descriptions == [d for _, d in SYNSETS]
    for label, colour in class_of_each_sample(tmp_path / "ds"):
        assert colour == COLOURS[wnids[label]]  # label i is the i-th line's synset
    counts = [sum(s.class_counts[c] for s in manifest.shards) for c in range(4)]
    assert counts == [len(list((train / w).iterdir())) if w in COLOURS else 0 for w in wnids]


def test_without_a_mapping_classes_are_the_sorted_folder_names(imagenet_like, tmp_path):
    train, _ = imagenet_like
    prepare(f"imagefolder:{train}", str(tmp_path / "ds"), image_size=8, progress=False)
    manifest = read_manifest(str(tmp_path / "ds"))
    assert manifest.classes == sorted(COLOURS) and manifest.class_descriptions == []
    for label, colour in class_of_each_sample(tmp_path / "ds"):
        assert colour == COLOURS[sorted(COLOURS)[label]]


def test_a_folder_missing_from_the_mapping_is_named(imagenet_like, tmp_path):
    train, _ = imagenet_like
    partial = tmp_path / "partial.txt"
    partial.write_text("n01440764 tench\nn02085620 Chihuahua\n")
    with pytest.raises(
        DataError, match=r"1 class folders of .* are not in the synset mapping .*: n03000134$"
    ):
        prepare(f"imagefolder:{train}", str(tmp_path / "ds"), synsets=str(partial), progress=False)
    with pytest.raises(DataError, match="applies to imagefolder sources"):
        prepare("digits", str(tmp_path / "ds"), synsets=str(partial), progress=False)
    with pytest.raises(DataError, match="cannot read synset mapping file"):
        prepare(
            f"imagefolder:{train}", str(tmp_path / "ds"), synsets=str(tmp_path / "nope.txt"), progress=False
        )
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    ("crop", "resize_filter"), [("center", "lanczos"), ("center", "bicubic"), ("none", "box")]
)
def test_crop_and_resize_filter_are_applied_and_recorded(tmp_path, crop, resize_filter):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (20, 36, 3), dtype=np.uint8)
    (tmp_path / "src" / "only").mkdir(parents=True)
    Image.fromarray(wide).save(tmp_path / "src" / "only" / "wide.png")
    out = tmp_path / "ds"
    prepare(
        f"imagefolder:{tmp_path / 'src'}", str(out), image_size=10, format="raw", crop=crop,
        resize_filter=resize_filter, progress=False,
    )  # fmt: skip
    manifest = read_manifest(str(out))
    assert manifest.preprocess == {"crop": crop, "resize_filter": resize_filter}
    with tarfile.open(out / manifest.shards[0].name) as tar:
        stored = decode_raw(tar.extractfile("000000.npy").read(), 10)
    expected = Image.fromarray(wide)
    if crop == "center":
        expected = expected.crop((8, 0, 28, 20))  # the centred 20x20 square
    expected = expected.resize((10, 10), getattr(Image.Resampling, resize_filter.upper()))
    np.testing.assert_array_equal(stored, np.asarray(expected))


@pytest.mark.slow
def test_the_command_line_takes_the_imagenet_options(imagenet_like, tmp_path):
    train, mapping = imagenet_like
    out = tmp_path / "ds"
    result = subprocess.run(
        [
            SAGAN, "prepare", "--source", f"imagefolder:{train}", "--out", str(out), "--image-size", "16",
            "--synsets", str(mapping), "--format", "jpeg", "--quality", "80", "--resize-filter", "bicubic",
            "--workers", "2",
        ],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "prepared 8 samples (4 classes, 16x16 jpeg)" in result.stdout
    manifest = read_manifest(str(out))
    assert manifest.encoding.to_metadata() == {
        "format": "jpeg",
        "extension": "jpg",
        "quality": 80,
        "subsampling": "4:2:0",
    }
    assert manifest.preprocess == {"crop": "center", "resize_filter": "bicubic"}
    assert manifest.classes == [wnid for wnid, _ in SYNSETS]

    again = subprocess.run(
        [SAGAN, "prepare", "--source", f"imagefolder:{train}", "--out", str(out), "--format", "gif"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 2 and "invalid choice: 'gif'" in again.stderr
    assert read_manifest(str(out)).plan == manifest.plan  # nothing written was lost
