"""Full VM restore between the Xen and vSphere peers: a version of a Xen VM (the protocol-level XAPI
test server) becomes a VM in govmomi's vCenter simulator, and a version of a vSphere VM becomes a
VM in the Xen pool; disks checked byte for byte through each side's own files."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests import images
from tests.vcsim_server import Vcsim, VcsimBuildError, build
from tests.xapi_server import XapiServer

MiB = images.MiB


def test_xen_to_vmware_and_back(alike, tmp_path):
    try:
        build()
    except VcsimBuildError as e:
        pytest.skip(f"the vcsim launcher cannot be built here: {e}")
    lib = os.path.dirname(os.__file__)
    tree = images.tree(str(tmp_path / "t"), 2 * MiB, [f"{lib}/json"])
    xdisk = images.ext4_image(str(tmp_path / "x.raw"), 12, tree, "x")
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    with XapiServer(str(tmp_path / "pool")) as pool, Vcsim(tmp_path / "vc") as sim:
        pool.add_vm("xvm", disks=[xdisk], vcpus=2, memory=64 * MiB)
        xa = ["--credentials", pool.credentials_file(str(tmp_path / "xen.toml")), "--ca-bundle", pool.ca_file]
        vcreds = sim.credentials_file(tmp_path / "vc.toml")
        va = ["--credentials", vcreds, "--ca-bundle", sim.cert_file]
        alike.json("backup", "--store", store, f"xen:{pool.url}", "--vm", "xvm", *xa)
        alike.json("backup", "--store", store, f"vmware:{sim.url}", "--vm", "DC0_H0_VM1", *va)

        made = alike.json("restore", "--store", store, "xvm", "--to", f"vmware:{sim.url}", "--name", "from-xen",
                          *va)["vm_created"]
        [d] = sim.disks("from-xen")["disks"]
        assert made["state"] == "off" and d["capacity"] == 12 * MiB
        assert subprocess.run(["cmp", "-s", xdisk, d["path"]]).returncode == 0

        made = alike.json("restore", "--store", store, "DC0_H0_VM1", "--to", f"xen:{pool.url}", "--name", "from-vmw",
                          *xa)["vm_created"]
        [vm] = [v for v in pool.objects("VM").values() if v["name_label"] == "from-vmw"]
        [src] = sim.disks("DC0_H0_VM1")["disks"]
        with open(src["path"], "rb") as f:
            assert pool.export(pool.vdi_of(vm["uuid"], 0)) == f.read()
