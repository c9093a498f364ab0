"""File-level restore: list the partitions of a backed-up disk, browse the filesystems in them
and extract files and folders, without restoring the disk, without root (no mount, no loop
device, no FUSE) and without writing anything to the store.

The disk is read straight from the store, block by block on demand, through
`restore.mount.StoreView` (ADS or S3 stores; decoded blocks are re-hashed, so damaged data is an
error, never wrong bytes; an LRU cache keeps the blocks a filesystem walk touches again).

Libraries (a filesystem reader of our own would be a long road to a worse result):
- pytsk3, The Sleuth Kit's bindings (Apache-2.0 bindings, maintained by the log2timeline project,
  manylinux wheels): volume systems (MBR with extended/logical partitions, GPT) and ext2/3/4,
  FAT12/16/32, exFAT, NTFS, HFS+, ISO 9660, UFS. The disk is handed to it as a pytsk3.Img_Info
  subclass whose read() is StoreView.read.
- XFS: the TSK in pytsk3's wheel (4.15) is built without XFS (checked: a mkfs.xfs image gives
  "Cannot determine file system type", and no XFS symbol is in the module), so XFS goes to
  libfsxfs-python (pyfsxfs): libyal's XFS library, same maintainer family as pytsk3, LGPL-3.0,
  binary wheels, reads any Python file object (here a view of the partition over StoreView).
  Passed over: lklfuse (a FUSE mount again: /dev/fuse and root or group fuse, and not packaged
  for Debian), xfs_db (no recursive extraction, needs a file path), dissect.xfs (well kept,
  pure Python, but AGPL-3.0 for the whole project to carry).

What is kept on extraction: names, contents, sizes, modification times (to the nanosecond where
the filesystem has them; FAT has 2 seconds), permission bits where the filesystem has them
(ext*, XFS; FAT and NTFS have none, so files get the process's default), symlinks (ext*, XFS),
and owners when running as root. Entries are listed as the filesystem holds them: deleted
entries, TSK's virtual files ($MBR, $FAT1, $OrphanFiles...), NTFS's metadata files ($MFT...)
and FAT's volume label are left out.

Partitions are numbered as Linux numbers them (sda1...): GPT entry index + 1; MBR primary slot
+ 1, logical partitions from 5. A disk without a partition table is one partition, number 0.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import asdict, dataclass

from storage.errors import DamagedData, StoreError

CHUNK = 1 << 20
# what pytsk3 and pyfsxfs raise; pytsk3 wraps an exception of our read() in a RuntimeError
LIBRARY_ERRORS = (OSError, RuntimeError)


class FilesError(StoreError):
    """{detail}"""


class NoSuchPath(StoreError):
    """{detail}"""


class TargetExists(StoreError):
    """{detail} exists: choose another --to folder, or pass --force to overwrite it."""


class UnreadableFilesystem(StoreError):
    """{detail}"""


class DamagedFilesystem(StoreError):
    """{detail}"""

    exit_code = 3


@dataclass
class Partition:
    number: int  # as Linux numbers it; 0 = the whole disk (no partition table)
    start: int  # bytes
    size: int  # bytes
    scheme: str  # gpt, mbr, none
    description: str
    filesystem: str | None = None  # ext4, xfs, fat16, ntfs... None when none alike can read
    found: str | None = None  # what is there when it is no readable filesystem
    why: str | None = None  # and what the library said
    # bytes of it past the end of the disk: the table claims more than the disk holds (an image
    # cut short before its backup); what lay there was never backed up
    past_end: int = 0

    def cut_short(self, disk_size: int) -> str | None:
        if not self.past_end:
            return None
        where = "the whole disk" if self.number == 0 else f"partition {self.number}"
        return (f"{where} runs {_h(self.past_end)} past the end of the disk ({_h(disk_size)}): the disk image was "
                f"cut short before its backup, and files stored there cannot be read")


@dataclass
class Entry:
    path: str
    name: str
    kind: str  # file, dir, symlink, other
    size: int
    mtime_ns: int | None
    mode: int | None  # permission bits (07777) where the filesystem has them
    uid: int | None = None
    gid: int | None = None
    target: str | None = None  # a symlink's target
    readonly: bool | None = None  # the DOS read-only attribute (FAT, NTFS); None where modes are Unix

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mtime"] = None if self.mtime_ns is None else self.mtime_ns / 1e9
        d["mode"] = None if self.mode is None else f"{self.mode:04o}"
        d["permissions"] = self.permissions()
        return d

    def permissions(self) -> str:
        """`ls -l`'s rwx string: the mode bits where the filesystem has them; on FAT and NTFS,
        which have only a read-only attribute, what Linux's vfat and ntfs-3g mounts show with
        the usual umask 022 (folders rwxr-xr-x, files rw-r--r--; read-only: no w)."""
        if self.mode is not None:
            mode = self.mode
        elif self.kind == "dir":
            mode = 0o555 if self.readonly else 0o755
        else:
            mode = 0o444 if self.readonly else 0o644
        return "".join(("r" if mode >> s & 4 else "-") + ("w" if mode >> s & 2 else "-") + ("x" if mode >> s & 1 else "-")
                       for s in (6, 3, 0))


# -- the disk, read from the store ---------------------------------------------------------------
class Disk:
    """One disk of one version, read on demand. A failed read is remembered, so that when a
    library turns it into its own error we can still say what really went wrong."""

    def __init__(self, view, vm: str, version: str, number: int, info: dict, name: str = ""):
        self.view, self.vm, self.version, self.number, self.info = view, vm, version, number, info
        self.name = name  # as `alike mount` shows it
        self.size = int(info["size"])
        self.failure: BaseException | None = None

    @property
    def where(self) -> str:
        return f"{self.vm}@{self.version} disk {self.number}"

    def read(self, offset: int, size: int) -> bytes:
        try:
            return self.view.read(self.vm, self.version, self.info, offset, size)
        except BaseException as e:
            self.failure = self.failure or e
            raise

    def store_failure(self) -> StoreError | None:
        """The store-side error behind a library failure, as a StoreError, or None."""
        e = self.failure
        if e is None:
            return None
        if isinstance(e, StoreError):
            return e
        return DamagedData(f"{self.where}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")


class _PartFile:
    """A partition as a read-only, seekable file object (for pyfsxfs)."""

    def __init__(self, disk: Disk, start: int, size: int):
        self.disk, self.start, self.size, self.pos = disk, start, size, 0

    def read(self, size: int = -1) -> bytes:
        size = self.size - self.pos if size is None or size < 0 else min(size, self.size - self.pos)
        if size <= 0:
            return b""
        data = self.disk.read(self.start + self.pos, size)
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def get_size(self) -> int:
        return self.size

    def close(self) -> None:
        pass


def _tsk():
    try:
        import pytsk3
    except ImportError as e:
        raise FilesError(f"file-level restore needs pytsk3 ({e}): pip install pytsk3") from None
    return pytsk3


def _image(disk: Disk):
    pytsk3 = _tsk()

    class StoreImage(pytsk3.Img_Info):
        def __init__(self):
            super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

        def close(self):
            pass

        def read(self, offset, size):
            return disk.read(offset, size)

        def get_size(self):
            return disk.size

    return StoreImage()


# Signatures of what a partition may hold that no library here reads, to say what was found.
_MAGIC = [
    (0, b"XFSB", "xfs"),
    (512, b"LABELONE", "an LVM2 physical volume (LVM is not supported: restore the disk and use lvm)"),
    (0, b"LUKS\xba\xbe", "a LUKS encrypted volume (encrypted data cannot be read without its key)"),
    (0x10040, b"_BHRfS_M", "btrfs (not supported by file-level restore: restore the disk)"),
    (4086, b"SWAPSPACE2", "Linux swap (no files in it)"),
    (4086, b"SWAP-SPACE", "Linux swap (no files in it)"),
    (0x1000, b"\xfc\x4e\x2b\xa9", "a Linux MD RAID member (restore the disk)"),
    (3, b"-FVE-FS-", "a BitLocker encrypted volume (cannot be read without its key)"),
]


def _sniff(disk: Disk, start: int, size: int) -> str | None:
    for off, magic, what in _MAGIC:
        if off + len(magic) <= size and disk.read(start + off, len(magic)) == magic:
            return what
    return None


# -- filesystems -----------------------------------------------------------------------------
class Filesystem:
    """What the commands need of a filesystem: stat, listdir, read. Paths are '/'-separated."""

    type = "?"

    def __init__(self, disk: Disk, part: Partition):
        self.disk, self.part = disk, part

    @property
    def where(self) -> str:
        p = "the whole disk" if self.part.number == 0 else f"partition {self.part.number}"
        return f"{self.disk.where} {p} ({self.type})"

    def stat(self, path: str) -> Entry:
        raise NotImplementedError

    def listdir(self, path: str) -> list[Entry]:
        raise NotImplementedError

    def chunks(self, entry: Entry):
        raise NotImplementedError

    def _fail(self, e: BaseException, doing: str):
        """A library error as ours: the store's error if a read failed, else damaged filesystem."""
        bad = self.disk.store_failure()
        if bad is not None:
            raise bad from None
        cut = self.part.cut_short(self.disk.size)
        raise DamagedFilesystem(f"{self.where}: cannot {doing}: {e}" + (f" ({cut})" if cut else "")) from None


