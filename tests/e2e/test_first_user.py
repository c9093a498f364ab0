"""What a first user trips over (issue 12, part 3), each tried as a new user would, through the
real CLI: gc right after a prune, files ls of NTFS/FAT, two backups of one VM at once, Ctrl-C,
restore targets that cannot take the restore, stats, versions, job preview and retention lines."""
from __future__ import annotations

import json

import pytest

from tests import images


@pytest.fixture
def pruned(alike, tmp_path):
    """A store where a prune just removed a version: its blocks are unused, and their packs
    are younger than gc's default grace period of 1 h. -> the store path."""
    store = tmp_path / "ads"
    alike.json("init", "--store", store, "--block-size", "64K")
    for n in range(2):
        img = images.random_image(tmp_path / f"day{n}.raw", 2)
        alike.json("backup", "--store", store, f"image:{img}", "--name", "vm")
    alike.json("prune", "--store", store, "--keep-last", "1")
    return store


def test_gc_says_what_the_grace_period_spared(alike, pruned):
    p = alike("gc", "--store", pruned, check=True)
    assert "deleted 0 packs" in p.stdout
    line = next(x for x in p.stdout.splitlines() if x.startswith("spared "))
    assert "younger than the --grace period (1h)" in line and "MiB" in line, line
    assert "--grace 0" in line and "no backup, vault or prune is writing" in line and "(in " in line, line

    dry = alike("gc", "--store", pruned, "--dry-run", check=True).stdout
    assert "would spare " in dry

    rep = alike.json("gc", "--store", pruned)
    assert rep["packs_deleted"] == 0 and rep["spared_packs"] >= 1 and rep["spared_bytes"] > 1024 * 1024
    assert rep["grace_seconds"] == 3600
    assert rep["spared_reclaimable_from"] <= rep["spared_reclaimable_by"]

    # what was spared is what --grace 0 deletes
    now = alike.json("gc", "--store", pruned, "--grace", "0")
    assert now["packs_deleted"] == rep["spared_packs"] and now["bytes_deleted"] == rep["spared_bytes"]
    assert now["spared_packs"] == 0
    assert "spared" not in alike("gc", "--store", pruned, check=True).stdout
