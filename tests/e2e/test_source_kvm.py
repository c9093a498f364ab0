"""The `kvm:` source binds the source contract against real libvirt and QEMU (TCG): one small
running VM with one qcow2 disk holding ext4 (tests/kvm_env.py says how VMs are made and how a
guest write reaches QEMU's block layer, where the dirty bitmaps see it)."""
from __future__ import annotations

import os

import pytest

from tests import images, kvm_env
from tests.source_contract import Bound, SourceContract

MiB = images.MiB


@pytest.fixture(scope="module")
def kvm_vm(conn, tmp_path_factory):
    """-> (domain, its kvm_env.Disk): vda, a 16 MiB qcow2 whose ground truth is a raw copy."""
    lib = os.path.dirname(os.__file__)
    tree = images.tree(str(tmp_path_factory.mktemp("kvm-contract") / "t"), 2 * MiB, [f"{lib}/json", f"{lib}/email"])
    d = kvm_env.image_dir()
    raw = images.ext4_image(os.path.join(d, "d0.raw"), 16, tree, "contract")
    qcow2 = images.to_qcow2(raw, os.path.join(d, "d0.qcow2"))
    dom = kvm_env.define(conn, kvm_env.vm_name("contract"), [qcow2])
    disk = kvm_env.Disk(dom, "vda", raw)
    disk.write(3 * MiB + 512, 4096, 0x5A)  # data written by the guest before any backup
    return dom, disk


def _residue(dom):
    """What a snapshot of `dom` makes: a backup job, scratch files, checkpoints, qemu-nbd pid files."""
    from alike_ray.sources import kvm

    try:
        dom.backupGetXMLDesc(0)
        job = True
    except Exception:
        job = False
    uuid = dom.UUIDString()
    scratch = sorted(f for f in os.listdir("/var/tmp") if f.startswith(f"alike-{uuid}"))
    cps = sorted(cp.getName() for cp in dom.listAllCheckpoints(0))
    return job, scratch, cps, kvm._pidfiles(uuid)


class TestKvmSource(SourceContract):
    @pytest.fixture
    def bound(self, kvm_vm):
        from alike_ray.sources import open_source

        dom, disk = kvm_vm
        n = [0]

        def write(name, off, length):
            assert name == "vda"
            n[0] += 1
            pattern = 0x30 + n[0]
            disk.write(off, length, pattern)
            return bytes([pattern]) * length

        def truth(name):
            with open(disk.expected, "rb") as f:
                return f.read()

        return Bound(open_source("kvm:" + kvm_env.URI), dom.name(), truth=truth, write=write,
                     residue=lambda: _residue(dom), power_state="running")