_TSK_TYPES = {}


def _tsk_type_name(ftype) -> str:
    pytsk3 = _tsk()
    if not _TSK_TYPES:
        for k in dir(pytsk3):
            v = getattr(pytsk3, k)
            if k.startswith("TSK_FS_TYPE_") and not k.endswith(("_DETECT", "_UNSUPP", "_ENUM")):
                _TSK_TYPES.setdefault(int(v), k[len("TSK_FS_TYPE_"):].lower())
    return _TSK_TYPES.get(int(ftype), f"type {int(ftype):#x}")


def _tsk_dos_readonly(mode: int) -> bool:
    """The DOS read-only attribute of a FAT or NTFS entry. The Sleuth Kit has no field for it
    but folds the attributes into the mode it reports: read-only clears the three read bits,
    hidden the three write bits (fatfs_meta.c, ntfs.c; tests/e2e/test_first_user.py pins it
    with real read-only and hidden files)."""
    return not mode & 0o444


class TskFilesystem(Filesystem):
    def __init__(self, disk: Disk, part: Partition, img, fs):
        super().__init__(disk, part)
        self.pytsk3 = _tsk()
        self.img, self.fs = img, fs
        self.type = _tsk_type_name(fs.info.ftype)
        self.unix = self.type.startswith(("ext", "ffs", "ufs", "hfs"))

    def _open(self, path: str):
        try:
            return self.fs.open(path)
        except LIBRARY_ERRORS as e:
            if self.disk.failure is not None:
                self._fail(e, f"read {path}")
            if "not found" in str(e):
                raise NoSuchPath(f"no {path} in {self.where}") from None
            self._fail(e, f"open {path}")

    def _entry(self, f, path: str) -> Entry | None:
        t = self.pytsk3
        meta = f.info.meta
        name = f.info.name.name.decode("utf-8", "replace") if f.info.name else os.path.basename(path)
        if meta is None:
            return None
        mt = int(meta.type)
        if mt in (int(t.TSK_FS_META_TYPE_VIRT), int(t.TSK_FS_META_TYPE_VIRT_DIR)):
            return None
        kind = {int(t.TSK_FS_META_TYPE_REG): "file", int(t.TSK_FS_META_TYPE_DIR): "dir",
                int(t.TSK_FS_META_TYPE_LNK): "symlink"}.get(mt, "other")
        target = None
        if kind == "symlink":
            link = meta.link
            target = link.decode("utf-8", "surrogateescape") if isinstance(link, bytes) else link
            if not target:
                target = f.read_random(0, int(meta.size)).decode("utf-8", "surrogateescape")
        return Entry(path=path, name=name, kind=kind, size=int(meta.size) if kind in ("file", "dir") else 0,
                     mtime_ns=int(meta.mtime) * 10**9 + int(meta.mtime_nano or 0) if meta.mtime else None,
                     mode=int(meta.mode) & 0o7777 if self.unix else None,
                     uid=int(meta.uid) if self.unix else None, gid=int(meta.gid) if self.unix else None,
                     target=target, readonly=None if self.unix else _tsk_dos_readonly(int(meta.mode)))

    def stat(self, path: str) -> Entry:
        e = self._entry(self._open(path), path)
        if e is None:
            raise NoSuchPath(f"no {path} in {self.where}")
        return e

    def listdir(self, path: str) -> list[Entry]:
        t = self.pytsk3
        d = self._open(path)
        out = []
        try:
            for f in d.as_directory():
                n = f.info.name
                if n is None or n.name in (b".", b".."):
                    continue
                if not int(n.flags) & int(t.TSK_FS_NAME_FLAG_ALLOC):
                    continue  # deleted
                name = n.name.decode("utf-8", "replace")
                if self.type.startswith("fat") and name.endswith("(Volume Label Entry)"):
                    continue
                if self.type == "ntfs" and path == "/" and name.startswith("$") and f.info.meta \
                        and int(f.info.meta.addr) < 24:
                    continue  # the MFT's own files
                e = self._entry(f, path.rstrip("/") + "/" + name)
                if e is not None:
                    out.append(e)
        except LIBRARY_ERRORS as e:
            self._fail(e, f"list {path}")
        return sorted(out, key=lambda e: e.name)

    def chunks(self, entry: Entry):
        f = self._open(entry.path)
        off = 0
        while off < entry.size:
            try:
                data = f.read_random(off, min(CHUNK, entry.size - off))
            except LIBRARY_ERRORS as e:
                self._fail(e, f"read {entry.path}")
            if not data:
                raise DamagedFilesystem(f"{self.where}: {entry.path} ends at {off} bytes, its size says {entry.size}")
            yield data
            off += len(data)


