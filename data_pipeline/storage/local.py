"""``LocalStore``: a ``Store`` on a local folder; writes are atomic (a temporary file, then a rename)."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from data_pipeline.errors import DataError, ObjectNotFound
from data_pipeline.storage.base import READ_BUFFER_BYTES, Store


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser()
        self.url = str(root)

    def _path(self, name: str) -> Path:
        return self.root / name

    def read_bytes(self, name: str) -> bytes:
        with self.open_read(name) as stream:
            return stream.read()

    def open_read(self, name: str) -> BinaryIO:
        path = self._path(name)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"{path} does not exist") from None
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None

    def read_range(self, name: str, start: int, end: int) -> tuple[bytes, int]:
        with self.open_read(name) as stream:
            try:
                size = os.fstat(stream.fileno()).st_size
                stream.seek(start)
                return stream.read(max(0, end - start)), size
            except OSError as exc:
                raise DataError(f"cannot read {self._path(name)}: {exc.strerror or exc}") from None

    def _atomic_write(self, name: str, fill: Callable[[BinaryIO], None]) -> None:
        path = self._path(name)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666
            )  # honours the umask, unlike mkstemp
        except OSError as exc:
            raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "wb") as out:
                fill(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_bytes(self, name: str, data: bytes) -> None:
        self._atomic_write(name, lambda out: out.write(data))

    def upload_file(self, name: str, path: str | os.PathLike[str]) -> None:
        def copy(out: BinaryIO) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, out, READ_BUFFER_BYTES)

        self._atomic_write(name, copy)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        names = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(n for n in names if n.startswith(prefix))

    def delete(self, names: Iterable[str]) -> None:
        for name in names:
            self._path(name).unlink(missing_ok=True)
