"""Full restore into a hypervisor: a version (here of an image source, i.e. from another
platform) becomes a new VM on real libvirt, with its disks as checked qcow2 files."""
from __future__ import annotations

import os
import subprocess


from tests import kvm_env




def test_restore_into_kvm(alike, corpus, conn, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    alike.json("backup", "--store", store, f"image:{corpus['db']},{corpus['web']}", "--name", "two")
    name = kvm_env.vm_name("copy")
    pool = kvm_env.image_dir()
    r = alike.json("restore", "--store", store, "two", "--to", f"kvm:{kvm_env.URI}", "--name", name,
                   "--pool-dir", pool, "--start")
    made = r["vm_created"]
    try:
        assert made["name"] == name and made["state"] == "running"
        dom = conn.lookupByName(name)
        assert dom.isActive()
        xml = dom.XMLDesc()
        for t in r["targets"]:
            assert t in xml and t.startswith(pool)
        for t, src in zip(r["targets"], (corpus["db_raw"], corpus["web"])):
            # a third party checks the content (-U: the running VM holds the image's lock)
            assert subprocess.run(["qemu-img", "compare", "-U", "-F", "qcow2", src, t]).returncode == 0
        # the name is taken now: a clear refusal, nothing written
        p = alike("restore", "--store", store, "two", "--to", f"kvm:{kvm_env.URI}", "--name", name,
                  "--pool-dir", pool)
        assert p.returncode == 2 and "already has a VM" in p.stderr and "Traceback" not in p.stderr
    finally:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        for t in r["targets"]:
            os.unlink(t)
