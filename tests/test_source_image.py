"""The `image:` source binds the source contract: a raw image of an odd size with data up to
its last byte, and a VM of two qcow2 disks (one plain, read in place; one compressed, converted
to a temporary raw file that release removes). Also: listed sizes, and images cut short."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from alike_ray.sources.image import ImageSource
from tests import images
from tests.source_contract import Bound, SourceContract

MiB = images.MiB


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    d = tmp_path_factory.mktemp("source-image")
    lib = os.path.dirname(os.__file__)
    t = images.tree(str(d / "tree"), 2 * MiB, [f"{lib}/json", f"{lib}/email"])
    raw = images.ext4_image(str(d / "disk.raw"), 16, t, "web")
    with open(raw, "r+b") as f:  # data in the last bytes too: reads at the end of the disk
        f.seek(16 * MiB - 3000)
        f.write(os.urandom(3000))
    odd = str(d / "odd.raw")
    subprocess.run(["cp", "--sparse=always", raw, odd], check=True)
    with open(odd, "ab") as f:  # a size that is no multiple of a sector
        f.write(os.urandom(1001))
    plain = images.to_qcow2(raw, str(d / "plain.qcow2"))
    packed = images.to_qcow2(raw, str(d / "packed.qcow2"), "-c")
    return {"raw": raw, "odd": odd, "plain": plain, "packed": packed}


def _file(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Temporary files of this test's snapshots only (other runs on the machine make theirs)."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


class TestImageRaw(SourceContract):
    @pytest.fixture
    def bound(self, imgs, private_tmp):
        return Bound(ImageSource(imgs["odd"], name="web"), "web", truth=lambda disk: _file(imgs["odd"]),
                     residue=lambda: sorted(os.listdir(private_tmp)), power_state="n/a")


class TestImageQcow2(SourceContract):
    @pytest.fixture
    def bound(self, imgs, private_tmp):
        src = ImageSource(f"{imgs['plain']},{imgs['packed']}", name="db")
        return Bound(src, "db", truth=lambda disk: _file(imgs["raw"]),
                     residue=lambda: sorted(os.listdir(private_tmp)), power_state="n/a")

    def test_compressed_is_converted_and_removed(self, bound, private_tmp):
        with bound.source.snapshot("db") as snap:
            assert [d.path for d in snap.disks][0].endswith("plain.qcow2")  # read in place
            assert os.listdir(private_tmp)  # the compressed one: a temporary raw
        assert not os.listdir(private_tmp)


def test_listed_sizes(imgs):
    """Every kind of image lists its disk's real size (raw: the file; qcow2: the virtual size)."""
    src = ImageSource(",".join(imgs[k] for k in ("odd", "plain", "packed")))
    [vm] = src.list_vms()
    assert [s for _, s in vm.disks] == [16 * MiB + 1001, 16 * MiB, 16 * MiB]
    assert vm.notes == []


