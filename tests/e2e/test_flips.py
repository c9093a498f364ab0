"""Single flipped bits anywhere on a store never give a wrong restore, and verify flags each.

A real store (64K blocks, small packs) holds two versions of a VM, a pin, a job run, a pending gc
(cut after its condemnation, so its record and entries are on the store), a validation record
and a writer's lock. For each kind of object, single bits are flipped one at a time at seeded
positions spread over the whole object (one position drawn in each of N equal strata); after
each flip `alike restore` of every version must either refuse with exit 3 and write nothing, or
write exactly the source's bytes, and `alike verify` must exit 3 (it flagged the damage). Then
the object is put back. Also: a consistent pack footer whose entry points into the wrong block,
and two packs swapped under each other's names.

CI runs a fixed subset (50 flips per Parquet kind, 64 per JSON kind, 40 in a pack's blocks and
in its footer, 32 in its trailer); ALIKE_FULL_MATRIX=1 flips every byte of the JSON objects,
every bit of the trailer and 200 positions of the others. Objects that only one version uses
(or none: pins, job runs, gc and validation records, locks) are followed by a restore of that
version; shared ones (config.json, index segments, packs) by a restore of both.
The seeds are fixed: a failure names the object, byte and bit, and reproduces."""
from __future__ import annotations

import os
import shutil
import subprocess
import zlib

import numpy as np
import pytest

from tests import images
from tests.e2e.test_validate_repair import run, same

FULL = os.environ.get("ALIKE_FULL_MATRIX") == "1"
MiB = 1 << 20
SEED = 20261201
RESULTS: dict[str, list[int]] = {}  # kind -> [tried, caught, silent]


