"""`image:` source: raw or qcow2 image files and block devices, one VM per spec.

`image:/a/web.raw` is a VM with one disk; `image:/a/d0.qcow2,/a/d1.raw` one with two.
Whitespace awareness: raw files are mapped with SEEK_DATA/SEEK_HOLE, qcow2 files with
`qemu-img map`, so holes and unallocated or zero clusters are never read.
Reads bypass the page cache (O_DIRECT) where the file system allows it and the pieces are
aligned: a backup neither evicts the host's cache nor pays the kernel's copy through it (a
third of the CPU of a cold buffered read). $ALIKE_DIRECT_IO=0 turns it off. A plain qcow2 (no
backing file, no compressed clusters) is read in place at the host offsets of its clusters; any
other qcow2 is first converted to a temporary sparse raw file, which `release()` removes.

A raw image whose partition table (MBR or GPT) says the disk is larger than the file is an
image cut short (an interrupted copy or download): it is listed and backed up as the file
is, with a note (VMInfo.notes) that the backup records and shows as a warning.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import threading

import numpy as np

from storage import dio

from .base import Disk, Snapshot, Source, SourceError, VMInfo, VMNotFound


def _qemu_img(*args) -> str:
    if not shutil.which("qemu-img"):
        raise SourceError("qemu-img is not installed: install the qemu-utils package to read qcow2 images")
    p = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if p.returncode:
        raise SourceError(f"qemu-img {args[0]} failed on {args[-1]}: {p.stderr.strip()}")
    return p.stdout


def _raw_extents(fd: int, size: int) -> list[tuple[int, int]]:
    out = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, min(end, size) - start))
            pos = end
    except OSError:  # filesystem without SEEK_DATA: everything may hold data
        return [(0, size)] if size else []
    return out


class MappedDisk(Disk):
    """A disk whose guest bytes live in one host file, by a mapping of extents. Reads are
    positional (pread) on descriptors opened once: threads may read at once, and a disk answers
    faster with more than one read in flight (measured: one stream of O_DIRECT reads gets a third
    of what four get)."""

    parallel_reads = 2

    def __init__(self, name: str, path: str, size: int, extents: list[tuple[int, int, int]],
                 node_id: str | None):
        self.name = name
        self.path = path
        self.size = size
        self.node_id = node_id
        m = np.array(extents, dtype=np.int64).reshape(-1, 3)  # guest offset, length, host offset
        self._guest, self._len, self._host = m[:, 0].copy(), m[:, 1].copy(), m[:, 2].copy()
        self._fd = None
        self._dio = None  # O_DIRECT descriptor: None = not tried yet, False = not possible here
        self._refused = None  # an O_DIRECT descriptor the file system refused reads on (closed with the disk)
        self._lock = threading.Lock()  # reader threads share the descriptors: opened once

    def __getstate__(self):
        s = dict(self.__dict__)
        s["_fd"] = s["_dio"] = s["_refused"] = None  # descriptors are this process's own
        del s["_lock"]
        return s

    def __setstate__(self, s):
        self.__dict__.update(s)
        self._lock = threading.Lock()

    def __del__(self):
        for fd in (getattr(self, "_fd", None), getattr(self, "_dio", None), getattr(self, "_refused", None)):
            # (getattr: __init__ may have failed before setting them)
            if type(fd) is int:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _direct(self):
        """The O_DIRECT descriptor, or False (not supported by the file system, or turned off)."""
        if self._dio is None:
            with self._lock:
                if self._dio is None:
                    fd = dio.open_direct(self.path, os.O_RDONLY)  # tmpfs and some FUSE file systems refuse it
                    self._dio = fd if fd is not None else False
        return self._dio

    def _pread(self, fd, mv, at: int) -> int:
        """Read len(mv) bytes at host offset `at`: directly when aligned, else buffered."""
        dfd = self._direct() if self._dio is not False else False
        if dfd is not False and not at % dio.ALIGN and dio.aligned(mv):
            try:
                n = os.preadv(dfd, [mv], at)
                if n == len(mv):
                    return n
                return n + os.preadv(fd, [mv[n:]], at + n)  # the end of the file: buffered
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                # a device or file system with other alignment rules: buffered from now on. The
                # descriptor stays open until the disk goes (another thread may be reading on it;
                # closed now, its number could be reused by an open of another file)
                with self._lock:
                    if self._dio is not False:
                        self._refused, self._dio = self._dio, False
        return os.preadv(fd, [mv], at)

    def allocated_extents(self):
        return list(zip(self._guest.tolist(), self._len.tolist()))

    def _open(self):
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    try:
                        self._fd = os.open(self.path, os.O_RDONLY)
                    except OSError as e:
                        raise SourceError(f"cannot open {self.path}: {e.strerror}") from None
        return self._fd

    def read_into(self, buf: np.ndarray, offset: int) -> int:
        """Fill `buf` with guest bytes from `offset` (zeros between extents); return how many
        bytes were read from disk."""
        fd = self._open()
        length = len(buf)
        end = offset + length
        i = max(0, int(np.searchsorted(self._guest, offset, side="right")) - 1)
        done = 0
        pos = offset  # everything before it is filled
        mv = memoryview(buf)
        while i < len(self._guest) and self._guest[i] < end:
            g, ln, h = int(self._guest[i]), int(self._len[i]), int(self._host[i])
            s, e = max(g, offset), min(g + ln, end)
            if s < e:
                if s > pos:
                    buf[pos - offset:s - offset] = 0
                try:
                    n = self._pread(fd, mv[s - offset:e - offset], h + (s - g))
                except OSError as err:  # EIO of a failing disk...: the source is unreadable (exit 5)
                    raise SourceError(f"cannot read {self.path} at offset {h + (s - g)}: {err.strerror or err}") from None
                if n != e - s:
                    raise SourceError(f"{self.path} ended early (read {n} of {e - s} bytes at {s}): was it truncated?")
                done += n
                pos = e
            i += 1
        if pos < end:
            buf[pos - offset:] = 0
        return done

    def prefetch(self, offset: int, length: int) -> None:
        """Ask the kernel to start reading a range now (POSIX_FADV_WILLNEED), so that the
        disk works while the caller hashes and compresses what came before. Not with direct
        reads: they would not use what the kernel read ahead."""
        fd = self._open()
        if self._direct() is not False:
            return
        end = offset + length
        i = max(0, int(np.searchsorted(self._guest, offset, side="right")) - 1)
        while i < len(self._guest) and self._guest[i] < end:
            g, ln, h = int(self._guest[i]), int(self._len[i]), int(self._host[i])
            s, e = max(g, offset), min(g + ln, end)
            if s < e:
                os.posix_fadvise(fd, h + (s - g), e - s, os.POSIX_FADV_WILLNEED)
            i += 1

    def read(self, offset: int, length: int) -> np.ndarray:
        buf = np.zeros(length, dtype=np.uint8)
        self.read_into(buf, offset)
        return buf


class ImageSnapshot(Snapshot):
    """Images are not frozen (nothing may write them during a backup); what a snapshot makes
    is the temporary raw files of converted qcow2 images."""

    def __init__(self, vm: VMInfo, disks, tmpdirs):
        self.vm = vm
        self.disks = disks
        self._tmpdirs = tmpdirs

    def release(self, failed: bool = False) -> None:
        for d in self._tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
        self._tmpdirs = []


def _partition_table_ends(head: bytes) -> list[tuple[int, str]]:
    """Where the MBR or GPT partition table in `head` (the first bytes of a disk) says its
    partitions (and GPT's backup header) end -> [(byte offset, what ends there)]."""
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        return []
    ends, gpt = [], False
    for i in range(4):
        e = head[446 + 16 * i:462 + 16 * i]
        start, count = struct.unpack("<II", e[8:16])
        if e[4] == 0xEE:
            gpt = True
        elif e[4] and count:
            ends.append(((start + count) * 512, f"partition {i + 1}"))
    for sector in (512, 4096) if gpt else ():
        h = head[sector:sector + 92]
        if h[:8] != b"EFI PART":
            continue
        (alternate,) = struct.unpack("<Q", h[32:40])
        lba, n, esz = struct.unpack("<QII", h[72:88])
        table = head[lba * sector:lba * sector + n * esz] if esz >= 128 else b""
        for k in range(len(table) // esz if esz else 0):
            ent = table[k * esz:k * esz + 48]
            if ent[:16] != bytes(16):
                (last,) = struct.unpack("<Q", ent[40:48])
                ends.append(((last + 1) * sector, f"partition {k + 1}"))
        ends.append(((alternate + 1) * sector, "the GPT backup header"))
        break
    return ends


def _cut_short(path: str, size: int) -> str | None:
    """A note when the partition table of raw image `path` claims more than its `size`."""
    try:
        with open(path, "rb") as f:
            past = [e for e in _partition_table_ends(f.read(64 * 1024)) if e[0] > size]
    except OSError:
        return None
    if not past:
        return None
    from ..ui import _h

    # a partition that runs past the end says more to the user than GPT's backup header
    end, what = max((e for e in past if e[1].startswith("partition")), default=max(past))
    return (f"image {path} looks cut short: its partition table says {what} ends at {_h(end)} ({end} bytes), "
            f"but the file holds {_h(size)} ({size} bytes); the backup keeps only what the file holds "
            f"(was a copy or download interrupted?)")


class ImageSource(Source):
    def __init__(self, spec: str, name: str | None = None, shared: bool = False, node_id: str | None = None):
        # absolute here, in the command's process: read tasks run in Ray workers elsewhere
        self.paths = [os.path.abspath(p) for p in spec.split(",") if p]
        if not self.paths:
            raise SourceError("image: needs a path, for example image:/var/lib/images/web.raw")
        self.name = name or os.path.splitext(os.path.basename(self.paths[0]))[0]
        # A path readable on every node (NFS...) may be read anywhere; else pin reads here.
        self.node_id = None if shared else node_id
        self.local_node = node_id

    def _check(self, path: str) -> os.stat_result:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise SourceError(f"image {path} does not exist: check the path") from None
        except OSError as e:
            raise SourceError(f"cannot read image {path}: {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise SourceError(f"image {path} is a folder: give a disk image file or block device")
        if not os.access(path, os.R_OK):
            raise SourceError(f"cannot read image {path}: permission denied (run as a user who can read it)")
        return st

    def list_vms(self):
        disks, notes = [], []
        for p in self.paths:
            st = self._check(p)
            size = self._size(p, st)
            disks.append((os.path.basename(p), size))
            if not stat.S_ISBLK(st.st_mode) and self._format(p) == "raw":
                note = _cut_short(p, size)
                if note:
                    notes.append(note)
        return [VMInfo(self.name, ",".join(self.paths), disks, power_state="n/a", notes=notes)]

    def _size(self, path: str, st: os.stat_result) -> int:
        """The guest's size of the disk: a raw file's length, a device's, a qcow2's virtual size
        (from its header: big-endian u64 at byte 24)."""
        if stat.S_ISBLK(st.st_mode):
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
        with open(path, "rb") as f:
            head = f.read(32)
        if head[:4] == b"QFI\xfb" and len(head) == 32:
            return struct.unpack(">Q", head[24:32])[0]
        return st.st_size

    def _format(self, path: str) -> str:
        with open(path, "rb") as f:
            magic = f.read(4)
        return "qcow2" if magic == b"QFI\xfb" else "raw"

    def snapshot(self, vm: str | None = None) -> ImageSnapshot:
        info = self.list_vms()[0]
        if vm is not None and vm not in (info.name, info.id):
            raise VMNotFound(f"no VM named {vm!r} in image:{info.id}: its VM is {info.name!r} "
                             f"(see `alike inventory image:{info.id}`)")
        disks, tmpdirs = [], []
        try:
            for i, path in enumerate(self.paths):
                st = self._check(path)
                name = os.path.basename(path)
                if stat.S_ISBLK(st.st_mode):
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        size = os.lseek(fd, 0, os.SEEK_END)
                    finally:
                        os.close(fd)
                    disks.append(MappedDisk(name, path, size, [(0, size, 0)] if size else [], self.node_id))
                elif self._format(path) == "qcow2":
                    disks.append(self._qcow2(name, path, tmpdirs))
                else:
                    size = st.st_size
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        ext = _raw_extents(fd, size)
                    finally:
                        os.close(fd)
                    disks.append(MappedDisk(name, path, size, [(o, n, o) for o, n in ext], self.node_id))
        except BaseException:
            for d in tmpdirs:
                shutil.rmtree(d, ignore_errors=True)
            raise
        return ImageSnapshot(info, disks, tmpdirs)

    def _qcow2(self, name: str, path: str, tmpdirs: list) -> MappedDisk:
        info = json.loads(_qemu_img("info", "--output=json", path))
        size = int(info["virtual-size"])
        entries = json.loads(_qemu_img("map", "--output=json", path))
        data = [e for e in entries if e.get("data") and not e.get("zero")]
        direct = not info.get("backing-filename") and all(
            "offset" in e and not e.get("compressed") and e.get("depth", 0) == 0 for e in data)
        if direct:
            return MappedDisk(name, path, size, [(e["start"], e["length"], e["offset"]) for e in data], self.node_id)
        # Compressed clusters or a backing chain: let qemu-img resolve them into a sparse raw.
        tmp = tempfile.mkdtemp(prefix="alike-qcow2-")
        tmpdirs.append(tmp)
        raw = os.path.join(tmp, name + ".raw")
        _qemu_img("convert", "-O", "raw", path, raw)
        fd = os.open(raw, os.O_RDONLY)
        try:
            ext = _raw_extents(fd, size)
        finally:
            os.close(fd)
        # the temporary raw file exists on this node only
        return MappedDisk(name, raw, size, [(o, n, o) for o, n in ext], self.local_node)
