"""The fast tar reader agrees with the standard library on every tar flavour and refuses damage."""

from __future__ import annotations

import io
import tarfile

import pytest

from data_pipeline.shards import ShardDamaged, samples, tar_members

LONG = "d" * 120  # longer than the 100-byte name field


def archive(fmt: int, names: list[str], *, directory: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        if directory:
            info = tarfile.TarInfo("folder")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for i, name in enumerate(names):
            data = f"payload {i} ".encode() * (i * 37 + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


NAMES = ["000000.png", "000000.cls", f"{LONG}/000001.PNG", f"{LONG}/000001.cls", "ü/000002.png", "__meta__"]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile(fmt):
    names = NAMES if fmt != tarfile.USTAR_FORMAT else [n for n in NAMES if "ü" not in n]
    data = archive(fmt, names)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert list(tar_members(io.BytesIO(data))) == expected
    grouped = list(samples(io.BytesIO(data)))
    assert [sorted(s) for s in grouped] == [["cls", "png"], ["cls", "png"], ["png"]][: len(grouped)]


def test_a_stream_without_end_blocks_is_complete():
    data = archive(tarfile.USTAR_FORMAT, ["a.png", "a.cls"], directory=False)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512  # drop the end-of-archive blocks
    assert len(data) > end and [sorted(s) for s in samples(io.BytesIO(data[:end]))] == [["cls", "png"]]


def test_truncation_keeps_the_complete_sample_before_it():
    data = archive(tarfile.USTAR_FORMAT, ["a.png", "a.cls", "b.png", "b.cls"], directory=False)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut = next(m for m in tar if m.name == "b.png").offset_data + 10
    reader = samples(io.BytesIO(data[:cut]))
    assert sorted(next(reader)) == ["cls", "png"]
    with pytest.raises(ShardDamaged, match="ends inside a tar member"):
        next(reader)


def test_garbage_is_refused():
    with pytest.raises(ShardDamaged, match="not a valid tar header"):
        list(tar_members(io.BytesIO(b"x" * 2048)))
    with pytest.raises(ShardDamaged, match="inside a tar header"):
        list(tar_members(io.BytesIO(archive(tarfile.USTAR_FORMAT, ["a.png"])[:700])))


def pax_archive(records: bytes) -> bytes:
    """One pax header holding ``records``, then a member "a.png"."""

    def header(name: str, size: int, kind: bytes) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.type = size, kind
        return info.tobuf(tarfile.USTAR_FORMAT)

    pad = b"\0" * (-len(records) % 512)
    return header("pax", len(records), tarfile.XHDTYPE) + records + pad + header("a.png", 0, tarfile.REGTYPE)


@pytest.mark.parametrize(
    "records",
    [
        b"0 path=x\n" * 2,
        b"99 path=x\n",
        b"-5 path=x\n",
        b"nine path=x\n",
        b"no-space-at-all",
        b"12 \xff\xfe=x\n\n",
    ],
    ids=["zero-length", "past-the-end", "negative", "not-a-number", "no-space", "key-not-utf8"],
)
def test_a_damaged_pax_header_is_refused_as_damage(records):
    assert list(tar_members(io.BytesIO(pax_archive(b"10 path=b\n")))) == [("b", b"")]  # a valid one reads
    with pytest.raises(ShardDamaged, match="pax header that is not valid"):
        list(tar_members(io.BytesIO(pax_archive(records))))
