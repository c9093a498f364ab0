"""The read task's packer (pipelines/backup.py `_Packer`): packs written as they fill, by the
worker's write thread, on a real directory store. What it commits is whole and readable block
by block; what an error leaves unfinished is removed, never committed."""
from __future__ import annotations

import os

import numpy as np
import pytest

from pipelines.backup import _Packer
from storage.errors import StoreError
from storage.pack import read_footer
from storage.store import Store


def _blocks(n, seed=5):
    rng = np.random.default_rng(seed)
    # half compressible, half random: both the zstd and the raw path of the codec
    return [(bytes([i % 256]) * 31 + rng.bytes(1),
             (rng.bytes(300_000) + bytes(224_288)) if i % 2 else rng.bytes(524_288)) for i in range(n)]


def _leftovers(root):
    return [f for _, _, fs in os.walk(os.path.join(root, "packs")) for f in fs if f.startswith(".tmp-")]


def test_packer_streams_packs_that_read_back(tmp_path, monkeypatch):
    monkeypatch.setattr("pipelines.backup.TARGET_PACK", 5 << 20)  # several packs, one left open at the end
    st = Store.init(str(tmp_path / "s"))
    p = _Packer(st, None)
    items = _blocks(40)
    jobs = [p.pool.submit(p.add, items[i:i + 7]) for i in range(0, len(items), 7)]
    for j in jobs:
        j.result()
    p.finish()
    p.wait(abort=True)
    assert p.packs == len(p.written) >= 3 and p.new_blocks == len(items)
    got = {}
    for h, pack, offs, lens in p.written:
        footer = read_footer(st.backend, pack)
        assert footer["hash"].tolist() == h.tolist() and footer["offset"].tolist() == offs.tolist()
        for hh, o, n in zip(h, offs, lens):
            got[bytes(hh).ljust(32, b"\0")] = st.codec.decode(st.read_stored(pack, o, n))
    assert all(got[h] == b for h, b in items)
    assert sum(st.backend.size(f"packs/{w[1][:2]}/{w[1]}") for w in p.written) >= p.stored_bytes
    assert not _leftovers(st.backend.root)


def test_packer_error_commits_nothing_unfinished(tmp_path, monkeypatch):
    st = Store.init(str(tmp_path / "s"))
    p = _Packer(st, None)
    p.add(_blocks(12))  # a pack begun: its stream is open, part of it on the disk
    for w in p.writes:
        w.result()
    assert p.streaming and _leftovers(st.backend.root)  # written as it fills, under a temporary name

    def refuse(self):
        raise StoreError("cannot write: refused by the test")

    monkeypatch.setattr(type(p.builder.stream), "commit", refuse)
    with pytest.raises(StoreError, match="refused by the test"):
        p.finish()
    p.wait(abort=True)
    assert p.written == [] and p.packs == 0
    assert st.list_packs() == [] and not _leftovers(st.backend.root)
    assert p.failed
    p.add(_blocks(2))  # after an error the later jobs do nothing
    assert p.new_blocks == 12
