"""Patched blocks: a block stored as the granules that changed since an earlier block (its base).

A changed-block-tracking backup knows, from the hypervisor's dirty bitmap, which granules of a
block were written since the previous version. When a block had only a few of them written
(a database page here and there), storing it whole costs a read and a compression of the whole
block for a few KiB of change. Instead the block is stored as a *delta*: a blob holding the
current bytes of those granules, applied over the base, a block stored whole.

- A delta blob is an ordinary stored block: keyed BLAKE3 of its plaintext, zstd, in packs,
  named by the index, verified, vaulted and repaired like any other. Its plaintext is
  `MAGIC | grain (u32) | mask (u64) | the granules' bytes in order`, bit i of the mask being
  granule i of the block.
- The base is always a block stored whole, never a delta: restoring any block reads at most two
  blobs, however many versions the chain of changes spans ("every version restores at the same
  speed"). A block patched again keeps its base and takes the union of the granules; once that
  union is more than half the block, the block is stored whole again (and is a new base).
- A manifest row of a patched block names its base and its delta; its `hash` is
  `row_hash(base, delta)`, not the hash of the block's bytes (those were never all read).
  The blobs a version needs are therefore its whole blocks, its bases and its deltas
  (`Manifest.blobs`): what gc keeps, vault copies, verify checks.
"""
from __future__ import annotations

import struct

import numpy as np

from .errors import DamagedData

MAGIC = b"ALPT"
HEADER = struct.Struct("<4sIQ")
MAX_GRAINS = 64
MIN_GRAIN = 64 * 1024


def grain_size(block_size: int) -> int:
    """Granule size of patches for a store's block size: 64 KiB (QEMU's default dirty bitmap
    granularity), or block/64 for blocks above 4 MiB (at most 64 granules: a u64 mask)."""
    return max(MIN_GRAIN, block_size // MAX_GRAINS)


def popcount(mask: np.ndarray) -> np.ndarray:
    """Set bits of each u64 of `mask`."""
    m = np.asarray(mask, np.uint64)
    return np.unpackbits(m.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1) if len(m) else np.zeros(0, np.int64)


def grain_masks(extents, nblocks: int, block_size: int) -> np.ndarray:
    """u64 mask per block of the granules that the (offset, length) `extents` touch."""
    g = grain_size(block_size)
    per = block_size // g
    touched = np.zeros(nblocks * per, bool)
    for off, ln in extents:
        if ln > 0:
            touched[off // g:min(len(touched), (off + ln - 1) // g + 1)] = True
    weights = (np.uint64(1) << np.arange(per, dtype=np.uint64))
    return (touched.reshape(nblocks, per).astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)


def runs_of(mask: int, grain: int) -> list[tuple[int, int]]:
    """(offset in the block, length) of each run of consecutive granules of `mask`."""
    out, i = [], 0
    mask = int(mask)
    while mask >> i:
        if mask >> i & 1:
            j = i
            while mask >> j & 1:
                j += 1
            out.append((i * grain, (j - i) * grain))
            i = j
        else:
            i += 1
    return out


def encode(grain: int, mask: int, data) -> bytes:
    """The plaintext of a delta: `data` holds the granules of `mask`, in order."""
    return HEADER.pack(MAGIC, grain, int(mask)) + bytes(data)


def apply(base, delta: bytes, where: str = "") -> bytes:
    """The block: `base` with the granules of `delta` written over it."""
    if len(delta) < HEADER.size:
        raise DamagedData(f"delta {where} is too short")
    magic, grain, mask = HEADER.unpack_from(delta)
    runs = runs_of(mask, grain) if magic == MAGIC and grain else None
    need = sum(n for _, n in runs) if runs is not None else -1
    if runs is None or len(delta) - HEADER.size != need or (runs and runs[-1][0] + runs[-1][1] > len(base)):
        raise DamagedData(f"delta {where} does not fit its base")
    out = bytearray(base)
    pos = HEADER.size
    for off, n in runs:
        out[off:off + n] = delta[pos:pos + n]
        pos += n
    return bytes(out)


def row_hash(codec, base: bytes, delta: bytes) -> bytes:
    """The manifest hash of a patched block: names the (base, delta) pair."""
    return codec.hash(b"alike-patch\0" + bytes(base).ljust(32, b"\0") + bytes(delta).ljust(32, b"\0"))
