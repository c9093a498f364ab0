"""`alike mount`: a real FUSE mount (libfuse via mfusepy) of a local store and of a store on the
S3 server; the disks read back byte-identical, the ext4 inside mounts through a loop device,
and damaged data is an I/O error, never wrong bytes."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests import images


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


class Mount:
    def __init__(self, argv, mnt, env=None):
        self.mnt = mnt
        self.proc = subprocess.Popen([sys.executable, "-m", "alike_ray.cli", "mount", *map(str, argv), str(mnt)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, **(env or {})))
        deadline = time.time() + 60
        while not os.path.ismount(mnt):
            if self.proc.poll() is not None:
                raise AssertionError(f"mount exited: {self.proc.stderr.read()}")
            if time.time() > deadline:
                raise AssertionError("mount did not come up")
            time.sleep(0.1)

    def close(self):
        subprocess.run(["umount", str(self.mnt)], check=False)
        self.proc.wait(timeout=30)
        assert not os.path.ismount(self.mnt)


@pytest.fixture
def fuse_ok():
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")


def test_mount_local_store(alike, corpus, tmp_path, fuse_ok):
    store = tmp_path / "ads"
    alike.json("init", "--store", store, "--block-size", "64K")
    v1 = alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", "web")
    v2 = alike.json("backup", "--store", store, f"image:{corpus['web_day2']}", "--name", "web")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(["--store", store], mnt)
    try:
        assert sorted(os.listdir(mnt)) == ["web"]
        assert sorted(os.listdir(mnt / "web")) == sorted([v1["version"], v2["version"]])
        d1 = mnt / "web" / v1["version"] / "web.raw"
        assert os.listdir(mnt / "web" / v2["version"]) == ["web-day2.raw"]  # disks keep their names
        d2 = mnt / "web" / v2["version"] / "web-day2.raw"
        assert os.path.getsize(d1) == 64 * images.MiB
        assert same(d1, corpus["web"]) and same(d2, corpus["web_day2"])
        with pytest.raises(OSError):
            open(d1, "r+b")  # read-only
        # the filesystem inside the disk, through a read-only loop device (we are root)
        fs = tmp_path / "fs"
        fs.mkdir()
        r = subprocess.run(["mount", "-o", "ro,loop,offset=1048576,noload", str(d1), str(fs)],
                           capture_output=True, text=True)
        assert r.returncode == 0 or os.geteuid() != 0, r.stderr  # as root, a loop device must work
        if r.returncode == 0:
            try:
                names = os.listdir(fs)
                assert any(n.startswith("python") or n == "lib" for n in names) or "lost+found" in names
                srcfile = os.path.join(os.path.dirname(os.__file__), "os.py")
                found = subprocess.run(["find", str(fs), "-name", "os.py", "-path", "*python3*"],
                                       capture_output=True, text=True).stdout.split()
                assert found and open(found[0], "rb").read() == open(srcfile, "rb").read()
            finally:
                subprocess.run(["umount", str(fs)])
        # a second mount on the same point is refused clearly
        p = alike("mount", "--store", store, mnt)
        assert p.returncode == 2 and "in use" in p.stderr and "Traceback" not in p.stderr
    finally:
        m.close()
    assert os.listdir(mnt) == []  # nothing left behind


def test_mount_s3_store_and_damage(alike, corpus, s3_bucket, tmp_path, fuse_ok):
    endpoint, bucket = s3_bucket
    store = f"s3://{bucket}/ods"
    alike.json("init", "--store", store, "--endpoint", endpoint)
    v = alike.json("backup", "--store", store, "--endpoint", endpoint, f"image:{corpus['db']}", "--name", "db")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(["--store", store, "--endpoint", endpoint], mnt)
    try:
        assert same(mnt / "db" / v["version"] / "db.raw", corpus["db_raw"])
    finally:
        m.close()
    # damage a pack on the S3 server: reading the damaged region fails, it does not return wrong data
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    key = next(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="ods/packs/")["Contents"])
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    for i in range(100, len(body) - 5000, 4096):
        body[i] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    m = Mount(["--store", store, "--endpoint", endpoint], mnt)
    try:
        with open(mnt / "db" / v["version"] / "db.raw", "rb") as f, pytest.raises(OSError):
            while f.read(1 << 20):
                pass
    finally:
        m.close()
