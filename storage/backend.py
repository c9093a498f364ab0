"""The backend contract: a flat namespace of immutable objects addressed by '/'-separated keys.

Semantics every backend must give (and `tests/test_backend_contract.py` checks):
- `put(key, data)` is atomic (and `put_parts(key, parts)`, the same for pieces to join): a
  reader sees the whole new object or none of it; on return the object is durable (fsync'd, or
  acknowledged by the object store).
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
    # bytes a ranged read should fetch at least where it can: a request to an object store costs
    # a round trip and the server's work per request (moto, the tests' S3 server, reads the
    # whole object for every ranged GET), a read of a local file next to nothing
    min_request: int = 0

    @abc.abstractmethod
    def put(self, key: str, data: bytes | memoryview) -> None: ...

    def put_parts(self, key: str, parts) -> None:
        """`put` of the pieces `parts` joined, in order, with put's guarantees. A backend that
        can write the pieces without joining them first overrides it (a pack is 32 MiB: the
        join is a copy of every byte a backup stores)."""
        self.put(key, b"".join(parts))

    def put_stream(self, key: str) -> "PutStream":
        """A put whose pieces come over time: `write` them in order, then `commit` (the object
        appears whole, with put's guarantees: nothing of it is seen before) or `abort`. A
        backend that can write the pieces as they come overrides it (the directory backend
        writes a pack while its blocks are still being compressed, so that only its tail is
        left to write when the last block is in); this one gathers them for one put_parts."""
        return PutStream(self, key)

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

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Size of every object under prefix (backends with listings that carry sizes override)."""
        return {k: self.size(k) for k in self.list(prefix)}

    def stat_all(self, prefix: str = "") -> dict[str, tuple[int, float]]:
        """(size, modification time as epoch seconds) of every object under prefix, from one
        listing where the backend can: garbage collection ages packs by it."""
        raise NotImplementedError

    def local_path(self, key: str) -> str | None:
        """A filesystem path for `key` when the backend is a directory, else None."""
        return None

    def hasty(self) -> "Backend":
        """This store for clean-up that may fail without harm (removing a lock or a VM claim
        at the end of a run): a backend that retries little and waits little, where the
        backend's own retries are long. A lock it fails to remove is broken as stale later
        (storage/locks.py), so a store that died under a run does not also hold up its end
        with minutes of retries."""
        return self


class PutStream:
    """Backend.put_stream's put: the pieces are kept until `commit` puts them joined."""

    def __init__(self, backend: Backend, key: str):
        self.backend, self.key = backend, key
        self.parts: list = []

    def write(self, parts) -> None:
        self.parts.extend(parts)

    def commit(self) -> None:
        parts, self.parts = self.parts, []
        self.backend.put_parts(self.key, parts)

    def abort(self) -> None:
        self.parts = []


def store_spec(url: str, endpoint: str | None = None, profile: str | None = None):
    """What names a store, picklable and free of secrets: a path, or a dict for S3 with its
    endpoint and AWS profile. Pipelines pass it along unopened."""
    if url.startswith("s3://"):
        return {"url": url, "endpoint": endpoint, "profile": profile}
    if "://" not in url:  # absolute here: tasks on Ray workers do not share our working folder
        import os

        return os.path.abspath(url)
    return url


def open_backend(spec) -> Backend:
    """The backend for a store spec: a directory path (or file://...), or s3://bucket/prefix."""
    from .errors import InvalidValue

    if isinstance(spec, dict):
        url, endpoint, profile = spec["url"], spec.get("endpoint"), spec.get("profile")
    else:
        url, endpoint, profile = spec, None, None
    if url.startswith("s3://"):
        from .s3 import S3Backend

        return S3Backend(url, endpoint=endpoint, profile=profile)
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        raise InvalidValue(f"store URL scheme of {url!r} is not supported: give a directory path or s3://BUCKET/PREFIX")
    from .local import DirectoryBackend

    return DirectoryBackend(url)