class XfsFilesystem(Filesystem):
    type = "xfs"

    def __init__(self, disk: Disk, part: Partition):
        super().__init__(disk, part)
        try:
            import pyfsxfs
        except ImportError as e:
            raise FilesError(f"{self.where}: XFS needs libfsxfs-python ({e}): pip install libfsxfs-python") from None
        self.file = _PartFile(disk, part.start, part.size)
        self.vol = pyfsxfs.volume()
        try:
            self.vol.open_file_object(self.file)
        except LIBRARY_ERRORS as e:
            self._fail(e, "open it")

    def _get(self, path: str):
        try:
            fe = self.vol.get_file_entry_by_path(path) if path != "/" else self.vol.get_root_directory()
        except LIBRARY_ERRORS as e:
            self._fail(e, f"read {path}")
        if fe is None:
            raise NoSuchPath(f"no {path} in {self.where}")
        return fe

    def _entry(self, fe, path: str) -> Entry:
        m = int(fe.file_mode)
        kind = "dir" if stat.S_ISDIR(m) else "file" if stat.S_ISREG(m) else "symlink" if stat.S_ISLNK(m) else "other"
        return Entry(path=path, name=os.path.basename(path) or "/", kind=kind,
                     size=int(fe.size) if kind in ("file", "dir") else 0,
                     mtime_ns=int(fe.get_modification_time_as_integer()), mode=stat.S_IMODE(m),
                     uid=int(fe.owner_identifier), gid=int(fe.group_identifier),
                     target=fe.symbolic_link_target if kind == "symlink" else None)

    def stat(self, path: str) -> Entry:
        return self._entry(self._get(path), path)

    def listdir(self, path: str) -> list[Entry]:
        fe = self._get(path)
        out = []
        try:
            for i in range(fe.number_of_sub_file_entries):
                sub = fe.get_sub_file_entry(i)
                out.append(self._entry(sub, path.rstrip("/") + "/" + sub.name))
        except LIBRARY_ERRORS as e:
            self._fail(e, f"list {path}")
        return sorted(out, key=lambda e: e.name)

    def chunks(self, entry: Entry):
        fe = self._get(entry.path)
        off = 0
        while off < entry.size:
            try:
                data = fe.read_buffer_at_offset(min(CHUNK, entry.size - off), off)
            except LIBRARY_ERRORS as e:
                self._fail(e, f"read {entry.path}")
            if not data:
                raise DamagedFilesystem(f"{self.where}: {entry.path} ends at {off} bytes, its size says {entry.size}")
            yield data
            off += len(data)


