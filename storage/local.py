"""The directory backend (an ADS on local disk, NFS or SMB).

Atomic put: write to a temporary file in the same folder, fsync it, rename it over the key,
fsync the folder. A crash leaves at most a `.tmp-*` file, which nothing reads. Objects of
DIRECT_MIN bytes and more (packs) are written with direct I/O where the file system allows it.
"""
from __future__ import annotations

import errno
import os
import uuid

import numpy as np
from typing import Iterator

from . import dio
from .backend import Backend, PutStream
from .errors import ObjectMissing, StoreError, StoreFull

DIRECT_MIN = 1 << 20
STREAM_CHUNK = 4 << 20  # a streamed put writes in pieces of this size (direct I/O: aligned)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store_error(path: str, root: str, e: OSError):
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(root)
    return StoreError(f"cannot write {path}: {e.strerror}")


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
            raise _store_error(path, self.root, e) from None

    def put_stream(self, key: str) -> "_FileStream":
        return _FileStream(self, key)

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


class _FileStream(PutStream):
    """A put to a temporary file in the key's folder, written as the pieces come: whole
    STREAM_CHUNK pieces with direct I/O from an aligned buffer (buffered where the file system
    refuses it), the tail at `commit`, which then fsyncs, renames over the key and fsyncs the
    folder, as `put` does. A stream aborted, or left by a crash, leaves at most the `.tmp-*`
    file (removed on abort; gc removes what a crash left)."""

    def __init__(self, backend: DirectoryBackend, key: str):
        super().__init__(backend, key)
        self.path = backend._path(key)
        self.folder = os.path.dirname(self.path)
        self.tmp = os.path.join(self.folder, f".tmp-{uuid.uuid4().hex}")
        self.fd = self.dfd = None
        self.buf = None
        self.fill = self.at = 0

    def _open(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.dfd = dio.open_direct(self.tmp, os.O_WRONLY)
        if self.dfd is not None:
            self.buf = dio.WRITE_BUFFERS.take(STREAM_CHUNK)

    def _fail(self, e: OSError):
        self.abort()
        return _store_error(self.path, self.backend.root, e)

    def write(self, parts) -> None:
        try:
            if self.fd is None:
                self._open()
            for p in parts:
                v = memoryview(p).cast("B")
                if self.buf is None:
                    while v:
                        v = v[os.write(self.fd, v):]
                    continue
                while v:
                    n = min(len(v), STREAM_CHUNK - self.fill)
                    self.buf[self.fill:self.fill + n] = np.frombuffer(v[:n], dtype=np.uint8)
                    self.fill += n
                    v = v[n:]
                    if self.fill == STREAM_CHUNK:
                        self._out(STREAM_CHUNK)
        except OSError as e:
            raise self._fail(e) from None

    def _out(self, m: int) -> None:
        """Write the buffer's first m bytes (a multiple of dio.ALIGN) at the file's end."""
        done = dio.pwrite_all(self.dfd, self.buf[:m], self.at)
        if done < m:  # the device refused an aligned write after all: the rest goes buffered
            self._buffered_from(done, m)
        self.at += m
        self.fill = 0

    def _buffered_from(self, done: int, m: int) -> None:
        view = memoryview(self.buf[done:m]).cast("B")
        off = self.at + done
        while view:
            w = os.pwrite(self.fd, view, off)
            view, off = view[w:], off + w

    def commit(self) -> None:
        try:
            if self.fd is None:
                self._open()
            if self.buf is not None and self.fill:
                n = self.fill
                m = dio.round_up(n)
                self.buf[n:m] = 0
                self._out(m)
                os.ftruncate(self.fd, self.at - m + n)
            os.fsync(self.fd)
            self._close()
            os.rename(self.tmp, self.path)
            _fsync_dir(self.folder)
        except OSError as e:
            raise self._fail(e) from None

    def _close(self) -> None:
        for fd in (self.dfd, self.fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.dfd = None
        if self.buf is not None:
            dio.WRITE_BUFFERS.give(self.buf)
            self.buf = None

    def abort(self) -> None:
        self._close()
        try:
            os.unlink(self.tmp)
        except OSError:
            pass
