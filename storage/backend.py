"""The backend contract: a flat namespace of immutable objects addressed by '/'-separated keys.

Semantics every backend must give (and `tests/test_backend_contract.py` checks):
- `put(key, data)` is atomic: a reader sees the whole new object or none of it; on return the
  object is durable (fsync'd, or acknowledged by the object store).
- read-after-write: once `put` returns, `get`, `exists` and `list` see the object.
- `get_range(key, offset, length)` returns exactly `length` bytes or raises `ObjectMissing`.
- `list(prefix)` yields every key under `prefix` (a folder-like prefix ending in '/'), sorted.
- `delete` of a missing key is not an error.
- errors are `StoreError`s: ObjectMissing, StoreFull, never a bare OSError for expected cases.
"""
from __future__ import annotations

import abc
from typing import Iterator


class Backend(abc.ABC):
    url: str

    @abc.abstractmethod
    def put(self, key: str, data: bytes | memoryview) -> None: ...

    @abc.abstractmethod
    def get(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    def local_path(self, key: str) -> str | None:
        """A filesystem path for `key` when the backend is a directory, else None."""
        return None


def open_backend(url: str) -> Backend:
    """The backend for a store URL: a directory path (or file://) for now."""
    from .local import DirectoryBackend

    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        from .errors import InvalidValue

        raise InvalidValue(f"store URL scheme of {url!r} is not supported yet: give a directory path")
    return DirectoryBackend(url)