# -- opening ---------------------------------------------------------------------------------
def open_disk(spec, target: str, disk: int | None = None, view=None) -> Disk:
    """`target` is VM or VM@VERSION (a unique prefix); `disk` a disk number (default 0)."""
    from pipelines.restore import resolve_version

    from .mount import StoreView

    view = view or StoreView(spec, cache_bytes=64 << 20)
    vm, _, version = target.partition("@")
    if not vm:
        raise FilesError(f"give the VM as VM or VM@VERSION, not {target!r}")
    version = resolve_version(view.store, vm, version or None)
    disks = list(view._disks(vm, version).items())
    n = 0 if disk is None else disk
    if not 0 <= n < len(disks):
        raise FilesError(f"{vm}@{version} has no disk {n}: it has {len(disks)} "
                         f"(use --disk 0{' to ' + str(len(disks) - 1) if len(disks) > 1 else ''})")
    return Disk(view, vm, version, n, disks[n][1], name=disks[n][0])


def partitions(disk: Disk) -> list[Partition]:
    """The disk's partitions, each with the filesystem found in it (whole disk if no table)."""
    return [p for p, _ in _scan(disk)]


def _scan(disk: Disk) -> list[tuple]:
    """[(Partition, its open Filesystem, or None, or the DamagedFilesystem it raised)]"""
    pytsk3 = _tsk()
    img = _image(disk)
    try:
        vs = pytsk3.Volume_Info(img)
    except LIBRARY_ERRORS:
        bad = disk.store_failure()
        if bad is not None:
            raise bad from None
        parts = [Partition(0, 0, disk.size, "none", "whole disk")]
    else:
        bsize = int(vs.info.block_size)
        scheme = {int(pytsk3.TSK_VS_TYPE_GPT): "gpt", int(pytsk3.TSK_VS_TYPE_DOS): "mbr"}.get(
            int(vs.info.vstype), str(vs.info.vstype).lower())
        parts, logical = [], 4
        for p in vs:
            if int(p.flags) != int(pytsk3.TSK_VS_PART_FLAG_ALLOC):
                continue
            if scheme == "mbr" and int(p.table_num) > 0:
                logical += 1
                number = logical
            else:
                number = int(p.slot_num) + 1
            parts.append(Partition(number, int(p.start) * bsize, int(p.len) * bsize, scheme,
                                   p.desc.decode("utf-8", "replace").strip("\x00 ")))
    out = []
    for p in parts:
        p.past_end = max(0, p.start + p.size - disk.size)
        try:
            out.append((p, _probe(disk, img, p)))
        except DamagedFilesystem as e:  # listed as found; opening it raises this
            p.filesystem, p.found, p.why = None, "a filesystem that cannot be read", e.detail
            out.append((p, e))
    return out


