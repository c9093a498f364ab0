"""vSphere with real libvirt/QEMU: a job mixing vmware:, kvm: and image: sources; a version of a
vSphere VM (govmomi's simulator, tests/vcsim) restored into KVM, and a version of a KVM VM
restored into the simulator; disks checked by qemu-img compare and through the datastore files."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests import images, kvm_env
from tests.vcsim_server import Vcsim, VcsimBuildError, build

MiB = images.MiB


def test_mixed_job_and_cross_hypervisor(alike, conn, tmp_path):
    try:
        build()
    except VcsimBuildError as e:
        pytest.skip(f"the vcsim launcher cannot be built here: {e}")
    lib = os.path.dirname(os.__file__)
    tree = images.tree(str(tmp_path / "t"), 2 * MiB, [f"{lib}/json", f"{lib}/email"])
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    kname = kvm_env.vm_name("vmw-mix")
    raw = images.ext4_image(os.path.join(kvm_env.image_dir(), "m0.raw"), 24, tree, "m0")
    kvm_env.define(conn, kname, [images.to_qcow2(raw, os.path.join(kvm_env.image_dir(), "m0.qcow2"))], start=False)
    img = images.ext4_image(str(tmp_path / "plain.raw"), 8, tree, "plain")
    with Vcsim(tmp_path / "vc") as sim:
        creds = sim.credentials_file(tmp_path / "vc.toml")
        job = tmp_path / "mixed.toml"
        job.write_text(f'name = "mixed"\nstore = "{store}"\n'
                       f'sources = [{{uri = "vmware:{sim.url}", credentials = "{creds}", ca_bundle = "{sim.cert_file}"}},'
                       f' "kvm:{kvm_env.URI}", {{uri = "image:{img}", name = "plain"}}]\n'
                       f'[select]\nvms = ["DC0_H0_VM1", "{kname}", "plain"]\n[options]\nparallel = 2\n')
        r = alike.json("job", "run", str(job))
        assert sorted(v["vm"] for v in r["vms"]) == sorted(["DC0_H0_VM1", kname, "plain"]), r
        assert all(v.get("error") is None for v in r["vms"]), r

        # vSphere -> KVM
        name = kvm_env.vm_name("from-vmw")
        out = alike.json("restore", "--store", store, "DC0_H0_VM1", "--to", f"kvm:{kvm_env.URI}", "--name", name,
                         "--pool-dir", kvm_env.image_dir())
        try:
            [t] = out["targets"]
            [d] = sim.disks("DC0_H0_VM1")["disks"]
            assert subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", d["path"], t]).returncode == 0
        finally:
            kvm_env.remove_domain(conn.lookupByName(name))

        # KVM -> vSphere
        made = alike.json("restore", "--store", store, kname, "--to", f"vmware:{sim.url}", "--name", "from-kvm",
                          "--credentials", creds, "--ca-bundle", sim.cert_file)["vm_created"]
        assert made["state"] == "off"
        [d] = sim.disks("from-kvm")["disks"]
        assert d["capacity"] == 24 * MiB
        assert subprocess.run(["cmp", "-s", raw, d["path"]]).returncode == 0
