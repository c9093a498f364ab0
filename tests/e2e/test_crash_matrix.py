"""The crash matrix of backup and vault (gc's is in test_gc.py, prune's in test_prune_crash.py):
kill -9 at one point of the operation (the driver, the snapshot actor's worker, a read or copy
task's worker, an index shard), then: `verify` passes, no committed version is damaged or
partial, and running the operation again completes with byte-identical restores.

Packs are made small ($ALIKE_PACK_TARGET = 1 MiB) so that a few MiB of data give several
packs, and the n-th pack is a point of its own."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from storage.store import Store
from tests import images
from tests.matrix import cases
from tests.conftest import CLI

SMALL = {"ALIKE_PACK_TARGET": str(1 << 20)}


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


@pytest.fixture(scope="module")
def base(ray_address, tmp_path_factory):
    """img1: 6 MiB of random data in a 16 MiB disk; img2: img1 with 5 MiB rewritten; other: a
    second VM. The store holds vm@img1 (for the backup cases); `full` holds vm@img1, vm@img2 and
    other@other (for the vault cases)."""
    d = tmp_path_factory.mktemp("crash")
    alike = CLI(ray_address, d)
    img1 = d / "img1.raw"
    images.random_image(d / "data.raw", 6)
    subprocess.run(["cp", "--sparse=always", d / "data.raw", img1], check=True)
    os.truncate(img1, 16 << 20)
    img2 = d / "img2.raw"
    subprocess.run(["cp", "--sparse=always", img1, img2], check=True)
    with open(img2, "r+b") as f:
        f.seek(1 << 20)
        f.write(os.urandom(5 << 20))
    other = images.random_image(d / "other.raw", 4)
    store = d / "ads"
    alike.json("init", "--store", store, "--block-size", "64K")
    v1 = alike.json("backup", "--store", store, f"image:{img1}", "--name", "vm", env=SMALL)
    full = d / "full"
    shutil.copytree(store, full)
    v2 = alike.json("backup", "--store", full, f"image:{img2}", "--name", "vm", env=SMALL)
    o = alike.json("backup", "--store", full, f"image:{other}", "--name", "other", env=SMALL)
    return {"store": store, "full": full, "img1": img1, "img2": img2,
            "sources": {("vm", v1["version"]): img1, ("vm", v2["version"]): img2, ("other", o["version"]): other}}


def check_store(spec, sources: dict, tmp_path, latest_vm_img=None) -> list:
    """verify is ok and every committed version restores byte-identical to what it was made
    from (`latest_vm_img`: for versions of vm not in `sources`, made by the crashed run)."""
    from pipelines.restore import run_restore
    from pipelines.verify import run_verify

    rep = run_verify(spec)
    assert rep["ok"], rep
    st = Store.open(spec)
    versions = st.list_versions()
    for vm, v in versions:
        src = sources.get((vm, v)) or (latest_vm_img if vm == "vm" else None)
        assert src is not None, f"unexpected version {vm}@{v}"
        out = tmp_path / f"r-{vm}-{v}.raw"
        run_restore(spec, vm, v, [str(out)], force=True)
        assert same(out, src), (vm, v)
        out.unlink()
    return versions


# (point, whose process dies, the run completes anyway: a retried task)
BACKUP_POINTS = [
    ("backup-locked", "driver", False), ("backup-dispatched", "driver", False),
    ("backup-result", "driver", False), ("index-loaded", "index shard", False),
    ("after-snapshot", "snapshot actor", False), ("after-previous", "snapshot actor", False),
    ("absorbed:1", "snapshot actor", False),
    # packs are written by the read tasks: a task killed after its pack (a retry claims the
    # blocks again and writes them anew) or after committing it to the index shards (a retry
    # finds them in this run's packs, and the version copies their entries into its segments)
    ("after-pack:1", "read task", True), ("after-pack:2", "read task", True),
    ("pack-committed:1", "read task", True), ("pack-committed:3", "read task", True),
    ("disk-done", "snapshot actor", False),
    ("after-settle", "snapshot actor", False), ("before-segments", "snapshot actor", False),
    ("before-manifests", "snapshot actor", False), ("manifest", "snapshot actor", False),
    ("before-version", "snapshot actor", False), ("before-commit", "snapshot actor", False),
    ("after-version", "snapshot actor", False),
    ("read-task:1", "read task", True),
]


CI_BACKUP = {"backup-locked", "index-loaded", "after-snapshot", "after-pack:1", "pack-committed:1", "before-segments",
             "manifest", "before-commit", "after-version"}


@pytest.mark.parametrize("point,who,completes", cases(BACKUP_POINTS, CI_BACKUP))
def test_backup_killed(alike, base, tmp_path, point, who, completes):
    store = tmp_path / "ads"
    shutil.copytree(base["store"], store)
    env = dict(SMALL, ALIKE_CRASH_AT=point)
    if completes:
        env["ALIKE_CRASH_FLAG"] = str(tmp_path / "crashed-once")
    p = alike("backup", "--store", store, f"image:{base['img2']}", "--name", "vm", env=env)
    assert "Traceback" not in p.stderr
    if completes:
        assert p.returncode == 0, p.stderr
        assert (tmp_path / "crashed-once").exists()
    elif who == "driver":
        assert p.returncode == -9
    else:
        assert p.returncode != 0 or point == "after-version", p.stderr
    before = check_store(str(store), base["sources"], tmp_path, base["img2"])
    assert len(before) in (1, 2)
    again = alike.json("backup", "--store", store, f"image:{base['img2']}", "--name", "vm", env=SMALL)
    assert again["version"] not in {v for _, v in before}
    after = check_store(str(store), base["sources"], tmp_path, base["img2"])
    assert len(after) == len(before) + 1


VAULT_POINTS = [
    ("vault-locked", "driver"), ("vault-planned", "driver"),
    ("vault-task:1", "copy task"), ("vault-pack:1", "copy task"), ("vault-pack:2", "copy task"),
    ("vault-pack:4", "copy task"), ("vault-segments:1", "copy task"),
    ("vault-commit:1", "driver"), ("vault-commit:2", "driver"), ("vault-commit:3", "driver"),
    ("vault-manifest:1", "driver"), ("vault-manifest:2", "driver"),
    ("vault-committed:1", "driver"), ("vault-committed:2", "driver"), ("vault-committed:3", "driver"),
    ("restart:vault-commit:2", "driver"),
]
S3_VAULT_POINTS = [("vault-pack:2", "copy task"), ("vault-segments:1", "copy task"),
                   ("vault-manifest:1", "driver"), ("vault-commit:2", "driver")]


def _vault_case(alike, base, tmp_path, point, target, target_args, target_spec):
    """Kill the vault at `point`, then: the target's committed versions are whole, a re-run
    copies the rest, and everything restores byte-identical from the target."""
    ads = tmp_path / "ads"
    shutil.copytree(base["full"], ads)
    if point.startswith("restart:"):  # killed once, then killed again in the re-run
        point = point.split(":", 1)[1]
        p = alike("vault", "--store", ads, "--to", target, *target_args, env=dict(SMALL, ALIKE_CRASH_AT=point))
        assert p.returncode != 0
    p = alike("vault", "--store", ads, "--to", target, *target_args, env=dict(SMALL, ALIKE_CRASH_AT=point))
    assert "Traceback" not in p.stderr
    assert p.returncode != 0, p.stdout
    partial = check_store(target_spec, base["sources"], tmp_path) if _is_store(target_spec) else []
    rep = alike.json("vault", "--store", ads, "--to", target, *target_args, env=SMALL)
    assert rep["versions_copied"] + rep["versions_present"] == 3
    assert rep["versions_present"] == len(partial)
    done = check_store(target_spec, base["sources"], tmp_path)
    assert len(done) == 3


def _is_store(spec) -> bool:
    from storage.errors import StoreError

    try:
        Store.open(spec)
        return True
    except StoreError:
        return False


CI_VAULT = {"vault-planned", "vault-pack:2", "vault-segments:1", "vault-manifest:1", "vault-committed:2",
            "restart:vault-commit:2"}
CI_S3_VAULT = {"vault-pack:2", "vault-manifest:1"}


@pytest.mark.parametrize("point,who", cases(VAULT_POINTS, CI_VAULT))
def test_vault_killed(alike, base, tmp_path, point, who):
    ods = tmp_path / "ods"
    _vault_case(alike, base, tmp_path, point, ods, [], str(ods))


@pytest.mark.parametrize("point,who", cases(S3_VAULT_POINTS, CI_S3_VAULT))
def test_vault_to_s3_killed(alike, base, tmp_path, s3_bucket, point, who):
    endpoint, bucket = s3_bucket
    url = f"s3://{bucket}/ods"
    _vault_case(alike, base, tmp_path, point, url, ["--to-endpoint", endpoint],
                {"url": url, "endpoint": endpoint, "profile": None})