def _probe(disk: Disk, img, p: Partition):
    """Fill p.filesystem (or p.found); returns an open Filesystem or None."""
    pytsk3 = _tsk()
    try:
        fs = pytsk3.FS_Info(img, offset=p.start)
    except LIBRARY_ERRORS as e:
        bad = disk.store_failure()
        if bad is not None:
            raise bad from None
        what = _sniff(disk, p.start, p.size)
        if what == "xfs":
            p.filesystem = "xfs"
            return XfsFilesystem(disk, p)
        if what is None:
            head = disk.read(p.start, 4096)
            what = "only zeros (an empty or wiped partition)" if not head.strip(b"\0") else "no filesystem known to alike"
        p.found = what
        p.why = str(e).split("error: ")[-1]
        return None
    f = TskFilesystem(disk, p, img, fs)
    p.filesystem = f.type
    return f


def filesystem(disk: Disk, number: int | None = None) -> Filesystem:
    """The filesystem of partition `number`; without a number, the only one on the disk."""
    scan = _scan(disk)
    if number is None:
        readable = [(p, fs) for p, fs in scan if isinstance(fs, Filesystem)]
        if len(readable) != 1:
            listing = ", ".join(f"{p.number}: {p.filesystem or p.found}" for p, _ in scan) or "none"
            raise FilesError(f"{disk.where} has {len(readable) or 'no'} readable filesystems "
                             f"({listing}): pass --partition N (`alike files {disk.vm}@{disk.version} parts` lists them)")
        return readable[0][1]
    match = [(p, fs) for p, fs in scan if p.number == number]
    if not match:
        have = ", ".join(str(p.number) for p, _ in scan) or "none"
        raise FilesError(f"{disk.where} has no partition {number} (partitions: {have})")
    p, fs = match[0]
    if isinstance(fs, DamagedFilesystem):
        raise fs
    if fs is None:
        where = "the whole disk" if p.number == 0 else f"partition {p.number}"
        raise UnreadableFilesystem(f"cannot read files in {disk.where} {where} "
                                   f"({p.description or p.scheme}, {_h(p.size)}): found {p.found} "
                                   f"({p.why or 'unknown type'})")
    return fs


