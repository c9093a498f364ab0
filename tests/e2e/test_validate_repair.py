"""Validation modes of `alike verify` (all, --sample, --older-than) and the corruption suite:
each kind of damage injected into an ADS (directory) or an ODS (S3 server), found by verify,
refused by restore, healed by `alike repair --from` the other store, after which verify is ok
and every version restores byte-identical.

Most commands run in this process through `alike_ray.cli.main` (the same parser, the same
exit codes and output, on the session's Ray), so the suite costs no process start per command;
a few run as real `alike` processes."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

from tests import images
from tests.matrix import cases

RESULTS: dict[str, dict] = {}  # case -> {"injected", "found", "repaired"} (printed at the end)


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def run(*argv):
    """`alike ARGV` in this process -> (exit code, stdout, stderr)."""
    import time

    from alike_ray import cli, ui

    t0 = time.monotonic()

    outb, errb = io.StringIO(), io.StringIO()
    old = ui._OUT
    ui._OUT = outb
    try:
        with contextlib.redirect_stderr(errb), mock.patch.object(cli, "_guard_stdout", lambda: None):
            rc = cli.main([str(a) for a in argv])
    finally:
        ui._OUT = old
        if os.environ.get("ALIKE_TEST_TIMES"):
            print(f"  {time.monotonic() - t0:6.2f}s alike {' '.join(map(str, argv))[:100]}", file=sys.__stderr__)
    return rc, outb.getvalue(), errb.getvalue()


def rjson(*argv, rc=0):
    code, out, err = run(*argv, "--json")
    assert code == rc, (argv, code, err, out)
    return json.loads(out)


def backend(spec):
    from storage.backend import open_backend

    return open_backend(spec)


def store_args(spec) -> list:
    if isinstance(spec, dict):
        return ["--store", spec["url"], "--endpoint", spec["endpoint"]]
    return ["--store", spec]


def from_args(spec) -> list:
    if isinstance(spec, dict):
        return ["--from", spec["url"], "--from-endpoint", spec["endpoint"]]
    return ["--from", spec]


# -- validation modes -----------------------------------------------------------------------------
def test_verify_modes(base, alike, tmp_path):
    store = str(tmp_path / "ads")
    shutil.copytree(base["ads"], store)  # two versions of one VM, never verified
    rnd = images.random_image(str(tmp_path / "db.raw"), 8)
    rjson("backup", "--store", store, f"image:{rnd}", "--name", "db")
    full = rjson("verify", "--store", store)
    n = full["packs_total"]
    assert full["ok"] and full["mode"] == "all" and full["packs_checked"] == n >= 3
    assert full["bytes_read"] > 0 and full["seconds"] > 0 and full["mb_per_s"] > 0
    assert full["versions"] == 3 and full["blocks_checked"] > 0 and full["broken"] == []
    assert full["validation_recorded"].startswith("validation/")

    # right after a full verify, nothing is older than a day
    rep = rjson("verify", "--store", store, "--older-than", "1d")
    assert rep["ok"] and rep["mode"] == "older-than" and rep["packs_checked"] == 0 and rep["packs_total"] == n
    # a new backup: only its packs were never validated
    rnd = images.random_image(str(tmp_path / "new.raw"), 8)
    new = rjson("backup", "--store", store, f"image:{rnd}", "--name", "new")
    rep = rjson("verify", "--store", store, "--older-than", "30d")
    assert rep["ok"] and rep["packs_checked"] == new["packs"] >= 1 and rep["packs_total"] == n + new["packs"]
    # ...and once validated they are skipped too
    assert rjson("verify", "--store", store, "--older-than", "12h")["packs_checked"] == 0

    # a sample of half the packs, through a real `alike` process
    total = n + new["packs"]
    p = alike("verify", "--store", store, "--sample", "50%", "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["mode"] == "sample" and rep["sample_percent"] == 50 and rep["packs_total"] == total
    assert abs(rep["packs_checked"] - total / 2) <= 0.5 and 0 < rep["blocks_checked"] < full["blocks_checked"] + 1000
    code, text, _ = run("verify", "--store", store, "--sample", "50%")
    assert code == 0 and f"sample of the {total} packs in use" in text and "MB/s" in text

    # one validation object per run that found packs intact (none for the runs that checked 0)
    vals = sorted(os.listdir(os.path.join(store, "validation")))
    assert len(vals) == 4

    # bad values are refused clearly
    for args, words in ((["--sample", "0%"], "percentage"), (["--sample", "x"], "percentage"),
                        (["--older-than", "soon"], "30d"), (["--sample", "5%", "--older-than", "1d"], "not both")):
        code, _, err = run("verify", "--store", store, *args)
        assert code == 2 and words in err and "Traceback" not in err, (args, err)

    # a flipped byte in a pack is found by a full verify (not by --older-than: it was validated)
    from storage.pack import pack_key, read_footer

    b = backend(store)
    pack = max(b.list("packs/"), key=b.size).rsplit("/", 1)[1]
    _flip(b, pack_key(pack), _block_offset(b, pack, 2))
    assert rjson("verify", "--store", store, "--older-than", "1d")["packs_checked"] == 0
    rep = rjson("verify", "--store", store, rc=3)
    assert not rep["ok"] and rep["damaged_blocks"] == 1 and rep["broken"]
    assert read_footer(b, pack) is not None  # the footer is intact: a block was damaged


# -- the corruption suite ---------------------------------------------------------------------------
def _flip(b, key, pos):
    data = bytearray(b.get(key))
    pos = pos % len(data)
    data[pos] ^= 0x5A
    b.put(key, bytes(data))


def _truncate(b, key, frac=0.6):
    data = b.get(key)
    b.put(key, data[:int(len(data) * frac)])


def _block_offset(b, pack, n):
    from storage.pack import read_footer

    f = read_footer(b, pack)
    n = min(n, len(f) - 1)
    return int(f["offset"][n]) + int(f["length"][n]) // 2


def _footer_offset(b, pack):
    from storage.pack import FOOTER_DTYPE, TRAILER, pack_key

    size = b.size(pack_key(pack))
    flen = TRAILER.unpack(b.get_range(pack_key(pack), size - TRAILER.size, TRAILER.size))[0]
    return size - TRAILER.size - flen + FOOTER_DTYPE.itemsize + 33  # inside the 2nd record's offset


def _biggest(b, prefix):
    return max((k for k in b.list(prefix) if not k.rsplit("/", 1)[1].startswith(".")), key=b.size)


def inject(spec, kind, versions):
    """Damage the store -> what the damage is to be found as: ('pack', id), ('segment', key),
    ('disk', vm, version) or ('version', vm, version)."""
    from storage.pack import pack_key

    b = backend(spec)
    what, how = kind.split(":")
    v1, v2 = versions
    if what == "pack":
        key = _biggest(b, "packs/")
        pack = key.rsplit("/", 1)[1]
        if how == "flip-block":
            _flip(b, key, _block_offset(b, pack, 3))
        elif how == "flip-block-first":
            _flip(b, key, _block_offset(b, pack, 0))
        elif how == "flip-footer":
            _flip(b, key, _footer_offset(b, pack))
        elif how == "flip-trailer":
            _flip(b, key, -3)
        elif how == "truncate":
            _truncate(b, key)
        elif how == "delete":
            b.delete(pack_key(pack))
        return ("pack", pack)
    if what == "segment":
        key = _biggest(b, "index/")
        if how == "flip":
            _flip(b, key, b.size(key) // 2)
        elif how == "truncate":
            _truncate(b, key, 0.5)
        elif how == "delete":
            b.delete(key)
        return ("segment", key)
    if what == "manifest":
        key = f"versions/web/{v1}/disk-0.parquet"
        if how == "flip":
            _flip(b, key, b.size(key) // 2)
        elif how == "truncate":
            _truncate(b, key, 0.5)
        elif how == "delete":
            b.delete(key)
        return ("disk", "web", v1)
    if what == "version":
        key = f"versions/web/{v2}/version.json"
        if how == "truncate":
            _truncate(b, key, 0.5)
        elif how == "flip":
            _flip(b, key, 0)
        return ("version", "web", v2)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def base(ray_address, corpus, s3_server, tmp_path_factory):
    """One ADS (a directory) with two versions of one VM, vaulted to an ODS directory and to an
    ODS on the S3 server. Cases copy the store they damage."""
    import boto3

    d = tmp_path_factory.mktemp("base")
    ads, ods_dir = str(d / "ads"), str(d / "ods")
    bucket = "validate-repair-base"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    ods_s3 = {"url": f"s3://{bucket}/ods", "endpoint": s3_server, "profile": None}
    rjson("init", "--store", ads, "--block-size", "128K")
    v1 = rjson("backup", "--store", ads, f"image:{corpus['web']}", "--name", "web")["version"]
    v2 = rjson("backup", "--store", ads, f"image:{corpus['web_day2']}", "--name", "web")["version"]
    rjson("vault", "--store", ads, "--to", ods_dir)
    rjson("vault", *store_args({"url": ads, "endpoint": s3_server}), "--to", ods_s3["url"])
    images_of = {v1: corpus["web"], v2: corpus["web_day2"]}
    return {"ads": ads, "ods_dir": ods_dir, "ods_s3": ods_s3, "bucket": bucket, "endpoint": s3_server,
            "versions": (v1, v2), "images": images_of}


def _copy_store(base, which, dst_dir, name):
    if which == "ads":
        dst = str(dst_dir / "ads")
        shutil.copytree(base["ads"], dst)
        return dst
    import boto3

    s3 = boto3.client("s3", endpoint_url=base["endpoint"])
    pfx = f"cases/{name}"
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=base["bucket"], Prefix="ods/"):
        for o in page.get("Contents", []):
            s3.copy_object(Bucket=base["bucket"], Key=pfx + o["Key"][len("ods"):],
                           CopySource={"Bucket": base["bucket"], "Key": o["Key"]})
    return {"url": f"s3://{base['bucket']}/{pfx}", "endpoint": base["endpoint"], "profile": None}


# (damaged store, the other store, kind of damage)
CASES = [
    ("ads", "ods_s3", "pack:flip-block"),
    ("ads", "ods_s3", "pack:flip-block-first"),
    ("ads", "ods_s3", "pack:flip-footer"),
    ("ads", "ods_dir", "pack:flip-trailer"),
    ("ads", "ods_dir", "pack:truncate"),
    ("ads", "ods_s3", "pack:delete"),
    ("ads", "ods_dir", "segment:flip"),
    ("ads", "ods_s3", "segment:truncate"),
    ("ads", "ods_dir", "segment:delete"),
    ("ads", "ods_s3", "manifest:flip"),
    ("ads", "ods_dir", "manifest:truncate"),
    ("ads", "ods_s3", "manifest:delete"),
    ("ads", "ods_dir", "version:truncate"),
    ("ods_s3", "ads", "pack:flip-block"),
    ("ods_s3", "ads", "pack:delete"),
    ("ods_s3", "ads", "segment:truncate"),
    ("ods_s3", "ads", "manifest:delete"),
]


CI_CASES = {"ads-pack:flip-block", "ads-pack:flip-footer", "ads-pack:truncate", "ads-pack:delete", "ads-segment:flip",
            "ads-segment:delete", "ads-manifest:flip", "ads-manifest:delete", "ads-version:truncate",
            "ods_s3-pack:flip-block", "ods_s3-manifest:delete"}


@pytest.mark.parametrize("damaged,other,kind", cases(CASES, CI_CASES, ids=[f"{a}-{k}" for a, _, k in CASES]))
def test_corruption_found_refused_repaired(base, tmp_path, damaged, other, kind):
    name = f"{damaged}-{kind}".replace(":", "-")
    store = _copy_store(base, damaged, tmp_path, name)
    healthy = base[other]
    v1, v2 = base["versions"]
    RESULTS[name] = {"injected": 1, "found": 0, "repaired": 0}
    target = inject(store, kind, base["versions"])
    sa = store_args(store)

    # verify finds it and names it
    code, out, err = run("verify", *sa, "--json")
    assert code == 3, (code, err, out)
    rep = json.loads(out)
    broken = {(b["vm"], b["version"]) for b in rep["broken"]}
    problems = " ".join(rep["problems"])
    if target[0] == "pack":
        assert target[1] in problems or broken, rep
    elif target[0] == "segment":
        assert target[1] in problems or broken, rep
        assert target[1] in rep["damaged_segments"] or broken
    else:
        assert (target[1], target[2]) in broken, rep
    if not isinstance(store, dict):  # the text report too (the JSON one is the same on S3)
        code, text, _ = run("verify", *sa)
        assert code == 3 and ("DAMAGED: web@" in text or "problem:" in text)
    RESULTS[name]["found"] = 1

    # restore of a broken version refuses, writes nothing
    for vm, v in sorted(broken)[:1]:
        to = tmp_path / "refused.raw"
        code, _, err = run("restore", *sa, f"{vm}@{v}", "--to", to)
        assert code == 3, (code, err)
        if kind == "manifest:delete":
            assert "manifest" in err and "missing" in err, err
        assert "Traceback" not in err and err.strip().startswith("alike: error:")
        assert not to.exists() and not [f for f in os.listdir(tmp_path) if f.startswith("refused")]

    # a dry run changes nothing
    before = _snapshot(store)
    dry = rjson("repair", *sa, *from_args(healthy), "--dry-run")
    assert dry["dry_run"] and dry["ok"], dry
    assert _snapshot(store) == before

    # repair from the other store heals it
    rep = rjson("repair", *sa, *from_args(healthy))
    assert rep["ok"] and not rep["unrepairable"], rep
    assert rjson("verify", *sa)["ok"]
    for v in (v1, v2):
        to = tmp_path / f"web-{v}.raw"
        rjson("restore", *sa, f"web@{v}", "--to", to)
        assert same(to, base["images"][v]), v
    RESULTS[name]["repaired"] = 1
    if isinstance(store, dict):
        return
    # and a second repair has nothing to do
    again = rjson("repair", *sa, *from_args(healthy))
    assert again["blocks_fetched"] == 0 and not again["metadata_copied"] and not again["broken_before"]


def _snapshot(spec):
    b = backend(spec)
    return {k: n for k, n in b.sizes("").items() if not k.startswith("locks/")}


def test_repair_refusals_and_unrepairable(base, alike, tmp_path):
    # a store with another hash key is refused, naming both
    other = str(tmp_path / "other")
    rjson("init", "--store", other, "--block-size", "128K")
    store = _copy_store(base, "ads", tmp_path, "refusals")
    p = alike("repair", "--store", store, "--from", other)
    assert p.returncode == 2 and "different hash keys" in p.stderr and "Traceback" not in p.stderr
    code, _, err = run("repair", "--store", store, "--from", store)
    assert code == 2 and "same store" in err
    # damage in both copies: reported as unrepairable, exit 3; the rest is still healed
    v1, v2 = base["versions"]
    ods = str(tmp_path / "ods")
    shutil.copytree(base["ods_dir"], ods)
    inject(ods, "pack:delete", base["versions"])
    inject(store, "pack:delete", base["versions"])
    rep = rjson("repair", "--store", store, "--from", ods, rc=3)
    assert rep["unrepairable"] and any("web@" in u["what"] for u in rep["unrepairable"])
    p = alike("repair", "--store", store, "--from", ods)
    assert p.returncode == 3 and "UNREPAIRABLE: web@" in p.stdout and "Traceback" not in p.stderr
    # a second maintenance job on the same store is refused while one holds the lock
    from storage.locks import store_lock

    lock = store_lock(backend(store), "maintenance", "gc")
    try:
        code, _, err = run("repair", "--store", store, "--from", base["ods_dir"])
        assert code == 2 and "gc" in err and "running" in err
    finally:
        lock.release()
    code, out, err = run("repair", "--store", store, "--from", base["ods_dir"], "--json")
    assert code == 0, err


def test_repair_copy_worker_dies(base, alike, tmp_path):
    """A block copy task whose worker keeps dying (killed at its start on every retry): repair
    ends with one `alike: error:` line, no traceback, exit 1; the store is unchanged (the damage
    is still found, nothing hidden or made worse) and a repair that is let run heals it."""
    store = _copy_store(base, "ads", tmp_path, "worker-dies")
    inject(store, "pack:flip-block", base["versions"])
    code, out, err = run("verify", "--store", store, "--json")
    assert code == 3, (code, err)
    broken = json.loads(out)["broken"]
    assert broken
    before = _snapshot(store)
    p = alike("repair", "--store", store, "--from", base["ods_dir"], env={"ALIKE_CRASH_AT": "repair-task"})
    assert "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("alike: error:")]
    assert len(errors) == 1 and "worker died" in errors[0] and "run the repair again" in errors[0], p.stderr
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "repaired" not in p.stdout
    assert _snapshot(store) == before  # every attempt died before it wrote anything
    code, out, err = run("verify", "--store", store, "--json")
    assert code == 3, (code, err)
    assert json.loads(out)["broken"] == broken
    assert not list(backend(store).list("locks/"))  # the maintenance lock was released
    rep = rjson("repair", "--store", store, "--from", base["ods_dir"])
    assert rep["ok"] and rep["blocks_fetched"], rep
    assert rjson("verify", "--store", store)["ok"]


def test_zz_corruption_figures(capsys):
    """Print the suite's figures (injected / found / repaired) for the report."""
    inj = sum(r["injected"] for r in RESULTS.values())
    found = sum(r["found"] for r in RESULTS.values())
    rep = sum(r["repaired"] for r in RESULTS.values())
    with capsys.disabled():
        print(f"\ncorruption suite: {found} found of {inj} injected, {rep} repaired "
              f"({', '.join(k for k, r in RESULTS.items() if not r['found']) or 'none missed'})")
    if RESULTS:
        assert found == inj


def test_validation_records_are_append_only_and_compacted(tmp_path, monkeypatch):
    """Each run adds one object; past COMPACT_AT a run writes a summary (latest time per pack)
    and deletes what it read, so readers always see every pack's last validation."""
    from pipelines import verify
    from storage.store import Store

    st = Store.init(str(tmp_path / "s"))
    monkeypatch.setattr(verify, "COMPACT_AT", 4)
    for i in range(4):
        verify.record_validations(st, [f"p{i}", "common"], now=1000.0 + i)
    assert len(list(st.backend.list("validation/"))) == 4
    last, _ = verify.read_validations(st)
    assert last == {"p0": 1000.0, "p1": 1001.0, "p2": 1002.0, "p3": 1003.0, "common": 1003.0}
    verify.record_validations(st, ["p0"], now=2000.0)  # the 5th: compacted into one
    keys = list(st.backend.list("validation/"))
    assert len(keys) == 1
    last2, _ = verify.read_validations(st)
    assert last2 == dict(last, p0=2000.0)
    # a damaged record only makes packs look less recently validated
    st.backend.put("validation/zz-torn.parquet", b"PAR1 torn")
    assert verify.read_validations(st)[0] == last2
