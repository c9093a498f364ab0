"""A restore task's writes (pipelines.restore.restore_batch, run here in the test's own process
so that the device's answers can be chosen): a thread writes one run of blocks with direct I/O
while the next is decoded; where the device refuses an aligned direct write part-way, the rest
of that run and every later one (but the one already in the other buffer) are written
buffered, and the file is the image all the same; a write that fails fails the task with the target named."""
from __future__ import annotations

import os
import subprocess

import pytest

from pipelines import restore
from pipelines.index import LocalIndex
from storage import dio
from storage.errors import StoreError
from storage.store import Store


def _planned(alike, corpus, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    st = Store.open(str(store))
    _, rows = restore.plan(st, LocalIndex(str(store)), "web", restore.resolve_version(st, "web", None))
    target = tmp_path / "web.raw"
    with open(target, "wb") as f:
        f.truncate(os.path.getsize(corpus["web"]))
    return str(store), str(target), rows


def _run(store, target, rows):
    return restore.restore_batch._function(store, [target], rows)


def test_writes_behind_and_falls_back_where_direct_writes_are_refused(alike, corpus, tmp_path, monkeypatch):
    store, target, rows = _planned(alike, corpus, tmp_path)
    real = dio.pwrite_all
    calls = []

    def refuse_after_the_first(fd, view, off):
        calls.append(len(view))
        if len(calls) == 1:
            return real(fd, view, off)
        half = len(view) // 2 // dio.ALIGN * dio.ALIGN
        return real(fd, view[:half], off)  # then "EINVAL": the rest is the caller's

    monkeypatch.setattr(dio, "pwrite_all", refuse_after_the_first)
    monkeypatch.setattr(restore, "WRITE_RUN", 1 << 20)  # several runs, so several writes
    res = _run(store, target, rows)
    assert subprocess.run(["cmp", "-s", target, corpus["web"]]).returncode == 0
    assert res["written"] == len(rows["block"]) * 512 * 1024 - _short_tail(rows, corpus["web"])
    if dio.open_direct(target, os.O_WRONLY) is not None:  # a file system with direct I/O
        # after the refusal, only the write already in the other buffer may try direct I/O
        assert 2 <= len(calls) <= 3


def _short_tail(rows, image) -> int:
    """Bytes the last block of the image lacks (an image whose size is not whole blocks)."""
    size = os.path.getsize(image)
    last = (int(rows["block"].max()) + 1) * 512 * 1024
    return max(0, last - size)


def test_a_failing_write_fails_the_task_naming_the_target(alike, corpus, tmp_path, monkeypatch):
    store, target, rows = _planned(alike, corpus, tmp_path)
    if dio.open_direct(target, os.O_WRONLY) is None:
        pytest.skip("no direct I/O on this file system: the buffered path is tested elsewhere")

    def full(fd, view, off):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dio, "pwrite_all", full)
    with pytest.raises(StoreError) as e:
        _run(store, target, rows)
    assert int(e.value.exit_code) == 4  # no space left: the folder of the target is named
    assert str(tmp_path) in e.value.message


def test_a_backend_whose_requests_cost_gets_fewer_larger_reads(alike, corpus, tmp_path, monkeypatch):
    """A backend with a `min_request` (S3: a request costs a round trip and the server's work)
    gets a task's reads at that size from the first one; a local file's first read stays small
    (the decode starts sooner). The file is the image both ways."""
    from storage.local import DirectoryBackend

    store, target, rows = _planned(alike, corpus, tmp_path)
    assert int(rows["len"].sum()) > 4 << 20  # enough stored data for several reads
    reads = []
    real = Store.read_stored

    def counted(self, pack, offset, length):
        reads.append((pack, int(offset), int(length)))
        return real(self, pack, offset, length)

    monkeypatch.setattr(Store, "read_stored", counted)
    _run(store, target, rows)
    small = sorted(reads)  # the task's order: by pack, then offset
    assert small[0][2] <= restore.FIRST_SPAN  # its first read
    assert subprocess.run(["cmp", "-s", target, corpus["web"]]).returncode == 0

    os.unlink(target)
    with open(target, "wb") as f:
        f.truncate(os.path.getsize(corpus["web"]))
    reads.clear()
    monkeypatch.setattr(DirectoryBackend, "min_request", restore.SPAN)
    _run(store, target, rows)
    big = sorted(reads)
    assert subprocess.run(["cmp", "-s", target, corpus["web"]]).returncode == 0
    assert len(big) < len(small)
    assert all(n <= restore.SPAN for _, _, n in big)
    assert big[0][2] > restore.FIRST_SPAN  # the task's first read is no longer the small one