def _h(n: int) -> str:
    from ..ui import _h as h

    return h(n)


# -- extraction ------------------------------------------------------------------------------
def norm(path: str) -> str:
    path = "/" + "/".join(p for p in path.replace("\\", "/").split("/") if p and p != ".")
    if "/../" in path + "/":
        raise FilesError(f"{path}: '..' is not allowed in a path inside the backup")
    return path


def walk(fs: Filesystem, entry: Entry):
    """entry, then everything under it (depth first, folders before their content)."""
    yield entry
    if entry.kind == "dir":
        for e in fs.listdir(entry.path):
            yield from walk(fs, e)


def extract(fs: Filesystem, paths: list[str], dest: str, force: bool = False) -> dict:
    """Copy `paths` (files or folders, recursively) into the folder `dest`: each lands at
    dest/<its name> (a path of / lands as dest's content). Nothing is written when a target
    exists and not `force`; a file is written under a temporary name and renamed when whole."""
    plan = []  # (entry, local path)
    for path in paths:
        top = fs.stat(norm(path))
        base = os.path.join(dest, top.name) if top.path != "/" else dest
        for e in walk(fs, top):
            rel = os.path.relpath(e.path, top.path) if e.path != top.path else ""
            plan.append((e, os.path.normpath(os.path.join(base, rel)) if rel else base))
    inside = os.path.abspath(dest)
    for e, t in plan:  # names come from the disk: none may lead out of dest
        if os.path.commonpath([inside, os.path.abspath(t)]) != inside:
            raise DamagedFilesystem(f"{fs.where}: the name {e.path!r} would be written outside {dest}")
    locals_ = [t for _, t in plan]
    if len(set(locals_)) != len(locals_):
        raise FilesError("two of the paths land at the same place in --to: extract them one by one")
    if not force:
        for e, t in plan:
            if os.path.lexists(t) and not (e.kind == "dir" and os.path.isdir(t) and t == dest):
                raise TargetExists(t)
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise FilesError(f"--to {dest} is not a folder: give a folder to extract into")
    os.makedirs(dest, exist_ok=True)
    root = os.geteuid() == 0
    files = dirs = links = other = 0
    nbytes = 0
    for e, t in plan:
        if e.kind == "dir":
            if os.path.lexists(t) and not os.path.isdir(t):
                os.unlink(t)
            os.makedirs(t, exist_ok=True)
            dirs += 1
            continue
        if os.path.isdir(t) and not os.path.islink(t):
            raise TargetExists(f"{t} (a folder, where {e.path} is a {e.kind})")
        if e.kind == "symlink":
            if os.path.lexists(t):
                os.unlink(t)
            os.symlink(e.target or "", t)
            links += 1
        elif e.kind == "file":
            tmp = f"{t}.alike-part"
            try:
                with open(tmp, "wb") as f:
                    for data in fs.chunks(e):
                        f.write(data)
                        nbytes += len(data)
                os.replace(tmp, t)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            files += 1
        else:
            other += 1  # devices, fifos, sockets: listed, not recreated
            continue
        _set_meta(t, e, root)
    for e, t in reversed(plan):  # folders last, deepest first: writing in them moved their times
        if e.kind == "dir":
            _set_meta(t, e, root)
    return {"files": files, "folders": dirs, "symlinks": links, "skipped_special": other, "bytes": nbytes,
            "to": os.path.abspath(dest)}


def _set_meta(t: str, e: Entry, root: bool) -> None:
    if root and e.uid is not None:
        try:
            os.lchown(t, e.uid, e.gid if e.gid is not None else -1)
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EINVAL):
                raise
    if e.mode is not None and e.kind != "symlink":  # after chown, which drops set-id bits
        os.chmod(t, e.mode)
    if e.mtime_ns is not None:
        os.utime(t, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
