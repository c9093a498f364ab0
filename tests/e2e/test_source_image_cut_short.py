"""An image cut short (its partition table claims more than the file holds), as a user meets
it: `alike backup` warns on stderr and in --json, the version keeps the note, and `alike files
parts` says the partition runs past the end of the disk."""
from __future__ import annotations

import json

from tests import images

MiB = images.MiB


def test_cut_short_image_backup_warns_and_parts_says_so(alike, tmp_path):
    store = str(tmp_path / "ads")
    alike("init", "--store", store, check=True)
    import os

    lib = os.path.dirname(os.__file__)
    tree = images.tree(str(tmp_path / "tree"), MiB, [f"{lib}/json"])
    img = images.ext4_image(str(tmp_path / "office.raw"), 64, tree, "office")  # ext4 in partition 1
    with open(img, "r+b") as f:  # an interrupted copy
        f.truncate(20 * MiB)

    p = alike("backup", "--store", store, f"image:{img}", "--json", check=True)
    r = json.loads(p.stdout)
    [note] = r["notes"]
    assert "looks cut short" in note and "partition 1 ends at 64.0 MiB" in note
    assert f"alike: warning: office: {note}" in p.stderr.splitlines()
    assert r["logical_bytes"] == 20 * MiB

    p = alike("files", "--store", store, "office", "parts", check=True)
    assert ("warning: partition 1 runs 44.0 MiB past the end of the disk (20.0 MiB): the disk image was cut short"
            in p.stdout), p.stdout
    parts = json.loads(alike("files", "--store", store, "office", "parts", "--json", check=True).stdout)
    [part] = parts["disks"][0]["partitions"]
    assert part["filesystem"] == "ext4" and part["past_end"] == 64 * MiB - 20 * MiB  # it ends at 64 MiB
