"""Vault between a local store (ADS) and S3 (ODS), both ways, against a real S3 HTTP server."""
from __future__ import annotations

import subprocess

from tests.conftest import tree_digest


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def test_vault_ads_to_ods_and_back(alike, corpus, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    ads, ods = tmp_path / "ads", f"s3://{bucket}/offsite"
    e = ["--endpoint", endpoint]
    alike.json("init", "--store", ads, "--block-size", "64K")
    w1 = alike.json("backup", "--store", ads, f"image:{corpus['web']}", "--name", "web")
    w2 = alike.json("backup", "--store", ads, f"image:{corpus['web_day2']}", "--name", "web")
    db = alike.json("backup", "--store", ads, f"image:{corpus['db']}", "--name", "db")

    # only web first: the target is created with the source's key
    r = alike.json("vault", "--store", ads, "--to", ods, *e, "--vm", "web")
    assert r["versions_copied"] == 2 and r["blocks_copied"] == w1["new_blocks"] + w2["new_blocks"]
    # then everything: web's blocks are there already, only db's travel
    r = alike.json("vault", "--store", ads, "--to", ods, *e)
    assert r["versions_copied"] == 1 and r["versions_present"] == 2
    assert r["blocks_copied"] == db["new_blocks"]
    # a second vault copies nothing
    r = alike.json("vault", "--store", ads, "--to", ods, *e)
    assert r["versions_copied"] == 0 and r["blocks_copied"] == 0 and r["bytes_copied"] == 0

    # the ODS works on its own
    assert alike.json("verify", "--store", ods, *e)["ok"]
    alike.json("restore", "--store", ods, *e, f"web@{w1['version']}", "--to", tmp_path / "w1.raw")
    assert same(tmp_path / "w1.raw", corpus["web"])
    # restore --prefer offsite reads the ODS even though the ADS has the version
    import shutil

    shutil.move(str(ads / "packs"), str(tmp_path / "hidden-packs"))
    alike.json("restore", "--store", ads, *e, "--offsite", ods, "--prefer", "offsite", "db",
               "--to", tmp_path / "db.raw")
    assert same(tmp_path / "db.raw", corpus["db_raw"])
    shutil.move(str(tmp_path / "hidden-packs"), str(ads / "packs"))

    # clone the vault back to a new local store, which works on its own too
    clone = tmp_path / "clone"
    r = alike.json("vault", "--store", ods, *e, "--to", clone)
    assert r["versions_copied"] == 3
    alike.json("restore", "--store", clone, "web", "--to", tmp_path / "w2.raw")
    assert same(tmp_path / "w2.raw", corpus["web_day2"])
    assert alike.json("verify", "--store", clone)["ok"]
    # both keep working: a new backup on the ADS, vaulted right after
    w3 = alike.json("backup", "--store", ads, f"image:{corpus['web']}", "--name", "web", "--vault-to", ods, *e)
    assert w3["vaulted"] is True
    assert len(alike.json("versions", "--store", ods, *e)["versions"]) == 4


def test_vault_refuses_a_store_with_another_key(alike, corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    alike.json("init", "--store", a)
    alike.json("init", "--store", b)
    alike.json("backup", "--store", a, f"image:{corpus['db']}", "--name", "db")
    before = tree_digest(b)
    p = alike("vault", "--store", a, "--to", b)
    assert p.returncode == 2 and "another hash key" in p.stderr and "Traceback" not in p.stderr
    assert tree_digest(b) == before


def test_vault_interrupted_then_resumed(alike, corpus, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    ads, ods = tmp_path / "ads", f"s3://{bucket}/resume"
    e = ["--endpoint", endpoint]
    alike.json("init", "--store", ads, "--block-size", "64K")
    alike.json("backup", "--store", ads, f"image:{corpus['web']}", "--name", "web")
    alike.json("backup", "--store", ads, f"image:{corpus['db']}", "--name", "db")
    # a copy worker killed once: its task is retried and the run completes
    flag = tmp_path / "flag"
    r = alike.json("vault", "--store", ads, "--to", ods, *e, "--vm", "db",
                   env={"ALIKE_CRASH_AT": "vault-pack", "ALIKE_CRASH_FLAG": str(flag)})
    assert flag.exists() and r["versions_copied"] == 1
    # the driver killed (kill -9) after the blocks went up, before any version was committed
    p = alike("vault", "--store", ads, "--to", ods, *e, env={"ALIKE_CRASH_AT": "vault-commit"})
    assert p.returncode != 0
    vers = alike.json("versions", "--store", ods, *e)["versions"]
    assert [v["vm"] for v in vers] == ["db"]  # no partial version of web
    assert alike.json("verify", "--store", ods, *e)["ok"]
    r = alike.json("vault", "--store", ads, "--to", ods, *e)
    assert r["versions_copied"] == 1 and r["blocks_copied"] == 0  # the blocks were already there
    alike.json("restore", "--store", ods, *e, "web", "--to", tmp_path / "w.raw")
    assert same(tmp_path / "w.raw", corpus["web"])


def test_vault_copy_worker_keeps_dying(alike, corpus, tmp_path):
    """Every copy task's worker is killed (on every retry): one error line, exit 1 (the run could
    not finish; not bad input), no traceback, no version in the target; the next vault completes."""
    a, b = tmp_path / "a", tmp_path / "b"
    alike.json("init", "--store", a)
    alike.json("backup", "--store", a, f"image:{corpus['db']}", "--name", "db")
    p = alike("vault", "--store", a, "--to", b, env={"ALIKE_CRASH_AT": "vault-task"})
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("alike: error:")]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert len(errors) == 1 and "worker died" in errors[0] and "run the vault again" in errors[0], p.stderr
    assert alike.json("versions", "--store", b)["versions"] == []
    r = alike.json("vault", "--store", a, "--to", b)
    assert r["versions_copied"] == 1
    alike.json("restore", "--store", b, "db", "--to", tmp_path / "d.raw")
    assert alike.json("verify", "--store", b)["ok"]
