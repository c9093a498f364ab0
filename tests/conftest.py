"""One Ray instance for the whole session; CLI subprocesses join it through RAY_ADDRESS."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests import images

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Credentials for the test S3 server, set before Ray starts so that its workers inherit them
# as they would on a host configured for AWS.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "alike-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "alike-test-secret-do-not-print")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_address():
    import ray

    from pipelines.cluster import connect

    connect(None)
    addr = ray.get_runtime_context().gcs_address
    yield addr
    ray.shutdown()


class CLI:
    def __init__(self, address: str, tmp):
        self.address = address
        self.tmp = tmp

    def __call__(self, *args, env=None, check=None, timeout=300):
        e = dict(os.environ, RAY_ADDRESS=self.address)
        e.pop("ALIKE_STORE", None)
        e.update(env or {})
        p = subprocess.run([sys.executable, "-m", "alike_ray.cli", *map(str, args)], capture_output=True,
                           text=True, env=e, timeout=timeout)
        if check is True and p.returncode:
            raise AssertionError(f"alike {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
        return p

    def json(self, *args, **kw):
        p = self(*args, "--json", check=True, **kw)
        return json.loads(p.stdout)


@pytest.fixture(scope="module")
def conn():
    """A connection to the real libvirt of this machine (its daemons started when needed); the
    VMs a test module made (and those of killed runs) are removed before and after it."""
    from tests import kvm_env

    c, why = kvm_env.start_libvirt()
    if c is None:
        pytest.skip(f"libvirt cannot start on this machine: {why}")
    kvm_env.cleanup_domains(c)
    yield c
    kvm_env.cleanup_domains(c)
    c.close()


@pytest.fixture
def alike(ray_address, tmp_path):
    return CLI(ray_address, tmp_path)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """web.raw: a 64 MiB partitioned ext4 image; db.qcow2: another ext4 image as qcow2;
    web2.raw: web.raw a day later (files added through e2fsprogs' debugfs-free rebuild)."""
    d = tmp_path_factory.mktemp("corpus")
    t1 = images.tree(str(d / "tree1"), 12 * images.MiB)
    web = images.ext4_image(str(d / "web.raw"), 64, t1, "web")
    t2 = images.tree(str(d / "tree2"), 6 * images.MiB,
                     [os.path.join(os.path.dirname(os.__file__), "json"),
                      os.path.join(os.path.dirname(os.__file__), "email"),
                      os.path.join(os.path.dirname(os.__file__), "asyncio")])
    dbraw = images.ext4_image(str(d / "db-src.raw"), 48, t2, "db")
    db = images.to_qcow2(dbraw, str(d / "db.qcow2"))
    # a day later: the same disk with 2 MiB rewritten in place and 1 MiB appended in a hole
    day2 = str(d / "web-day2.raw")
    subprocess.run(["cp", "--sparse=always", web, day2], check=True)
    with open(day2, "r+b") as f:
        f.seek(20 * images.MiB)
        f.write(os.urandom(2 * images.MiB))
        f.seek(60 * images.MiB)
        f.write(os.urandom(1 * images.MiB))
    return {"web": web, "db": db, "db_raw": dbraw, "web_day2": day2}


def tree_digest(root) -> str:
    """A digest of every file's path and content under `root` (to show nothing changed)."""
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            h.update(os.path.relpath(p, root).encode())
            with open(p, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server on 127.0.0.1 (moto's server mode), reached with boto3
    over HTTP exactly as AWS or MinIO would be. -> its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the S3 server -> (endpoint, bucket name)."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return s3_server, name
