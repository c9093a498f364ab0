"""Direct I/O (O_DIRECT): one place for its rules, shared by the image source's reads, the
restore's writes and the directory backend's pack writes.

Why: a buffered write copies every byte into freshly allocated page-cache pages, and on a
virtual machine whose host hands out memory lazily that first touch costs more than the
compression that made the bytes (measured in issue 15: 4 of a first backup's 38 CPU seconds
were spent in that copy). Direct I/O moves the bytes between the device and the process's own
buffer, which stays allocated from task to task.

The rules: the buffer address, the file offset and the length are multiples of ALIGN. Where a
file system refuses O_DIRECT (tmpfs, some FUSE file systems) the callers fall back to buffered
I/O; $ALIKE_DIRECT_IO=0 turns direct I/O off everywhere.
"""
from __future__ import annotations

import errno
import os
import threading

import numpy as np

ALIGN = 4096  # what O_DIRECT asks of buffer addresses, offsets and lengths (any device's sector)


def enabled() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("ALIKE_DIRECT_IO", "1") != "0"


def address(buf) -> int:
    """The address of a buffer's first byte (0 for an empty one)."""
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if len(buf) else 0


def aligned(buf) -> bool:
    """Whether `buf` can be read into or written from with direct I/O as it is."""
    return not len(buf) % ALIGN and not address(buf) % ALIGN


def round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def allocate(n: int) -> np.ndarray:
    """A new buffer of n bytes whose first byte sits at an ALIGN boundary."""
    raw = np.empty(n + ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip:skip + n]


def open_direct(path: str, flags: int, mode: int = 0o644):
    """A descriptor opened with O_DIRECT, or None where that is off or refused."""
    if not enabled():
        return None
    try:
        return os.open(path, flags | os.O_DIRECT, mode)
    except OSError:
        return None


class BufferPool:
    """Aligned buffers lent to one caller at a time and kept afterwards (a fresh buffer costs a
    page fault per 4 KiB on every use). At most `keep` idle buffers stay; threads that write at
    once each get their own."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.lock = threading.Lock()
        self.idle: list[np.ndarray] = []

    def take(self, n: int) -> np.ndarray:
        with self.lock:
            fits = [i for i, b in enumerate(self.idle) if len(b) >= n]
            if fits:
                return self.idle.pop(min(fits, key=lambda i: len(self.idle[i])))
        return allocate(round_up(max(n, 1)))

    def give(self, buf: np.ndarray) -> None:
        with self.lock:
            self.idle.append(buf)
            if len(self.idle) > self.keep:
                self.idle.pop(min(range(len(self.idle)), key=lambda i: len(self.idle[i])))


WRITE_BUFFERS = BufferPool()


def pwrite_all(fd: int, view, off: int) -> int:
    """Write all of `view` at `off` of the O_DIRECT descriptor `fd`, again after a short write.
    -> the bytes written: all of them, or fewer where the device refused an aligned write
    (EINVAL: alignment rules of its own; the caller writes the rest buffered). A write of
    nothing is a full device; other errors are raised."""
    view = memoryview(view).cast("B")
    done = 0
    while done < len(view):
        try:
            w = os.pwrite(fd, view[done:], off + done)
        except OSError as err:
            if err.errno == errno.EINVAL:
                return done
            raise
        if w <= 0:
            raise OSError(errno.ENOSPC, "short write")
        done += w
    return done


def write_file(fd: int, path: str, data) -> bool:
    """Write `data` (a buffer, or a list of buffers to write one after another) at the start of
    the new, empty file `fd` (opened at `path`) with direct I/O: through an aligned buffer, its
    tail padded with zeros and cut off again by ftruncate. -> False (nothing written) where
    direct I/O is off or the file system refuses it: the caller writes buffered."""
    views = [memoryview(v).cast("B") for v in data] if isinstance(data, (list, tuple)) else [memoryview(data).cast("B")]
    n = sum(len(v) for v in views)
    dfd = open_direct(path, os.O_WRONLY)
    if dfd is None:
        return False
    m = round_up(n)
    buf = WRITE_BUFFERS.take(m)
    try:
        at = 0
        for v in views:
            buf[at:at + len(v)] = np.frombuffer(v, dtype=np.uint8)
            at += len(v)
        buf[n:m] = 0
        done = pwrite_all(dfd, buf[:m], 0)
        if done < m:
            if done == 0:
                return False
            raise OSError(errno.EINVAL, f"direct write refused after {done} bytes")
        if m != n:
            os.ftruncate(fd, n)
        return True
    finally:
        os.close(dfd)
        WRITE_BUFFERS.give(buf)
