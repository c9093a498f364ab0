"""Copying stored blocks from one store into new packs of another (vault, repair): sorted by
source pack and offset, neighbours read in one ranged read, each block decoded and checked
against its hash before it is written. Both stores share the hash key."""
from __future__ import annotations

import numpy as np

from storage.errors import ObjectMissing, StoreError
from storage.index import h32
from storage.store import PackSink, Store

SPAN_GAP = 1 << 20    # read neighbours together when less than this apart
SPAN_MAX = 64 << 20   # and no more than this at once


def copy_blocks(src: Store, dst: Store, packs, offs, lens, hashes, after_put=None):
    """Copy the blocks (sorted by source pack and offset). A span that cannot be read is tried
    block by block. -> (new entries (hashes, packs, offsets, lengths), damaged hashes, bytes)."""
    sink = PackSink(dst, after_put)
    damaged = []
    i, n = 0, len(offs)
    while i < n:
        j = i + 1
        end = int(offs[i] + lens[i])
        while (j < n and packs[j] == packs[i] and int(offs[j]) - end < SPAN_GAP
               and int(offs[j] + lens[j]) - int(offs[i]) < SPAN_MAX):
            end = max(end, int(offs[j] + lens[j]))
            j += 1
        start = int(offs[i])
        try:
            span = src.read_stored(packs[i], start, end - start)
        except ObjectMissing:  # a missing or truncated pack: what can be read, block by block
            span = None
        for k in range(i, j):
            h = h32(hashes[k])
            try:
                if span is not None:
                    o = int(offs[k]) - start
                    stored = span[o:o + int(lens[k])]
                else:
                    stored = src.read_stored(packs[k], int(offs[k]), int(lens[k]))
                src.codec.decode(stored, h)
            except StoreError:
                damaged.append(hashes[k])
                continue
            sink.add(h, stored)
        i = j
    return sink.entries(), np.array(damaged, dtype="S32"), sink.nbytes
