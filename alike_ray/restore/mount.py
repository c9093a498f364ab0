"""`alike mount`: a read-only FUSE filesystem over a store (ADS or ODS), with mfusepy (ctypes
bindings for libfuse 2 and 3, maintained; no compiled module of our own).

    MOUNTPOINT/<vm>/<version>/<disk>.raw    every disk of every version, at its full size

Reads fetch the blocks they touch on demand (ranged reads on S3), decode and re-hash them
(damaged data is an I/O error, never wrong bytes), and keep the latest in an LRU cache; zero
blocks cost nothing. The listing is re-read at most every few seconds, so versions committed
while mounted appear. Unmounting (`umount MOUNTPOINT`, or Ctrl-C) ends the process and leaves
nothing behind.
"""
from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import OrderedDict

import numpy as np

from pipelines.index import LocalIndex
from storage.errors import StoreError
from storage import patch
from storage.index import h32
from storage.store import Store

DIR_MODE = stat.S_IFDIR | 0o555
FILE_MODE = stat.S_IFREG | 0o444


class MountError(StoreError):
    """{detail}"""


class StoreView:
    """The store as a tree of VMs, versions and disks, with on-demand block reads."""

    def __init__(self, spec, cache_bytes: int = 256 << 20, refresh: float = 5.0):
        self.spec = spec
        self.store = Store.open(spec)
        self.bs = self.store.block_size
        self.refresh = refresh
        self.lock = threading.RLock()
        self._tree_at = 0.0
        self._tree: dict[str, dict[str, dict]] = {}
        self._manifests: dict[tuple, tuple] = {}
        self._index = None
        self._index_at = 0.0
        self.cache: OrderedDict = OrderedDict()
        self.cache_max = max(1, cache_bytes // self.bs)

    def tree(self) -> dict:
        with self.lock:
            if time.monotonic() - self._tree_at > self.refresh:
                tree: dict = {}
                for vm, v in self.store.list_versions():
                    tree.setdefault(vm, {})[v] = None
                for vm, vs in tree.items():
                    for v in vs:
                        old = self._tree.get(vm, {}).get(v)
                        vs[v] = old if old is not None else self._disks(vm, v)
                self._tree, self._tree_at = tree, time.monotonic()
            return self._tree

    def _disks(self, vm: str, v: str) -> dict:
        meta = self.store.read_version(vm, v)
        out = {}
        for n, d in enumerate(meta["disks"]):
            name = os.path.splitext(d["name"])[0] + ".raw"
            if name in out:
                name = f"{n}-{name}"
            out[name] = {"size": int(d["size"]), "manifest": d["manifest"], "mtime": _mtime(meta)}
            if "manifest_blake3" in d:  # the manifest's check (format 2): read_manifest verifies it
                out[name]["manifest_blake3"] = d["manifest_blake3"]
        return out

    def index(self):
        with self.lock:
            if self._index is None or time.monotonic() - self._index_at > self.refresh:
                self._index, self._index_at = LocalIndex(self.spec), time.monotonic()
            return self._index

    def manifest(self, vm: str, v: str, disk: dict):
        key = (vm, v, disk["manifest"])
        with self.lock:
            m = self._manifests.get(key)
            if m is None:
                m = self._manifests[key] = self.store.read_manifest(vm, v, disk)
            return m

    def block(self, vm: str, v: str, disk: dict, n: int) -> bytes | None:
        """Block n of a disk, or None for a zero block."""
        m = self.manifest(vm, v, disk)
        i = int(np.searchsorted(m.blocks, n))
        if i >= len(m.blocks) or int(m.blocks[i]) != n:
            return None
        if m.deltas[i] != b"":  # a patched block: its base with its delta over it
            h = h32(m.hashes[i])
            with self.lock:
                data = self.cache.get(h)
            if data is None:
                data = patch.apply(self.blob(h32(m.bases[i])), self.blob(h32(m.deltas[i])), f"of block {n}")
                self._keep(h, data)
            return data
        return self.blob(h32(m.hashes[i]))

    def _keep(self, h: bytes, data: bytes) -> None:
        with self.lock:
            self.cache[h] = data
            while len(self.cache) > self.cache_max:
                self.cache.popitem(last=False)

    def blob(self, h: bytes) -> bytes:
        """A stored blob by its hash, decoded and checked (cached)."""
        with self.lock:
            data = self.cache.get(h)
            if data is not None:
                self.cache.move_to_end(h)
                return data
        found, packs, off, ln, _ = self.index().locate(np.array([h], dtype="S32"))
        if not found[0]:
            raise OSError(errno.EIO, "block not in the index")
        stored = self.store.read_stored(packs[0], int(off[0]), int(ln[0]))
        data = self.store.codec.decode(stored, h, where=f"in pack {packs[0]}")
        self._keep(h, data)
        return data

    def read(self, vm: str, v: str, disk: dict, offset: int, size: int) -> bytes:
        size = max(0, min(size, disk["size"] - offset))
        out = bytearray(size)
        pos = offset
        while pos < offset + size:
            n = pos // self.bs
            within = pos - n * self.bs
            take = min(self.bs - within, offset + size - pos)
            data = self.block(vm, v, disk, n)
            if data is not None:
                piece = data[within:within + take]
                out[pos - offset:pos - offset + len(piece)] = piece
            pos += take
        return bytes(out)


def _mtime(meta: dict) -> float:
    try:
        return time.mktime(time.strptime(meta["created"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    except Exception:
        return time.time()


def make_operations(view: StoreView):
    import mfusepy as fuse

    class AlikeFS(fuse.Operations):
        use_ns = False

        def _parts(self, path):
            parts = [p for p in path.split("/") if p]
            tree = view.tree()
            if len(parts) >= 1 and parts[0] not in tree:
                raise fuse.FuseOSError(errno.ENOENT)
            if len(parts) >= 2 and parts[1] not in tree[parts[0]]:
                raise fuse.FuseOSError(errno.ENOENT)
            if len(parts) == 3 and parts[2] not in tree[parts[0]][parts[1]]:
                raise fuse.FuseOSError(errno.ENOENT)
            if len(parts) > 3:
                raise fuse.FuseOSError(errno.ENOENT)
            return parts, tree

        def getattr(self, path, fh=None):
            parts, tree = self._parts(path)
            now = time.time()
            if len(parts) < 3:
                return {"st_mode": DIR_MODE, "st_nlink": 2, "st_size": 0, "st_mtime": now, "st_atime": now,
                        "st_ctime": now}
            d = tree[parts[0]][parts[1]][parts[2]]
            return {"st_mode": FILE_MODE, "st_nlink": 1, "st_size": d["size"], "st_mtime": d["mtime"],
                    "st_atime": d["mtime"], "st_ctime": d["mtime"], "st_blocks": (d["size"] + 511) // 512}

        def readdir(self, path, fh):
            parts, tree = self._parts(path)
            node = tree
            for p in parts:
                node = node[p]
            return [".", ".."] + sorted(node)

        def open(self, path, flags):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC):
                raise fuse.FuseOSError(errno.EROFS)
            parts, _ = self._parts(path)
            if len(parts) != 3:
                raise fuse.FuseOSError(errno.EISDIR)
            return 0

        def read(self, path, size, offset, fh):
            parts, tree = self._parts(path)
            try:
                return view.read(parts[0], parts[1], tree[parts[0]][parts[1]][parts[2]], offset, size)
            except OSError as e:
                raise fuse.FuseOSError(e.errno or errno.EIO)
            except StoreError:
                raise fuse.FuseOSError(errno.EIO)  # damaged data is an error, never wrong bytes

        def statfs(self, path):
            return {"f_bsize": view.bs, "f_frsize": view.bs, "f_blocks": 0, "f_bfree": 0, "f_bavail": 0,
                    "f_namemax": 255}

    return AlikeFS()


def mount(spec, mountpoint: str, foreground: bool = True, allow_other: bool = False) -> None:
    try:
        import mfusepy as fuse
    except (ImportError, OSError, EnvironmentError) as e:
        raise MountError(f"FUSE is not available here ({e}): install the fuse3 package") from None
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not a folder: create it first")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mountpoint (in use): unmount it or choose another folder")
    if os.listdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not empty: choose an empty folder")
    view = StoreView(spec)
    view.tree()  # fail now on a bad store, not at the first ls
    kwargs = {"foreground": foreground, "ro": True, "nothreads": False, "fsname": "alike"}
    if allow_other:
        kwargs["allow_other"] = True
    try:
        fuse.FUSE(make_operations(view), mountpoint, **kwargs)
    except RuntimeError as e:
        raise MountError(f"cannot mount {mountpoint}: {e} (is /dev/fuse there, are you root or in group fuse?)") from None
