"""A backup on a multi-node Ray cluster (ray.cluster_utils.Cluster): read tasks run on more
than one node, and the version restores byte-identical."""
import json
import os
import subprocess
import sys

from tests import images


def test_read_tasks_spread_over_nodes(tmp_path, corpus, alike):
    store = tmp_path / "ads"
    alike.json("init", "--store", store, "--block-size", "64K")
    # enough data for many read tasks: the ext4 image plus 96 MiB of other data
    img = tmp_path / "web.raw"
    subprocess.run(["cp", "--sparse=always", corpus["web"], img], check=True)
    with open(img, "r+b") as f:
        f.seek(0, 2)
        for _ in range(12):
            f.write(os.urandom(8 * images.MiB))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "multinode_backup.py"),
                        str(store), str(img), str(tmp_path / "out.raw")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    assert rep["nodes"] == 3
    assert "error" not in rep["backup"], rep["backup"]
    assert len(rep["backup"]["read_nodes"]) >= 2, rep["backup"]["read_nodes"]
    assert subprocess.run(["cmp", "-s", img, tmp_path / "out.raw"]).returncode == 0
    assert alike.json("verify", "--store", store)["ok"]
