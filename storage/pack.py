"""Packs: stored blocks appended one after another, then a footer index and a trailer.

    "ALKPACK1" | block 0 | block 1 | ... | footer | trailer

footer: one FOOTER_DTYPE record per block (hash, offset, length, crc32 of the stored bytes).
trailer (16 bytes): footer length (u32 LE), crc32 (u32 LE), "ALKFOOT2": the crc32 covers the
pack's id (32 ASCII hex digits) and then the footer, so a pack found under another pack's name
(swapped, renamed, copied over) fails its footer check. Packs written before (magic "ALKFOOT1")
have a crc32 of the footer alone, and still read.
A pack is written in one atomic put; the footer lets a pack be checked, or the index rebuilt,
from the pack alone. Each stored block is checked on its own too: by the keyed BLAKE3 that the
index names it by (a restore decodes and re-hashes every block) and by its footer crc32.
"""
from __future__ import annotations

import os
import struct
import uuid

import numpy as np

try:  # the same CRC-32 as zlib's, with the CPU's carry-less multiply: 10x faster (a first backup
    # spent 0.64 of its 18 CPU seconds in zlib's, measured with perf on the 16 GiB bench image)
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; the format is the same either way
    from zlib import crc32

from .errors import DamagedData

MAGIC = b"ALKPACK1"
TRAILER_MAGIC = b"ALKFOOT2"
TRAILER_MAGIC_V1 = b"ALKFOOT1"
TRAILER = struct.Struct("<II8s")
FOOTER_DTYPE = np.dtype([("hash", "S32"), ("offset", "<u8"), ("length", "<u4"), ("crc", "<u4")])
# flush at this size: packs land between 16 and 64 MiB. $ALIKE_PACK_TARGET (bytes) changes it,
# for tests that need many packs from little data.
TARGET_PACK = int(os.environ.get("ALIKE_PACK_TARGET") or 32 * 1024 * 1024)


def new_pack_id() -> str:
    return uuid.uuid4().hex


def pack_key(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}"


class PackBuilder:
    def __init__(self):
        self.pack_id = new_pack_id()
        self.parts: list[bytes] = [MAGIC]
        self.size = len(MAGIC)
        self.entries: list[tuple] = []
        self.taken = 0  # pieces already handed over by take_parts
        self.stream = None  # the Backend.put_stream writing it, for whoever streams it

    def add(self, h: bytes, stored: bytes) -> tuple[int, int]:
        return self.add_parts(h, (stored,))

    def add_parts(self, h: bytes, parts) -> tuple[int, int]:
        """Add a stored block given as consecutive pieces (Codec.encode_parts: its tag byte,
        then the compressed bytes), without joining them: the pack's bytes are copied once, by
        the backend's put_parts."""
        off, crc, n = self.size, 0, 0
        for p in parts:
            self.parts.append(p)
            crc = crc32(p, crc)
            n += len(p)
        self.size += n
        self.entries.append((h, off, n, crc))
        return off, n

    def __len__(self):
        return len(self.entries)

    def finish(self) -> bytes:
        return b"".join(self.finish_parts())

    def finish_parts(self) -> list:
        """The pack's bytes as a list of pieces, in order (Backend.put_parts writes them)."""
        assert not self.taken, "part of this pack was taken to be written already: use take_parts"
        return self.parts + self.tail_parts()

    def take_parts(self) -> list:
        """The pieces added since the last take (the first ones start with the magic), handed
        over to be written as they come (Backend.put_stream); the pack then ends with its
        tail_parts."""
        out, self.parts = self.parts, []
        self.taken += len(out)
        return out

    def tail_parts(self) -> list:
        """The footer and the trailer, the pieces after the last block."""
        footer = np.array(self.entries, dtype=FOOTER_DTYPE).tobytes()
        trailer = TRAILER.pack(len(footer), footer_crc(self.pack_id, footer), TRAILER_MAGIC)
        return [footer, trailer]


def footer_crc(pack_id: str, footer: bytes) -> int:
    return crc32(footer, crc32(pack_id.encode()))


def parse_footer(tail: bytes, pack_size: int, where: str) -> np.ndarray:
    """Parse a footer given the pack's last bytes (at least the footer and trailer); `where` is
    the pack's id, which the footer's crc covers."""
    if len(tail) < TRAILER.size:
        raise DamagedData(f"pack {where} is truncated")
    flen, fcrc, magic = TRAILER.unpack(tail[-TRAILER.size:])
    if magic not in (TRAILER_MAGIC, TRAILER_MAGIC_V1) or flen % FOOTER_DTYPE.itemsize or flen + TRAILER.size + len(MAGIC) > pack_size:
        raise DamagedData(f"pack {where} has a damaged or missing footer")
    if len(tail) < flen + TRAILER.size:
        raise ValueError("need more tail")
    footer = tail[-TRAILER.size - flen:-TRAILER.size]
    if magic == TRAILER_MAGIC_V1:
        if crc32(footer) != fcrc:
            raise DamagedData(f"pack {where} has a damaged footer")
    elif footer_crc(where, footer) != fcrc:
        raise DamagedData(f"pack {where} has a damaged footer, or holds another pack's data (swapped or renamed)")
    return np.frombuffer(footer, dtype=FOOTER_DTYPE)


def read_footer(backend, pack_id: str) -> np.ndarray:
    key = pack_key(pack_id)
    size = backend.size(key)
    tail = backend.get_range(key, max(0, size - 65536), min(size, 65536))
    try:
        return parse_footer(tail, size, pack_id)
    except ValueError:
        flen = TRAILER.unpack(tail[-TRAILER.size:])[0]
        tail = backend.get_range(key, size - flen - TRAILER.size, flen + TRAILER.size)
        return parse_footer(tail, size, pack_id)


def check_block(stored: bytes, crc: int) -> bool:
    return crc32(stored) == crc