@pytest.fixture(scope="module")
def flipstore(ray_address, tmp_path_factory):
    """-> dict(store, images {version: path}, keys {kind: key}, tmp)."""
    import time

    from alike_ray import jobs
    from storage.locks import Lock
    from storage.store import Store

    d = tmp_path_factory.mktemp("flips")
    img1 = str(d / "web.raw")
    with open(img1, "wb") as f:  # data and holes: 1 MiB random, 1 MiB hole, 1 MiB text, a tail
        f.write(os.urandom(MiB))
        f.seek(2 * MiB)
        f.write((b"alike flips " * 90000)[:MiB])
        f.seek(4 * MiB - 65536)
        f.write(os.urandom(65536))
    img2 = str(d / "web-day2.raw")
    shutil.copy(img1, img2)
    with open(img2, "r+b") as f:
        f.seek(256 * 1024)
        f.write(os.urandom(200 * 1024))
    gone = images.random_image(str(d / "gone.raw"), 1)
    store = str(d / "ads")
    env = {"ALIKE_PACK_TARGET": str(256 * 1024)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert run("init", "--store", store, "--block-size", "64K")[0] == 0
        v = {}
        for path in (img1, img2):
            rc, out, err = run("backup", "--store", store, f"image:{path}", "--name", "web", "--json")
            assert rc == 0, err
            import json

            v[json.loads(out)["version"]] = path
        rc, out, err = run("backup", "--store", store, f"image:{gone}", "--name", "gone", "--json")
        assert rc == 0, err
    finally:
        for k, val in old.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val
    st = Store.open(store)
    first = sorted(v)[0]
    st.pin("web", first, note="before the upgrade")
    jobs.record_run(st, "nightly", jobs.new_run_id(),
                    {"run_id": "x", "job": "nightly", "ok": True, "vms": [{"vm": "web", "ok": True}]})
    # a pending gc: the version of `gone` removed, then a gc cut once its condemnation is recorded
    st.delete_version("gone", st.list_versions("gone")[0][1])
    p = subprocess.run([os.sys.executable, "-m", "alike_ray.cli", "gc", "--store", store, "--grace", "0"],
                       env=dict(os.environ, RAY_ADDRESS=ray_address, ALIKE_CRASH_AT="gc-after-condemn"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0, p.stderr  # killed at the crash point
    assert run("verify", "--store", store)[0] == 0  # records a validation; the store is clean
    lk = Lock(st.backend, "writer", "backup")
    st.backend.put(lk.key, lk._body())  # a live writer's lock (this process)
    time.sleep(0.01)
    listed = list(st.backend.list(""))
    keys = {
        "config.json": "config.json",
        "version.json": f"versions/web/{first}/version.json",
        "manifest": f"versions/web/{first}/disk-0.parquet",
        "index segment": sorted(k for k in listed if k.startswith("index/"))[0],
        "pin": f"pins/web/{first}.json",
        "job run": next(k for k in listed if k.startswith("jobs/")),
        "gc record": next(k for k in listed if k.startswith("gc/") and k.endswith(".json")),
        "gc entries": next(k for k in listed if k.startswith("gc/") and k.endswith(".entries.parquet")),
        "validation record": next(k for k in listed if k.startswith("validation/")),
        "lock": lk.key,
    }
    return {"store": store, "images": v, "keys": keys, "tmp": d, "st": st,
            "validations": set(k for k in listed if k.startswith("validation/"))}


def positions(size: int, n: int, seed: int) -> list[tuple[int, int]]:
    """(byte, bit) pairs: every bit when n >= 8 * size, every byte (one bit drawn) when n >= size,
    else one drawn in each of n equal strata."""
    rng = np.random.default_rng(seed)
    if n >= 8 * size:
        return [(i, bit) for i in range(size) for bit in range(8)]
    if n >= size:
        return [(i, int(rng.integers(8))) for i in range(size)]
    edges = np.linspace(0, size, n + 1).astype(int)
    return [(int(rng.integers(a, max(a + 1, b))), int(rng.integers(8))) for a, b in zip(edges[:-1], edges[1:])]


SHARED = ("config.json", "index segment", "pack")


def check_after_damage(fs, what: str, every_version: bool = True) -> str | None:
    """Restore the versions (every one, or the first: the one the damaged object belongs to)
    and verify once. -> None when the damage was caught with no wrong byte written, else what
    went wrong."""
    out = fs["tmp"] / "out.raw"
    versions = sorted(fs["images"].items())
    for version, src in versions if every_version else versions[:1]:
        if out.exists():
            out.unlink()
        rc, _, err = run("restore", "--store", fs["store"], f"web@{version}", "--to", str(out))
        if rc == 0:
            if not same(out, src):
                return f"{what}: restore of web@{version} exit 0 with WRONG data"
        elif rc != 3:
            return f"{what}: restore of web@{version} exit {rc} (expected 0 or 3): {err.strip()[-300:]}"
        elif out.exists():
            return f"{what}: restore of web@{version} refused but wrote {out}"
        if "Traceback" in err:
            return f"{what}: restore printed a traceback: {err[-500:]}"
    rc, vout, err = run("verify", "--store", fs["store"], "--json")
    for key in fs["st"].backend.list("validation/"):  # keep the store as it was: verify adds one
        if key not in fs["validations"]:
            fs["st"].backend.delete(key)
    if rc != 3:
        return f"{what}: verify exit {rc}, did not flag it: {vout[-300:]} {err[-300:]}"
    return None


def flip_object(fs, kind: str, n: int, seed: int) -> None:
    path = os.path.join(fs["store"], fs["keys"][kind])
    with open(path, "rb") as f:
        orig = f.read()
    tried = caught = 0
    failures = []
    try:
        for byte, bit in positions(len(orig), n, seed):
            b = bytearray(orig)
            b[byte] ^= 1 << bit
            with open(path, "wb") as f:
                f.write(b)
            tried += 1
            why = check_after_damage(fs, f"{kind} {fs['keys'][kind]} byte {byte} bit {bit}", kind in SHARED)
            if why:
                failures.append(why)
            else:
                caught += 1
    finally:
        with open(path, "wb") as f:
            f.write(orig)
    RESULTS[kind] = [tried, caught, tried - caught]
    print(f"\nflips: {kind}: {tried} tried, {caught} caught, {tried - caught} silent")
    assert not failures, "\n".join(failures[:10])


JSON_KINDS = ["config.json", "version.json", "pin", "job run", "gc record", "lock"]
PARQUET_KINDS = ["manifest", "index segment", "gc entries", "validation record"]


@pytest.mark.parametrize("kind", JSON_KINDS + PARQUET_KINDS)
def test_flips(flipstore, kind):
    if kind in JSON_KINDS:
        n = 1 << 30 if FULL else 64
    else:
        n = 200 if FULL else 50
    flip_object(flipstore, kind, n, SEED + zlib.crc32(kind.encode()) % 1000)


def _pack(fs, i=0):
    """The i-th of the packs the index names (those a restore or verify reads; the pending gc's
    condemned packs are no longer indexed) -> (path, every such pack's key)."""
    from storage.pack import pack_key

    _, _, p, _, _ = fs["st"].read_index()
    packs = sorted(pack_key(x) for x in set(p.tolist()))
    return os.path.join(fs["store"], packs[i]), packs


def _footer_span(data: bytes):
    from storage.pack import TRAILER

    flen = TRAILER.unpack(data[-TRAILER.size:])[0]
    return len(data) - TRAILER.size - flen, len(data) - TRAILER.size


@pytest.mark.parametrize("region", ["block data", "footer", "trailer"])
def test_pack_flips(flipstore, region):
    """Flips in a pack's stored blocks (zstd frames), its footer and its trailer."""
    path, packs = _pack(flipstore)
    with open(path, "rb") as f:
        orig = f.read()
    fstart, tstart = _footer_span(orig)
    lo, hi = {"block data": (8, fstart), "footer": (fstart, tstart), "trailer": (tstart, len(orig))}[region]
    n = (200 if FULL else 40) if region != "trailer" else (16 * 8 if FULL else 32)
    tried = caught = 0
    failures = []
    rng = np.random.default_rng(SEED + len(region))
    spots = positions(hi - lo, n, int(rng.integers(1 << 30)))
    try:
        for off, bit in spots:
            b = bytearray(orig)
            b[lo + off] ^= 1 << bit
            with open(path, "wb") as f:
                f.write(b)
            tried += 1
            why = check_after_damage(flipstore, f"pack {region} byte {lo + off} bit {bit}")
            failures.append(why) if why else None
            caught += not why
    finally:
        with open(path, "wb") as f:
            f.write(orig)
    RESULTS[f"pack {region}"] = [tried, caught, tried - caught]
    print(f"\nflips: pack {region}: {tried} tried, {caught} caught, {tried - caught} silent")
    assert not failures, "\n".join(failures[:10])


def test_pack_footer_points_into_wrong_block(flipstore):
    """A footer whose entry names another block's offset, with a valid crc: verify still flags
    it (the footer disagrees with the index) and restores are exact."""
    from storage.pack import FOOTER_DTYPE, TRAILER, TRAILER_MAGIC, footer_crc

    path, _ = _pack(flipstore)
    pack_id = os.path.basename(path)
    with open(path, "rb") as f:
        orig = f.read()
    fstart, tstart = _footer_span(orig)
    footer = np.frombuffer(orig[fstart:tstart], dtype=FOOTER_DTYPE).copy()
    assert len(footer) >= 2
    footer["offset"][0], footer["length"][0] = footer["offset"][1], footer["length"][1]
    fb = footer.tobytes()
    try:
        with open(path, "wb") as f:
            f.write(orig[:fstart] + fb + TRAILER.pack(len(fb), footer_crc(pack_id, fb), TRAILER_MAGIC))
        why = check_after_damage(flipstore, "footer entry pointing into the wrong block")
        assert why is None, why
    finally:
        with open(path, "wb") as f:
            f.write(orig)


def test_two_packs_swapped(flipstore):
    path_a, packs = _pack(flipstore, 0)
    used = [p for p in packs if os.path.basename(p) != os.path.basename(path_a)]
    path_b = os.path.join(flipstore["store"], used[0])
    a, b = open(path_a, "rb").read(), open(path_b, "rb").read()
    try:
        open(path_a, "wb").write(b)
        open(path_b, "wb").write(a)
        why = check_after_damage(flipstore, "two packs swapped")
        assert why is None, why
    finally:
        open(path_a, "wb").write(a)
        open(path_b, "wb").write(b)


def test_store_clean_after_flips(flipstore):
    """Every object was put back: the store verifies clean and restores exactly (so the flips
    above were judged against a good store)."""
    assert run("verify", "--store", flipstore["store"])[0] == 0
    total = np.array(list(RESULTS.values()) or [[0, 0, 0]]).sum(axis=0)
    print(f"\nflips: all kinds: {total[0]} tried, {total[1]} caught, {total[2]} silent")


HEAL_KINDS = ["config.json", "version.json", "manifest", "index segment", "pin", "job run", "gc record",
              "gc entries", "validation record", "pack"]


@pytest.fixture(scope="module")
def ods(flipstore):
    """The flip store's offsite copy (a vault into a folder), to repair from."""
    ods = str(flipstore["tmp"] / "ods")
    rc, _, err = run("vault", "--store", flipstore["store"], "--to", ods)
    assert rc == 0, err
    return ods


@pytest.mark.parametrize("kind", HEAL_KINDS)
def test_repair_heals_flip(flipstore, ods, tmp_path, kind):
    """One flipped bit in each kind of object: `alike repair --from` the ODS heals it, then
    verify is clean and every version restores exactly."""
    store = str(tmp_path / "ads")
    shutil.copytree(flipstore["store"], store)
    key = _pack(flipstore)[1][0] if kind == "pack" else flipstore["keys"][kind]
    path = os.path.join(store, key)
    b = bytearray(open(path, "rb").read())
    b[len(b) // 2] ^= 0x10
    open(path, "wb").write(b)
    assert run("verify", "--store", store)[0] == 3
    rc, out, err = run("repair", "--store", store, "--from", ods)
    assert rc == 0, (kind, out, err)
    assert "Traceback" not in err
    rc, out, err = run("verify", "--store", store, "--json")
    assert rc == 0, (kind, out, err)
    for version, src in sorted(flipstore["images"].items()):
        dst = tmp_path / f"{version}.raw"
        assert run("restore", "--store", store, f"web@{version}", "--to", str(dst))[0] == 0
        assert same(dst, src), (kind, version)


def test_flips_on_s3(flipstore, s3_bucket, tmp_path):
    """The same checks on an S3 store (a real S3 server over HTTP): the flip store vaulted to a
    bucket, then bits flipped in its objects through the S3 API, a few per kind (3 per kind in CI,
    6 with ALIKE_FULL_MATRIX=1)."""
    import boto3

    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/ods"
    rc, _, err = run("vault", "--store", flipstore["store"], "--to", url, "--endpoint", endpoint)
    assert rc == 0, err
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="ods/")["Contents"]]
    first = sorted(flipstore["images"])[0]
    kinds = {"config.json": "ods/config.json",
             "version.json": f"ods/versions/web/{first}/version.json",
             "manifest": f"ods/versions/web/{first}/disk-0.parquet",
             "index segment": sorted(k for k in keys if k.startswith("ods/index/"))[0],
             "pack": sorted(k for k in keys if k.startswith("ods/packs/"))[0]}
    out = tmp_path / "out.raw"
    tried = caught = 0
    for kind, key in kinds.items():
        orig = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        for byte, bit in positions(len(orig), 6 if FULL else 3, SEED + zlib.crc32(key.encode()) % 1000):
            b = bytearray(orig)
            b[byte] ^= 1 << bit
            s3.put_object(Bucket=bucket, Key=key, Body=bytes(b))
            tried += 1
            rc, _, err = run("restore", "--store", url, "--endpoint", endpoint, f"web@{first}", "--to", str(out))
            assert rc in (0, 3), (kind, byte, bit, rc, err)
            assert (rc == 0 and same(out, flipstore["images"][first])) or (rc == 3 and not out.exists()), \
                (kind, byte, bit, rc)
            if out.exists():
                out.unlink()
            rc, vout, err = run("verify", "--store", url, "--endpoint", endpoint)
            assert rc == 3, (kind, byte, bit, rc, vout, err)
            caught += 1
        s3.put_object(Bucket=bucket, Key=key, Body=orig)
    print(f"\nflips: on S3: {tried} tried, {caught} caught, {tried - caught} silent")
    assert run("verify", "--store", url, "--endpoint", endpoint)[0] == 0
