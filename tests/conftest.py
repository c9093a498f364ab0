"""One Ray instance for the whole session; CLI subprocesses join it through RAY_ADDRESS."""
from __future__ import annotations

import hashlib
import json
import os
import re
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
# Every command runs in its own process unless a test names a server: never in an `alike server`
# that happens to run at this host's default socket, and none is started on the fly (a test in
# a pty would otherwise start one). tests/e2e/test_server.py sets these per command.
os.environ["ALIKE_SERVER"] = "off"
os.environ["ALIKE_SERVER_AUTOSTART"] = "0"


# -- markers and CI strict mode ---------------------------------------------------------------
# Markers (registered in pyproject.toml, --strict-markers) are given here, from where a test
# lives and what it uses, so that no test can forget its own: `-m "not slow"` for a quick loop,
# `-m kvm` for the libvirt tests alone.
#
# With CI=true, a test that would be skipped FAILS: a green CI run means everything ran (a
# missing libvirt, FUSE, QEMU, qemu-img, S3 server, restic or borg is a broken CI machine, not
# a pass). A skip that is right on any machine - the test does not apply - says so by starting
# its reason with NOT_APPLICABLE. Tests of the full crash and flip matrices (marker
# full_matrix) are not collected unless ALIKE_FULL_MATRIX=1: they are left out, not skipped.
NOT_APPLICABLE = "not applicable: "
STRICT = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
FULL_MATRIX = os.environ.get("ALIKE_FULL_MATRIX") == "1"
# modules that boot VMs, start Ray nodes of their own or move hundreds of MiB
SLOW_MODULES = {"test_kvm.py", "test_restore_hypervisor.py", "test_instant.py", "test_multinode.py",
                "test_ray_join.py", "test_progress.py", "test_crash_matrix.py", "test_prune_crash.py"}


CRASH_MODULES = {"test_crash_matrix.py", "test_prune_crash.py"}


def _is_crash_test(item) -> bool:
    """A crash test: run once per crash point, in a crash matrix module, or killing a process."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    name = getattr(item, "originalname", item.name)
    return item.path.name in CRASH_MODULES or "point" in params or re.search(r"killed|dying|crash", name) is not None


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on them
def pytest_collection_modifyitems(config, items):
    keep, left_out = [], []
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)
        if "conn" in fixtures:  # the machine's libvirt
            item.add_marker(pytest.mark.kvm)
        if "s3_server" in fixtures:  # s3_bucket uses it too
            item.add_marker(pytest.mark.s3)
        if _is_crash_test(item):
            item.add_marker(pytest.mark.crash)
        if item.path.name in SLOW_MODULES or _is_crash_test(item) or item.get_closest_marker("kvm"):
            item.add_marker(pytest.mark.slow)
        (left_out if item.get_closest_marker("full_matrix") and not FULL_MATRIX else keep).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = keep


def _skip_reason(rep) -> str:
    lr = rep.longrepr
    reason = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
    return reason.removeprefix("Skipped: ")


def _strict(rep, what: str) -> None:
    """Under CI=true, turn a skip into a failure unless its reason says it does not apply."""
    if not STRICT or not rep.skipped or hasattr(rep, "wasxfail"):
        return
    reason = _skip_reason(rep)
    if reason.startswith(NOT_APPLICABLE):
        return
    rep.outcome = "failed"
    rep.longrepr = (f"CI=true and {what} would be skipped: {reason}\n"
                    "CI must run every test: give this machine what the test needs (scripts/test.sh "
                    f"installs it), or, if the test cannot apply anywhere, start the reason with {NOT_APPLICABLE!r}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _strict(outcome.get_result(), "this test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _strict(outcome.get_result(), "this module")


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
