"""Reading WebDataset samples out of a tar stream, fast.

A shard is a plain tar file; a sample is the run of consecutive members sharing a key
(``<key>.png``, ``<key>.cls``). This reader parses the tar headers itself (ustar, GNU long names and
pax records) because :mod:`tarfile` spends ~50 µs per member, which would make parsing, not
decoding, the cost of streaming small images. Damage raises :class:`ShardDamaged`; a stream that ends
at a member boundary without the end-of-archive blocks is accepted, as webdataset does.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
from webdataset.tariterators import base_plus_ext

from data_pipeline.untrusted import UnsafeInput, check_member_name

BLOCK = 512
VERIFY_TAIL_BYTES = 64 * 1024  # read this much of a shard beyond the samples wanted, to check it whole
_REGULAR = (b"0", b"\0", b"7")
_ZERO_BLOCK = bytes(BLOCK)


class ShardDamaged(ValueError):
    """The tar stream is truncated or its bytes are not tar headers."""

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member  # the member being read when the damage showed, if its name was known


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    """A pax header's "LENGTH KEY=VALUE\n" records; ShardDamaged for anything else."""
    records, position = {}, 0
    try:
        while position < len(data):
            space = data.index(b" ", position)
            length = int(data[position:space])
            if length <= space - position or position + length > len(data):
                raise ValueError(f"a record of {length} bytes at byte {position}")
            key, _, value = data[space + 1 : position + length - 1].partition(b"=")
            records[key.decode()] = value.decode("utf-8", "replace")
            position += length
    except ValueError:  # no space, a length that is not a number or does not fit, a key not UTF-8
        raise ShardDamaged("the stream holds a pax header that is not valid") from None
    return records


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files in a tar stream, in order."""
    for name, data, _, _ in _members_at(stream):
        yield name, data


def _members_at(stream: BinaryIO) -> Iterator[tuple[str, bytes, int, int]]:
    """(name, data, first byte, end byte) of the regular files in a tar stream; a member's bytes start
    at its first header block (pax or long-name records included) and end after its padding."""
    read = stream.read
    long_name: str | None = None
    pax: dict[str, str] = {}
    position = member_start = 0
    while True:
        header = read(BLOCK)
        if not header or header == _ZERO_BLOCK:
            return
        if len(header) < BLOCK:
            raise ShardDamaged(f"the stream ends inside a tar header ({len(header)} of {BLOCK} bytes)")
        try:
            checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
            size = int(pax["size"]) if "size" in pax else _number(header[124:136])
        except ValueError:
            checksum = size = -1
        if checksum != sum(header[:148]) + 256 + sum(header[156:]) or size < 0:
            raise ShardDamaged("the stream holds bytes that are not a valid tar header")
        kind = header[156:157]
        name = None
        if kind not in (b"x", b"g", b"L"):
            name = pax.get("path") or long_name
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
                if prefix:
                    name = f"{prefix.decode('utf-8', 'replace')}/{name}"
        padding = -size % BLOCK
        data = read(size + padding)
        if len(data) < size + padding:
            raise ShardDamaged(f"the stream ends inside a tar member ({len(data)} of {size} bytes)", name)
        position += BLOCK + size + padding
        data = data[:size]
        if name is not None and kind in _REGULAR:
            try:
                check_member_name(name)
            except UnsafeInput as unsafe:  # not written by `sagan prepare`: the rest is not trusted either
                raise ShardDamaged(str(unsafe), name) from None
        if kind == b"x":
            pax = _pax_records(data)
        elif kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == b"g":
            member_start = position
        else:
            long_name, pax = None, {}
            if kind in _REGULAR:
                yield name, data, member_start, position
            member_start = position


def samples(stream: BinaryIO) -> Iterator[dict[str, bytes]]:
    """WebDataset samples (files by lower-case extension) of a tar stream, in order.

    When the stream is damaged inside a member of the next sample, the sample before it is complete
    and is still yielded before the damage is raised."""
    key, files = None, {}
    try:
        for name, data in tar_members(stream):
            stem, ext = base_plus_ext(name)
            if stem is None or name.startswith("__"):
                continue
            if stem != key:
                if key is not None:
                    yield files
                key, files = stem, {}
            files[ext.lower()] = data
    except ShardDamaged as damage:
        if key is not None and damage.member is not None and base_plus_ext(damage.member)[0] != key:
            yield files
        raise
    if key is not None:
        yield files


def index(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Where each sample of a whole shard lies: ``offsets`` (n + 1 byte positions; sample i is
    ``data[offsets[i]:offsets[i + 1]]``, its tar members with their headers, and whatever non-sample
    members follow it) and the CRC-32 of each sample's bytes. A damaged shard raises ShardDamaged."""
    starts: list[int] = []
    end, key = 0, None
    for name, _, start, stop in _members_at(io.BytesIO(data)):
        stem, _ = base_plus_ext(name)
        if stem is None or name.startswith("__"):
            continue
        if stem != key:
            starts.append(start)
            key = stem
        end = stop
    offsets = np.array([*starts, end], dtype=np.int64)
    view = memoryview(data)
    crc = np.array([zlib.crc32(view[a:b]) for a, b in itertools.pairwise(offsets.tolist())], dtype=np.int64)
    return offsets, crc


def sample_of(data: bytes) -> dict[str, bytes]:
    """The one sample held by ``data``, the bytes of one ``index`` entry; damage raises ShardDamaged."""
    found = list(samples(io.BytesIO(data)))
    if len(found) != 1:
        raise ShardDamaged(f"{len(found)} samples where the index has one")
    return found[0]


class Checksummed:
    """A reader that counts and hashes what is read through it, to check a shard against its manifest."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.digest, self.count = stream, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.count += len(data)
        return data

    def matches(self, num_bytes: int, sha256: str) -> bool | None:
        """Whether the whole shard has ``num_bytes`` and ``sha256``, reading what is left when that is at
        most ``VERIFY_TAIL_BYTES``; None when more is left unread (the check would cost a read)."""
        if num_bytes - self.count > VERIFY_TAIL_BYTES:
            return None
        while self.count <= num_bytes and self.read(1 << 16):
            pass
        return self.count == num_bytes and self.digest.hexdigest() == sha256
