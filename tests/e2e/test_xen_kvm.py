"""Full VM restore to any hypervisor: a version of a Xen VM (from the protocol-level XAPI test
server) becomes a VM on real libvirt/QEMU, and a version of a KVM VM (real libvirt) becomes a VM
in the Xen pool; disks checked byte for byte by qemu-img compare and by the server's export."""
from __future__ import annotations

import os
import subprocess

from tests import images, kvm_env
from tests.xapi_server import XapiServer

MiB = images.MiB


def test_xen_to_kvm_and_kvm_to_xen(alike, conn, tmp_path):
    lib = os.path.dirname(os.__file__)
    tree = images.tree(str(tmp_path / "t"), 2 * MiB, [f"{lib}/json", f"{lib}/email"])
    xen_disk = images.ext4_image(str(tmp_path / "x0.raw"), 16, tree, "x0")
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    with XapiServer(str(tmp_path / "pool")) as pool:
        pool.add_vm("xweb", disks=[xen_disk], memory=48 * MiB, vcpus=2)
        auth = ["--credentials", pool.credentials_file(str(tmp_path / "xen.toml")), "--ca-bundle", pool.ca_file]
        alike.json("backup", "--store", store, f"xen:{pool.url}", "--vm", "xweb", *auth)

        # Xen -> KVM: the recorded shape (2 vCPUs, 48 MiB) is the default
        name = kvm_env.vm_name("from-xen")
        r = alike.json("restore", "--store", store, "xweb", "--to", f"kvm:{kvm_env.URI}", "--name", name,
                       "--pool-dir", kvm_env.image_dir())
        try:
            dom = conn.lookupByName(name)
            assert dom.info()[3] == 2 and dom.info()[1] == 48 * 1024  # vCPUs, KiB of memory
            [t] = r["targets"]
            assert subprocess.run(["qemu-img", "compare", "-U", "-F", "qcow2", xen_disk, t]).returncode == 0
        finally:
            kvm_env.remove_domain(conn.lookupByName(name))

        # KVM -> Xen: a shut-off libvirt VM (read from its qcow2 by qemu-nbd) into the pool
        kname = kvm_env.vm_name("to-xen")
        raw = images.ext4_image(os.path.join(kvm_env.image_dir(), "k0.raw"), 24, tree, "k0")
        qcow2 = images.to_qcow2(raw, os.path.join(kvm_env.image_dir(), "k0.qcow2"))
        kvm_env.define(conn, kname, [qcow2], start=False)
        alike.json("backup", "--store", store, f"kvm:{kvm_env.URI}", "--vm", kname)
        made = alike.json("restore", "--store", store, kname, "--to", f"xen:{pool.url}", "--name", "from-kvm",
                          *auth)["vm_created"]
        assert made["state"] == "halted"
        [vm] = [v for v in pool.objects("VM").values() if v["name_label"] == "from-kvm"]
        with open(raw, "rb") as f:
            assert pool.export(pool.vdi_of(vm["uuid"], 0)) == f.read()
