"""The `kvm:` source binds the source contract against real libvirt and QEMU (TCG): one small
running VM with one qcow2 disk holding ext4 (tests/kvm_env.py says how VMs are made and how a
guest write reaches QEMU's block layer, where the dirty bitmaps see it), read through libvirt's
backup API; and a shut-off one, read from its disk file through a qemu-nbd of ours."""
from __future__ import annotations

import os

import pytest

from tests import images, kvm_env
from tests.source_contract import Bound, SourceContract

MiB = images.MiB


def _vm(conn, tmp_path_factory, name: str, start: bool):
    """-> (domain, its kvm_env.Disk): vda, a 16 MiB qcow2 whose ground truth is a raw copy."""
    lib = os.path.dirname(os.__file__)
    tree = images.tree(str(tmp_path_factory.mktemp("kvm-contract") / "t"), 2 * MiB, [f"{lib}/json", f"{lib}/email"])
    d = kvm_env.image_dir()
    raw = images.ext4_image(os.path.join(d, "d0.raw"), 16, tree, name)
    qcow2 = images.to_qcow2(raw, os.path.join(d, "d0.qcow2"))
    dom = kvm_env.define(conn, kvm_env.vm_name(name), [qcow2], start=start)
    return dom, kvm_env.Disk(dom, "vda", raw)


@pytest.fixture(scope="module")
def kvm_vm(conn, tmp_path_factory):
    dom, disk = _vm(conn, tmp_path_factory, "contract", start=True)
    disk.write(3 * MiB + 512, 4096, 0x5A)  # data written by the guest before any backup
    return dom, disk


@pytest.fixture(scope="module")
def kvm_off(conn, tmp_path_factory):
    return _vm(conn, tmp_path_factory, "contract-off", start=False)


def _truth(disk):
    def truth(name):
        assert name == disk.target
        with open(disk.expected, "rb") as f:
            return f.read()
    return truth


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

        return Bound(open_source("kvm:" + kvm_env.URI), dom.name(), truth=_truth(disk), write=write,
                     residue=lambda: _residue(dom), power_state="running")


class TestKvmShutOff(SourceContract):
    """No guest writes while shut off, and no checkpoint yet: no marker (the CBT test checks that)."""

    @pytest.fixture
    def bound(self, kvm_off):
        from alike_ray.sources import open_source

        dom, disk = kvm_off
        return Bound(open_source("kvm:" + kvm_env.URI), dom.name(), truth=_truth(disk),
                     residue=lambda: _residue(dom), power_state="shut off")
