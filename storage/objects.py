"""Checked objects: every object the store writes carries a check of its own bytes, verified on
every read, so that a flipped bit anywhere is found before the object is used.

JSON objects (config.json, version.json, pins, locks, gc records, job runs) stay plain JSON,
with the check as their first key::

    {"check":"blake3:<64 hex>",<the rest of the object's JSON text>

The check is the BLAKE3-256 of the object's JSON text without it (`{` + the rest), so any
change to any byte of the object, check included, is found. `jq`, `json.load` and every other
JSON reader read the object as it is (one more key).

Parquet objects (manifests, index segments, gc entries, validation records) stay plain Parquet
that duckdb, pandas and pyarrow read as they are: they are written with Parquet page checksums
(CRC32 of each page, checked by pyarrow on read here), and the BLAKE3-256 of the whole file is
kept outside it, where the object is named: in version.json for a manifest
(`manifest_blake3` of each disk), in the gc record for its entries, and in the object's own key
for index segments (`index/<x>/<blake3>.parquet`) and validation records. The BLAKE3 covers
the footer too, which the page checksums do not.

Packs check themselves: each stored block by the keyed BLAKE3 the index names it by (and a
CRC32 in the footer), the footer by a CRC32 in the trailer that also covers the pack's id, so a
pack stored under another pack's name is found (storage/pack.py).

Stores of format 1 (before checks) still read: their objects without a check are taken as they
are; objects written into them since carry checks, which are verified. In a store of format 2
an object without its check is damaged.

BLAKE3 runs at several GB/s on one core: checking a 1 MB manifest costs well under a
millisecond, next to the milliseconds of fetching it.
"""
from __future__ import annotations

import io
import json
import re

import blake3

from .errors import DamagedData

_PREFIX = b'{"check":"blake3:'
_HEX_LEN = 64
_HEX = re.compile(rb"^[0-9a-f]{64}$")
HEX_NAME = re.compile(r"^[0-9a-f]{64}$")


def digest(data) -> str:
    """The BLAKE3-256 of `data`, as 64 hex digits."""
    return blake3.blake3(data).hexdigest()


# -- JSON ---------------------------------------------------------------------------------------
def seal_json(obj: dict) -> bytes:
    """`obj` as checked JSON bytes (see the module doc)."""
    if not isinstance(obj, dict):
        raise TypeError("a checked JSON object is a dict")
    body = json.dumps(obj, indent=2).encode()
    rest = body[1:]
    sep = b'"' if rest == b"}" else b'",'
    return _PREFIX + digest(body).encode() + sep + rest


def has_check(raw: bytes) -> bool:
    return bytes(raw[:len(_PREFIX)]) == _PREFIX


def open_json(raw: bytes, key: str, required: bool = True) -> dict:
    """The object of checked JSON bytes; DamagedData naming `key` when the bytes fail their check.
    `required=False` (stores of format 1) also takes JSON written before checks."""
    raw = bytes(raw)
    if has_check(raw):
        n = len(_PREFIX)
        hexd, after = raw[n:n + _HEX_LEN], raw[n + _HEX_LEN:]
        if after.startswith(b'",'):
            body = b"{" + after[2:]
        elif after == b'"}':
            body = b"{}"
        else:
            raise DamagedData(f"{key} has a damaged check")
        if not _HEX.match(hexd) or digest(body).encode() != hexd:
            raise DamagedData(f"{key} fails its check (BLAKE3 of its bytes)")
        obj = json.loads(body)
    elif required:
        raise DamagedData(f"{key} has no check of its own bytes (damaged, or not written by alike)")
    else:
        try:
            obj = json.loads(raw)
        except Exception:
            raise DamagedData(f"{key} does not parse") from None
    if not isinstance(obj, dict):
        raise DamagedData(f"{key} is not a JSON object")
    return obj


# -- Parquet ------------------------------------------------------------------------------------
def parquet_bytes(table) -> bytes:
    """A Parquet file of `table`, zstd-compressed, with page checksums."""
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(table, out, compression="zstd", write_page_checksum=True)
    return out.getvalue()


def read_parquet(raw: bytes, key: str, check: str | None, required: bool = True):
    """The table of a Parquet object whose BLAKE3 should be `check`; DamagedData naming `key`
    when it is not, or when the file does not parse or fails a page checksum. `check=None` is
    taken only when not `required` (objects of format-1 stores)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if check is not None:
        if digest(raw) != check:
            raise DamagedData(f"{key} fails its check (BLAKE3 of its bytes)")
    elif required:
        raise DamagedData(f"{key} has no recorded check")
    try:
        return pq.read_table(pa.BufferReader(raw), page_checksum_verification=True)
    except Exception as e:
        raise DamagedData(f"{key} does not parse ({str(e).splitlines()[0][:200]})") from None


def check_in_key(key: str) -> str | None:
    """The BLAKE3 an object's key carries (`.../<64 hex>.parquet` or `...-<64 hex>.parquet`), or
    None for a key of format 1."""
    stem = key.rsplit("/", 1)[-1].split(".", 1)[0]
    stem = stem.rsplit("-", 1)[-1]
    return stem if HEX_NAME.match(stem) else None
