"""The dedup index: hash -> (pack, offset, length).

In memory, a shard is a handful of sorted runs of fixed-width numpy arrays (a log-structured
merge of binary-counter sizes), 44 bytes per unique block: 32 for the hash, 4 each for the
pack number, offset and length. Pack ids are kept once per pack, not per block. Lookups are
vectorised over a batch with `searchsorted`.

On the store, the index is a set of immutable Parquet segments under index/<x>/<blake3>.parquet,
where <x> is the hash's first nibble (16 shards) and <blake3> the check of the segment's bytes. A segment is written only after every pack it names is
durable, so a segment never points at a pack that a crash could have lost.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

N_SHARDS = 16


def h32(x) -> bytes:
    """A hash taken out of an S32 array as its 32 bytes. numpy drops trailing zero bytes from
    S-dtype scalars, so `bytes(arr[i])` is wrong for one hash in 256."""
    return bytes(x).ljust(32, b"\0")


def shard_of(hashes: np.ndarray) -> np.ndarray:
    """Shard number for each hash of an S32 array."""
    first = np.frombuffer(hashes.tobytes(), dtype=np.uint8)[:: 32] if len(hashes) else np.zeros(0, np.uint8)
    return (first >> 4).astype(np.int64)


def as_hash_array(hashes) -> np.ndarray:
    if isinstance(hashes, np.ndarray) and hashes.dtype == np.dtype("S32"):
        return hashes
    return np.array(list(hashes), dtype="S32")


class CompactIndex:
    def __init__(self):
        self.runs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.pack_ids: list[str] = []
        self.pack_num: dict[str, int] = {}

    def _pack(self, pid: str) -> int:
        n = self.pack_num.get(pid)
        if n is None:
            n = self.pack_num[pid] = len(self.pack_ids)
            self.pack_ids.append(pid)
        return n

    def __len__(self):
        return sum(len(r[0]) for r in self.runs)

    def nbytes(self) -> int:
        return sum(a.nbytes for r in self.runs for a in r)

    def add(self, hashes: np.ndarray, packs, offsets, lengths) -> None:
        """Add entries. `packs` is one pack id for all, a list with one per entry, or
        (pack ids, u32 index into them per entry) as a Parquet dictionary column gives."""
        if not len(hashes):
            return
        hashes = as_hash_array(hashes)
        if isinstance(packs, str):
            pnum = np.full(len(hashes), self._pack(packs), dtype=np.uint32)
        elif isinstance(packs, tuple):
            names, idx = packs
            local = np.array([self._pack(p) for p in names], dtype=np.uint32)
            pnum = local[np.asarray(idx, np.int64)]
        else:
            pnum = np.array([self._pack(p) for p in packs], dtype=np.uint32)
        order = np.argsort(hashes, kind="stable")
        run = (hashes[order], pnum[order], np.asarray(offsets, np.uint32)[order],
               np.asarray(lengths, np.uint32)[order])
        self.runs.append(run)
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            b = self.runs.pop()
            a = self.runs.pop()
            h = np.concatenate([a[0], b[0]])
            order = np.argsort(h, kind="stable")
            self.runs.append(tuple(np.concatenate([x, y])[order] for x, y in zip(a, b)))

    def lookup(self, hashes: np.ndarray):
        """-> (found bool[n], pack number u32[n], offset u32[n], length u32[n])."""
        hashes = as_hash_array(hashes)
        n = len(hashes)
        found = np.zeros(n, bool)
        pk = np.zeros(n, np.uint32)
        off = np.zeros(n, np.uint32)
        ln = np.zeros(n, np.uint32)
        for rh, rp, ro, rl in self.runs:
            if not len(rh):
                continue
            idx = np.minimum(np.searchsorted(rh, hashes), len(rh) - 1)
            hit = (rh[idx] == hashes) & ~found
            found |= hit
            pk[hit], off[hit], ln[hit] = rp[idx[hit]], ro[idx[hit]], rl[idx[hit]]
        return found, pk, off, ln

    def locate(self, hashes):
        """-> (found mask, list of pack ids (None when not found), offsets, lengths)."""
        found, pk, off, ln = self.lookup(hashes)
        packs = [self.pack_ids[p] if f else None for f, p in zip(found, pk)]
        return found, packs, off, ln


def hashes_to_arrow(hashes: np.ndarray) -> pa.Array:
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), len(hashes), [None, pa.py_buffer(hashes.tobytes())])


def arrow_to_hashes(col) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros(0, dtype="S32")
    buf = arr.buffers()[1]
    return np.frombuffer(buf, dtype="S32", count=len(arr), offset=arr.offset * 32).copy()


def segment_bytes(hashes: np.ndarray, packs: list[str], offsets, lengths) -> bytes:
    from .objects import parquet_bytes

    return parquet_bytes(pa.table({
        "hash": hashes_to_arrow(hashes),
        "pack": pa.array(packs, pa.string()).dictionary_encode(),
        "offset": pa.array(np.asarray(offsets, np.uint32)),
        "length": pa.array(np.asarray(lengths, np.uint32)),
    }))


def segment_key(shard: int, check: str) -> str:
    """A segment's key carries the BLAKE3 of its bytes (storage/objects.py)."""
    return f"index/{shard:x}/{check}.parquet"


def read_segment(data: bytes):
    """-> (hashes, (pack ids, index per entry), offsets, lengths) of unchecked segment bytes."""
    return segment_arrays(pq.read_table(pa.BufferReader(data)))


def segment_arrays(t):
    """-> (hashes, (pack ids, index per entry), offsets, lengths) of a segment's table, ready
    for CompactIndex.add."""
    packs = t.column("pack").combine_chunks()
    if not isinstance(packs, pa.DictionaryArray):
        packs = packs.dictionary_encode()
    return (arrow_to_hashes(t.column("hash")),
            (packs.dictionary.to_pylist(), packs.indices.to_numpy(zero_copy_only=False)),
            t.column("offset").to_numpy(), t.column("length").to_numpy())