def test_inventory_json_sizes(imgs):
    """`alike inventory image:... --json` reports the size of the disk, not 0."""
    import json

    p = subprocess.run([sys.executable, "-m", "alike_ray.cli", "inventory", f"image:{imgs['plain']}", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    [vm] = json.loads(p.stdout)["vms"]
    assert vm["disks"] == [{"name": "plain.qcow2", "size": 16 * MiB}]


def cut_short_image(path: str, label: str, claimed_mib: int = 32, kept_mib: int = 12) -> str:
    """A raw image whose partition table (made by sfdisk) claims `claimed_mib` MiB, cut to `kept_mib`."""
    with open(path, "wb") as f:
        f.truncate(claimed_mib * MiB)
    images.run("sfdisk", "--quiet", path, input=f"label: {label}\nstart=2048, type=linux\n")
    with open(path, "r+b") as f:
        f.truncate(kept_mib * MiB)
    return path


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_cut_short_image_is_noted(tmp_path, label):
    path = cut_short_image(str(tmp_path / "cut.raw"), label)
    [vm] = ImageSource(path).list_vms()
    assert vm.disks == [("cut.raw", 12 * MiB)]
    [note] = vm.notes
    assert f"image {path} looks cut short" in note and "partition 1 ends at" in note and "12.0 MiB" in note
    with ImageSource(path).snapshot("cut") as snap:  # the version records it
        assert snap.vm.notes == [note]


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_whole_images_are_not_noted(tmp_path, imgs, label):
    whole = cut_short_image(str(tmp_path / "whole.raw"), label, 32, 32)
    [vm] = ImageSource(f"{whole},{imgs['odd']},{imgs['plain']}").list_vms()
    assert vm.notes == []


def test_inventory_warns_of_a_cut_short_image(tmp_path):
    import json

    path = cut_short_image(str(tmp_path / "office.raw"), "dos")
    p = subprocess.run([sys.executable, "-m", "alike_ray.cli", "inventory", f"image:{path}", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    [vm] = json.loads(p.stdout)["vms"]
    [note] = vm["notes"]
    assert "looks cut short" in note and vm["disks"] == [{"name": "office.raw", "size": 12 * MiB}]
    assert p.stderr.splitlines() == [f"alike: warning: office: {note}"]


def test_a_task_reads_pieces_ahead_in_threads(tmp_path):
    """A read task reads an image's pieces with reader threads (MappedDisk.parallel_reads): every
    piece comes back in order with the file's bytes (zeros in holes), and a read that fails
    raises the source's error in the task, with no read left running on the worker's buffer."""
    import numpy as np

    from alike_ray.sources.base import SourceError
    from alike_ray.sources.image import MappedDisk
    from pipelines.backup import READ_BYTES, _Pieces, _runs, _task_buffer

    bs = 512 * 1024
    path = str(tmp_path / "d.raw")
    size = 40 * bs
    data = np.frombuffer(os.urandom(size), np.uint8).copy()
    data[8 * bs:12 * bs] = 0  # a hole
    with open(path, "wb") as f:
        f.write(data[:8 * bs].tobytes())
        f.seek(12 * bs)
        f.write(data[12 * bs:].tobytes())
    disk = MappedDisk("d", path, size, [(0, 8 * bs, 0), (12 * bs, 28 * bs, 12 * bs)], None)
    assert disk.parallel_reads > 1
    blocks = np.array([b for b in range(40) if b != 20], np.int64)
    step = READ_BYTES // bs
    runs = [(f, min(step, s + c - f)) for s, c in _runs(blocks) for f in range(s, s + c, step)]
    whole = _task_buffer(sum(c for _, c in runs) * bs)
    reader = _Pieces(disk, runs, bs, whole)
    assert reader.pool is not None
    got = []
    try:
        for (first, count), (buf, n) in zip(runs, reader):
            assert np.array_equal(buf, data[first * bs:(first + count) * bs]), first
            got.append(first)
    finally:
        reader.close()
    assert got == [f for f, _ in runs]

    class Failing(MappedDisk):
        def read_into(self, buf, offset):
            if offset >= 30 * bs:
                raise SourceError(f"cannot read {self.path} at offset {offset}: Input/output error")
            return super().read_into(buf, offset)

    bad = Failing("d", path, size, [(0, size, 0)], None)
    runs = [(f, min(step, 40 - f)) for f in range(0, 40, step)]
    reader = _Pieces(bad, runs, bs, _task_buffer(40 * bs))
    with pytest.raises(SourceError, match="Input/output error"):
        try:
            for _ in reader:
                pass
        finally:
            reader.close()
    assert all(f.done() for f in reader.futures)


def test_direct_reads_refused_midway_go_on_buffered(tmp_path, monkeypatch):
    """A file system that refuses a direct read (EINVAL: alignment rules of its own) while
    reader threads share the disk: every read still returns the file's bytes, later reads are
    buffered, and the direct descriptor is not closed under the threads that may be using it
    (its number could go to another file)."""
    import errno
    import threading

    import numpy as np

    from alike_ray.sources.image import MappedDisk
    from storage import dio

    monkeypatch.setenv("ALIKE_DIRECT_IO", "1")
    if not dio.enabled():
        pytest.skip("no O_DIRECT here")
    bs = 256 * 1024
    path = str(tmp_path / "d.raw")
    data = np.frombuffer(os.urandom(32 * bs), np.uint8)
    with open(path, "wb") as f:
        f.write(data.tobytes())
    disk = MappedDisk("d", path, len(data), [(0, len(data), 0)], None)
    dfd = disk._direct()
    if dfd is False:
        pytest.skip("this file system refuses O_DIRECT")
    real, refused = os.preadv, []

    def preadv(fd, bufs, at):
        if fd == dfd and at >= 8 * bs:
            refused.append(at)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, at)

    monkeypatch.setattr(os, "preadv", preadv)
    errors, bufs = [], {}

    def read(i):
        try:
            buf = dio.allocate(bs)
            disk.read_into(buf, i * bs)
            bufs[i] = buf
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(np.array_equal(bufs[i], data[i * bs:(i + 1) * bs]) for i in range(32))
    assert refused and disk._dio is False
    os.fstat(dfd)  # still open: closed only with the disk
    import pickle

    copy = pickle.loads(pickle.dumps(disk))  # as sent to a Ray task: no descriptor numbers go along
    assert copy._fd is None and copy._dio is None and copy._refused is None
    del copy
    os.fstat(dfd)  # the copy's end closed nothing of the original's
    n = len(refused)
    disk.read_into(dio.allocate(bs), 20 * bs)
    assert len(refused) == n  # buffered from then on
    del disk
    with pytest.raises(OSError):
        os.fstat(dfd)
