"""prune, pin, gc and verify's modes on a store on S3 (the moto server, reached through the
logging proxy of tests/faultproxy.py with no faults): the same results as on a directory, and
gc downloads no pack but those it repacks (it reads the index, the manifests and one listing)."""
from __future__ import annotations

import os
import subprocess
import uuid

import boto3

from storage.store import Store
from tests.faultproxy import FaultProxy


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def test_prune_pin_gc_verify_on_s3(alike, corpus, s3_server, tmp_path):
    from pipelines.restore import run_restore
    from pipelines.verify import run_verify

    bucket = f"maint-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    px = FaultProxy(s3_server, rate=0.0).start()
    try:
        url = f"s3://{bucket}/ads"
        ep = ["--endpoint", px.endpoint]
        spec = {"url": url, "endpoint": px.endpoint, "profile": None}
        alike.json("init", "--store", url, *ep, "--block-size", "64K")
        v1 = alike.json("backup", "--store", url, *ep, f"image:{corpus['web']}", "--name", "web")
        v2 = alike.json("backup", "--store", url, *ep, f"image:{corpus['web_day2']}", "--name", "web")
        db = alike.json("backup", "--store", url, *ep, f"image:{corpus['db']}", "--name", "db")
        db2 = alike.json("backup", "--store", url, *ep, f"image:{corpus['web']}", "--name", "db")
        # mix: its first version's pack will be half dead (2 of 4 MiB rewritten): a repack
        from tests import images

        mix1 = images.random_image(tmp_path / "mix1.raw", 4)
        mix2 = tmp_path / "mix2.raw"
        subprocess.run(["cp", mix1, mix2], check=True)
        with open(mix2, "r+b") as f:
            f.write(os.urandom(2 << 20))
        m1 = alike.json("backup", "--store", url, *ep, f"image:{mix1}", "--name", "mix")
        m2 = alike.json("backup", "--store", url, *ep, f"image:{mix2}", "--name", "mix")

        # pins hold against prune; unpinned, the version goes
        alike.json("pin", f"web@{v1['version']}", "--store", url, *ep, "--note", "keep")
        rep = alike.json("prune", "--store", url, *ep, "--keep-last", "1")
        assert sorted(rep["removed"]) == sorted([f"db@{db['version']}", f"mix@{m1['version']}"])
        alike.json("unpin", f"web@{v1['version']}", "--store", url, *ep)
        rep = alike.json("prune", "--store", url, *ep, "--vm", "web", "--keep-last", "1")
        assert rep["removed"] == [f"web@{v1['version']}"]
        left = Store.open(spec).list_versions()
        assert sorted(left) == sorted([("web", v2["version"]), ("db", db2["version"]), ("mix", m2["version"])])

        # gc: db's first version was all its own blocks (dead packs), web's first shares most
        px.log.clear()
        g = alike.json("gc", "--store", url, *ep, "--grace", "0", "--repack-below", "0.99")
        assert g["packs_deleted"] >= 1 and g["packs_repacked"] >= 1
        pack_gets = {path for method, path, ranged, _ in px.log if method == "GET" and "/packs/" in path}
        assert len(pack_gets) == g["packs_repacked"], (pack_gets, g)
        deletes = {path for method, path, _, _ in px.log if method == "DELETE" and "/packs/" in path}
        assert len(deletes) == g["packs_deleted"]
        again = alike.json("gc", "--store", url, *ep, "--grace", "0", "--repack-below", "0.99")
        assert again["packs_deleted"] == 0 and again["packs_repacked"] == 0

        # verify's modes; then everything left restores byte-identical
        full = alike.json("verify", "--store", url, *ep)
        assert full["ok"] and full["packs_checked"] >= 1
        recent = alike.json("verify", "--store", url, *ep, "--older-than", "1d")
        assert recent["ok"] and recent["packs_checked"] == 0
        sample = alike.json("verify", "--store", url, *ep, "--sample", "50%")
        assert sample["ok"] and 1 <= sample["packs_checked"] <= full["packs_checked"]
        assert run_verify(spec)["ok"]
        for vm, v, src in (("web", v2["version"], corpus["web_day2"]), ("db", db2["version"], corpus["web"]),
                           ("mix", m2["version"], mix2)):
            out = tmp_path / f"{vm}.raw"
            run_restore(spec, vm, v, [str(out)])
            assert same(out, src), vm
    finally:
        px.stop()
