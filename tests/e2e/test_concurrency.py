"""Several writers on one store at once: two backups, a vault, a prune and a gc started
together, for several rounds; then every version left restores byte-identical, on the store
and on its vault copy. The rounds are made to race where it hurts: each round's prune removes
the versions whose blocks the next round's backup deduplicates against, while gc condemns
what the prune left unused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from storage.store import Store


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def backdate(store, seconds: float = 7200) -> None:
    """Make every object look older, as in a store used for weeks: gc spares what is younger
    than the oldest writer running."""
    old = time.time() - seconds
    for root, _, files in os.walk(store):
        for f in files:
            os.utime(os.path.join(root, f), (old, old))


def test_backups_vault_prune_gc_at_once(alike, corpus, tmp_path, ray_address):
    from pipelines.restore import run_restore
    from pipelines.verify import run_verify

    ads, ods = tmp_path / "ads", tmp_path / "ods"
    alike.json("init", "--store", ads, "--block-size", "64K")
    sources = {}  # vm@version -> image it was made from
    for vm, img in (("web", corpus["web"]), ("db", corpus["db_raw"])):
        v = alike.json("backup", "--store", ads, f"image:{img}", "--name", vm)
        sources[f"{vm}@{v['version']}"] = img
    # garbage for the first gc: a VM backed up, then its version removed
    from tests import images

    t = alike.json("backup", "--store", ads, f"image:{images.random_image(tmp_path / 'tmp.raw', 2)}", "--name", "tmp")
    Store.open(str(ads)).delete_version("tmp", t["version"])
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    web_imgs = [corpus["web_day2"], corpus["web"], corpus["web_day2"]]
    ops_seen = {"backup": 0, "vault": 0, "prune": 0, "gc": 0}
    gcs, prunes = [], []
    for rnd, web_img in enumerate(web_imgs):
        backdate(ads)
        cmds = {
            "backup-web": ["backup", "--store", ads, f"image:{web_img}", "--name", "web"],
            "backup-db": ["backup", "--store", ads, f"image:{corpus['db']}", "--name", "db"],
            "vault": ["vault", "--store", ads, "--to", ods],
            "prune": ["prune", "--store", ads, "--keep-last", "1"],
            "gc": ["gc", "--store", ads, "--grace", "0", "--repack-below", "0.9", "--wait", "5m"],
        }
        procs = {k: subprocess.Popen([sys.executable, "-m", "alike_ray.cli", *map(str, c), "--json"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for k, c in cmds.items()}
        results = {}
        for k, p in procs.items():
            outs, errs = p.communicate(timeout=600)
            assert p.returncode == 0, (rnd, k, errs)
            assert "Traceback" not in errs
            results[k] = json.loads(outs)
            ops_seen[k.split("-")[0]] += 1
        gcs.append(results["gc"])
        prunes.append(results["prune"])
        for k, img in (("backup-web", web_img), ("backup-db", corpus["db_raw"])):
            rep = results[k]
            rep = rep["results"][0] if "results" in rep else rep
            sources[f"{rep['vm']}@{rep['version']}"] = img

    assert ops_seen == {"backup": 2 * len(web_imgs), "vault": len(web_imgs), "prune": len(web_imgs),
                        "gc": len(web_imgs)}, ops_seen
    # the gcs had work to do while the others ran (the prunes' leftovers), not an empty store
    assert sum(g["packs_deleted"] + g["packs_repacked"] for g in gcs) > 0, gcs
    assert sum(len(p["removed"]) for p in prunes) > 0, prunes
    # the last gc ran with the last backups: one more, alone, finishes and must find all in use
    alike.json("gc", "--store", ads, "--grace", "0")
    for store in (ads, ods):
        rep = run_verify(str(store))
        assert rep["ok"], (store, rep)
        left = Store.open(str(store)).list_versions()
        assert {"web", "db"} <= {vm for vm, _ in left}
        for vm, v in left:
            out = tmp_path / f"r-{vm}-{v}.raw"
            run_restore(str(store), vm, v, [str(out)])
            assert same(out, sources[f"{vm}@{v}"]), (store, vm, v)
            out.unlink()
