"""Stores of format 1 (written before every object carried its check) still read and write.

tests/data/format1-store.tar.gz is a real store written by alike at git 0d8296f (the last
format-1 release): two versions of VM `old` (block size 64K, small packs) of the images that
`images()` below rebuilds byte for byte, a pin, a validation record."""
from __future__ import annotations

import hashlib
import json
import os
import tarfile

import numpy as np
import pytest

from tests.e2e.test_validate_repair import run, same

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
SHA = {"f1.raw": "0aa2003481f61d3a815532df606baa26d7c8532957878cb787955bc57701444d",
       "f1-day2.raw": "8fe109d4a7bdcacc92083f3382f4f60a76a7789c54773b605cc3ad5441db4ff5"}
VERSIONS = {"20261201-083714-308": "f1.raw", "20261201-083730-896": "f1-day2.raw"}


def images(d) -> dict:
    rng = np.random.default_rng(1)
    img = bytearray(3 * MiB)
    img[0:131072] = rng.integers(0, 256, 131072, dtype=np.uint8).tobytes()
    img[2 * MiB:2 * MiB + 300000] = (b"format one " * 30000)[:300000]
    img2 = bytearray(img)
    img2[100000:140000] = (b"day two " * 5000)[:40000]
    out = {}
    for name, data in (("f1.raw", img), ("f1-day2.raw", img2)):
        assert hashlib.sha256(data).hexdigest() == SHA[name]
        out[name] = str(d / name)
        open(out[name], "wb").write(data)
    return out


@pytest.fixture
def f1(tmp_path):
    with tarfile.open(os.path.join(HERE, "..", "data", "format1-store.tar.gz")) as t:
        t.extractall(tmp_path)
    return str(tmp_path / "f1store"), images(tmp_path)


def test_format1_store_reads_and_takes_new_versions(f1, ray_address, tmp_path):
    store, imgs = f1
    cfg = json.load(open(os.path.join(store, "config.json")))
    assert cfg["format"] == 1 and "check" not in cfg
    assert run("verify", "--store", store)[0] == 0
    for version, name in VERSIONS.items():
        out = tmp_path / f"{version}.raw"
        rc, _, err = run("restore", "--store", store, f"old@{version}", "--to", str(out))
        assert rc == 0, err
        assert same(out, imgs[name])
    rc, out, _ = run("pins", "--store", store, "--json")
    assert rc == 0 and json.loads(out)["pins"][0]["note"] == "old-pin"
    # a new version in the old store: its objects carry checks, which are verified
    rc, out, err = run("backup", "--store", store, f"image:{imgs['f1-day2.raw']}", "--name", "old", "--json")
    assert rc == 0, err
    new = json.loads(out)["version"]
    meta_path = os.path.join(store, "versions", "old", new, "version.json")
    raw = open(meta_path, "rb").read()
    assert raw.startswith(b'{"check":"blake3:')
    assert "manifest_blake3" in json.loads(raw)["disks"][0]
    assert json.load(open(os.path.join(store, "config.json")))["format"] == 1  # not upgraded in place
    assert run("verify", "--store", store)[0] == 0
    dst = tmp_path / "new.raw"
    assert run("restore", "--store", store, f"old@{new}", "--to", str(dst))[0] == 0
    assert same(dst, imgs["f1-day2.raw"])
    # a checked object of a format-1 store is verified: one flipped bit is refused
    b = bytearray(raw)
    b[len(b) // 2] ^= 4
    open(meta_path, "wb").write(b)
    dst.unlink()
    assert run("restore", "--store", store, f"old@{new}", "--to", str(dst))[0] == 3 and not dst.exists()
    assert run("verify", "--store", store)[0] == 3
    open(meta_path, "wb").write(raw)
    # vaulted, the copy is a store of format 2 whose every object checks
    ods = str(tmp_path / "ods")
    rc, _, err = run("vault", "--store", store, "--to", ods)
    assert rc == 0, err
    assert json.loads(open(os.path.join(ods, "config.json"), "rb").read())["format"] == 2
    assert run("verify", "--store", ods)[0] == 0
    for version, name in VERSIONS.items():
        out = tmp_path / f"ods-{version}.raw"
        assert run("restore", "--store", ods, f"old@{version}", "--to", str(out))[0] == 0
        assert same(out, imgs[name])
