"""The crash matrix of prune: kill -9 at each point of `alike prune` (after it locks, before
each VM, before and after each version it removes, and between a version's version.json and
its manifests); then `verify` passes, every version still listed is whole and restores
byte-identical, the next prune completes, and gc then reclaims what the cut prune left.

The versions to prune are copies of one real version per VM under earlier ids (a directory
store; the same blocks, so each restores to the same image) — made by copying folders, not by
backups, so that the suite stays fast."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.matrix import cases

from storage.store import Store
from tests import images
from tests.conftest import CLI

IDS = ["20260101-000000-000", "20260201-000000-000", "20260301-000000-000"]


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


@pytest.fixture(scope="module")
def base(ray_address, tmp_path_factory):
    d = tmp_path_factory.mktemp("prunecrash")
    alike = CLI(ray_address, d)
    store = d / "ads"
    alike.json("init", "--store", store, "--block-size", "64K")
    imgs = {}
    for vm, mib in (("web", 3), ("db", 2)):
        imgs[vm] = images.random_image(d / f"{vm}.raw", mib)
        v = alike.json("backup", "--store", store, f"image:{imgs[vm]}", "--name", vm)
        for vid in IDS:  # older versions of the same content
            dst = store / "versions" / vm / vid
            shutil.copytree(store / "versions" / vm / v["version"], dst)
    return store, imgs


POINTS = (["prune-locked", "prune-vm:1", "prune-vm:2"]
          + [f"prune-removing:{n}" for n in range(1, 7)]
          + [f"prune-version-json:{n}" for n in range(1, 7)]
          + [f"prune-removed:{n}" for n in (1, 2, 3, 4, 5, 6)])


CI_PRUNE = {"prune-locked", "prune-vm:1", "prune-removing:1", "prune-removing:4", "prune-version-json:2",
            "prune-version-json:6", "prune-removed:3"}


@pytest.mark.parametrize("point", cases(POINTS, CI_PRUNE))
def test_prune_killed(alike, base, tmp_path, point):
    from pipelines.restore import run_restore
    from pipelines.verify import run_verify

    store = tmp_path / "ads"
    shutil.copytree(base[0], store)
    p = alike("prune", "--store", store, "--keep-last", "1", env={"ALIKE_CRASH_AT": point})
    assert p.returncode == -9, (p.returncode, p.stderr)

    def whole():
        rep = run_verify(str(store))
        assert rep["ok"], rep
        st = Store.open(str(store))
        for vm, v in st.list_versions():
            out = tmp_path / f"{vm}-{v}.raw"
            run_restore(str(store), vm, v, [str(out)], force=True)
            assert same(out, base[1][vm]), (vm, v)
            out.unlink()
        return st.list_versions()

    left = whole()
    assert 2 <= len(left) <= 8
    rep = alike.json("prune", "--store", store, "--keep-last", "1")
    assert len(rep["removed"]) == len(left) - 2
    assert len(whole()) == 2
    # what the cut prune left (a folder without version.json) goes with the next gc
    alike.json("gc", "--store", store, "--grace", "0")
    folders = [f for vm in ("web", "db") for f in os.listdir(store / "versions" / vm)
               if os.listdir(store / "versions" / vm / f)]
    assert len(folders) == 2, folders
    assert len(whole()) == 2
