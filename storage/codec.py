"""The block codec: zero detection, keyed BLAKE3-256, zstd.

A stored block is one codec byte then its payload: 0 = raw (compression did not pay), 1 = zstd.
The hash is over the plaintext, keyed with the store's hash key, so that blocks of stores with
different keys never match by accident, and so that it doubles as the block's strong checksum.
"""
from __future__ import annotations

import threading

import blake3
import numpy as np
import zstandard

from .errors import DamagedData

RAW, ZSTD = 0, 1
_RAW_TAG, _ZSTD_TAG = bytes([RAW]), bytes([ZSTD])
HASH_LEN = 32
MIN_BLOCK, MAX_BLOCK, DEFAULT_BLOCK = 64 * 1024, 4 * 1024 * 1024, 512 * 1024


def check_block_size(n: int) -> int:
    if n < MIN_BLOCK or n > MAX_BLOCK or n & (n - 1):
        from .errors import InvalidValue

        raise InvalidValue(
            f"block size {n} is not allowed: use a power of two from 64K to 4M "
            "(65536, 131072, ..., 4194304)"
        )
    return n


def is_zero(buf) -> bool:
    a = np.frombuffer(buf, dtype=np.uint8)
    if len(a) >= 64 and a[:64].view(np.uint64).any():  # data mostly shows at once: no full scan
        return False
    n8 = len(a) // 8 * 8
    if n8 and a[:n8].view(np.uint64).any():
        return False
    return not a[n8:].any()


class Codec:
    def __init__(self, hash_key: bytes, level: int = 3):
        if len(hash_key) != 32:
            raise ValueError("hash key must be 32 bytes")
        self.hash_key = hash_key
        self.level = level
        self._local = threading.local()  # zstd contexts are not thread-safe: one per thread

    def __getstate__(self):
        return {"hash_key": self.hash_key, "level": self.level}

    def __setstate__(self, s):
        self.__init__(s["hash_key"], s["level"])

    def hash(self, buf) -> bytes:
        return blake3.blake3(buf, key=self.hash_key).digest()

    def encode(self, buf) -> bytes:
        return b"".join(self.encode_parts(buf))

    def encode_parts(self, buf) -> tuple[bytes, bytes]:
        """-> (the tag byte, the payload): `encode(buf)` in two pieces, so that a pack takes the
        compressed bytes as zstd made them, without a copy to put the tag in front."""
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        c = cctx.compress(buf)
        if len(c) >= len(buf):
            return _RAW_TAG, bytes(buf)
        return _ZSTD_TAG, c

    def decode(self, stored, expect_hash: bytes | None = None, where: str = "") -> bytes:
        if not stored:
            raise DamagedData(f"empty block {where}")
        kind = stored[0]
        try:
            if kind == RAW:
                data = bytes(stored[1:])
            elif kind == ZSTD:
                dctx = getattr(self._local, "dctx", None)
                if dctx is None:
                    dctx = self._local.dctx = zstandard.ZstdDecompressor()
                data = dctx.decompress(stored[1:], max_output_size=MAX_BLOCK)
            else:
                raise DamagedData(f"unknown block codec {kind} {where}")
        except zstandard.ZstdError as e:
            raise DamagedData(f"block does not decompress {where} ({e})") from None
        if expect_hash is not None and self.hash(data) != expect_hash:
            raise DamagedData(f"block {expect_hash.hex()[:16]} fails its checksum {where}")
        return data
