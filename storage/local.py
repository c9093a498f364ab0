"""The directory backend (an ADS on local disk, NFS or SMB).

Atomic put: write to a temporary file in the same folder, fsync it, rename it over the key,
fsync the folder. A crash leaves at most a `.tmp-*` file, which nothing reads. Objects of
DIRECT_MIN bytes and more (packs) are written with direct I/O where the file system allows it.
"""
from __future__ import annotations

import errno
import os
import uuid
from typing import Iterator

from . import dio
from .backend import Backend
from .errors import ObjectMissing, StoreError, StoreFull

DIRECT_MIN = 1 << 20


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryBackend(Backend):
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = self.root

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad key {key!r}")
        return os.path.join(self.root, key)

    def local_path(self, key: str) -> str:
        return self._path(key)

    def put(self, key: str, data) -> None:
        self.put_parts(key, (data,))

    def put_parts(self, key: str, parts) -> None:
        path = self._path(key)
        folder = os.path.dirname(path)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                views = [memoryview(p).cast("B") for p in parts]
                # packs: from the pieces into one aligned buffer and from there to the disk (storage/dio.py)
                if not (sum(len(v) for v in views) >= DIRECT_MIN and dio.write_file(fd, tmp, views)):
                    for view in views:
                        while view:
                            n = os.write(fd, view)
                            view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            _fsync_dir(folder)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(self.root) from None
            raise StoreError(f"cannot write {path}: {e.strerror}") from None

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ObjectMissing(key) from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                data = os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise ObjectMissing(key) from None
        if len(data) != length:
            raise ObjectMissing(f"{key} (truncated: wanted {length} bytes at {offset})")
        return data

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def size(self, key: str) -> int:
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            raise ObjectMissing(key) from None

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            for name in filenames:
                if name.startswith(".tmp-"):
                    continue
                out.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return iter(sorted(out))

    def stat_all(self, prefix: str = "") -> dict[str, tuple[int, float]]:
        out = {}
        for key in self.list(prefix):
            try:
                st = os.stat(self._path(key))
            except FileNotFoundError:
                continue
            out[key] = (st.st_size, st.st_mtime)
        return out

    def temp_files(self, prefix: str = "") -> list[tuple[str, float]]:
        """Leftovers of puts cut short by a crash: (path, mtime)."""
        base = self._path(prefix) if prefix else self.root
        out = []
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                if name.startswith(".tmp-"):
                    path = os.path.join(dirpath, name)
                    try:
                        out.append((path, os.stat(path).st_mtime))
                    except FileNotFoundError:
                        pass
        return out

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
