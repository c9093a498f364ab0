"""Joining a cluster made by `ray start --head`, as Ray's docs say: with --address HOST:PORT,
with RAY_ADDRESS, and with `auto`, and nothing else in the environment. Ray 2.60's `ray start`
turns token authentication on when the host has a token (~/.ray/auth_token, which every local
`ray.init` creates); a head without authentication must be joined too, also from a host that has
a token. Each join runs a real backup and restore, and the terminal gets none of Ray's own lines.

Each head runs in a HOME and a RAY_TMPDIR of its own (its token, its `ray_current_cluster` for
`auto`), started in a session of its own so that exactly its processes are killed at the end
(never `ray stop`: other Ray instances on the host are not ours)."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests import images

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# the environment a user's shell might hold that would make the join pass for other reasons
RAY_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "ALIKE_DEBUG", "ALIKE_STORE")
# what Ray's own output looks like: glog lines, Python logging lines, worker prefixes
RAY_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+[A-Z]+ |"
                      r"\((raylet|pid=\d+|\w+ pid=\d+)\)|gcs_client\.cc|core_worker|InvalidAuthToken")


@dataclasses.dataclass
class Head:
    address: str  # 127.0.0.1:PORT
    env: dict  # HOME and RAY_TMPDIR shared by the head and the alike commands that join it
    sid: int  # the session all its processes run in
    session_dir: str

    def node_id(self) -> str:
        (port_file,) = glob.glob(os.path.join(self.session_dir, "gcs_server_port_*"))
        return port_file.rsplit("_", 1)[1]

    def drivers(self) -> int:
        """How many drivers (alike commands) have joined this head so far."""
        return len(glob.glob(os.path.join(self.session_dir, "logs", "python-core-driver-*.log")))


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARS}
    env.update(RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after ")": state, ppid, pgrp, session
            pids.append(int(stat.split("/")[2]))
    return pids


def _kill_session(sid: int) -> None:
    """End every process of the head's session (gcs, raylet, agents, workers), and only those."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        pids = _session_pids(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _session_pids(sid):
            return


def _end(head: Head) -> None:
    _kill_session(head.sid)
    shutil.rmtree(head.env["RAY_TMPDIR"], ignore_errors=True)


def _start_head(auth: bool) -> Head:
    base = tempfile.mkdtemp(prefix="alike-join-", dir="/tmp")  # short: Ray's socket paths must fit
    home = os.path.join(base, "home")
    os.makedirs(home)
    env = dict(HOME=home, RAY_TMPDIR=base)
    # both hosts have a token, as any host that ever ran a local Ray has; the head without
    # authentication is told so, as `ray start` suggests
    subprocess.run([RAY, "get-auth-token", "--generate"], env=_clean_env(**env), check=True, capture_output=True)
    head_env = _clean_env(**env, **({} if auth else {"RAY_AUTH_MODE": "disabled"}))
    port = _free_port()
    p = subprocess.Popen([RAY, "start", "--head", "--port", str(port), "--num-cpus", "1",
                          "--include-dashboard=false", "--object-store-memory", str(100 * images.MiB),
                          "--disable-usage-stats"],
                         env=head_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    out, _ = p.communicate(timeout=120)
    head = Head(f"127.0.0.1:{port}", env, p.pid, os.path.join(base, "ray", "session_latest"))
    if p.returncode:
        _end(head)
        pytest.fail(f"ray start --head failed ({p.returncode}):\n{out}")
    if auth:
        assert "Token authentication is enabled" in out, out
    return head


@pytest.fixture(scope="module")
def token_head():
    head = _start_head(auth=True)
    yield head
    _end(head)


@pytest.fixture
def open_head():  # one test uses it: its processes end with that test
    head = _start_head(auth=False)
    yield head
    _end(head)


def alike(*args, env: dict, check: bool = True):
    p = subprocess.run([sys.executable, "-m", "alike_ray.cli", *map(str, args)], capture_output=True, text=True,
                       env=_clean_env(**env), timeout=300)
    if check:
        assert p.returncode == 0, f"alike {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}"
        assert p.stderr == "", f"alike {' '.join(map(str, args))} wrote to stderr:\n{p.stderr}"
    return p


def run_json(*args, env: dict) -> dict:
    return json.loads(alike(*args, "--json", env=env).stdout)


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    d = tmp_path_factory.mktemp("join")
    img = images.random_image(str(d / "vm.raw"), 4)
    day2 = str(d / "vm-day2.raw")
    with open(img, "rb") as src, open(day2, "wb") as dst:
        dst.write(src.read())
        dst.seek(images.MiB)
        dst.write(os.urandom(images.MiB))
    return {"day1": img, "day2": day2}


def _backup_and_restore(head: Head, disk, tmp_path, how: str, incremental: bool = False) -> None:
    """A backup (and an incremental one if asked) and a restore of the last, joined to `head`
    the way `how` names: the --address flag, RAY_ADDRESS, or `--address auto`."""
    store = tmp_path / "ads"
    alike("init", "--store", store, env=head.env)  # no Ray

    def joined(*args):
        env = dict(head.env)
        if how == "flag":
            args += ("--address", head.address)
        elif how == "env":
            env["RAY_ADDRESS"] = head.address
        else:
            args += ("--address", "auto")
        before = head.drivers()
        out = run_json(*args, env=env)
        assert head.drivers() == before + 1, "the command did not run as a driver of the head"
        return out

    last = joined("backup", "--store", store, f"image:{disk['day1']}", "--name", "vm")
    assert last["read_nodes"] == [head.node_id()] and last["new_blocks"] > 0
    src = disk["day1"]
    if incremental:
        second = joined("backup", "--store", store, f"image:{disk['day2']}", "--name", "vm")
        assert 0 < second["new_blocks"] < last["new_blocks"]
        last, src = second, disk["day2"]
    out = tmp_path / "vm.raw"
    joined("restore", "--store", store, f"vm@{last['version']}", "--to", out)
    assert subprocess.run(["cmp", src, out]).returncode == 0


@pytest.mark.parametrize("how", ["flag", "env", "auto"])
def test_join_head_with_token_auth(token_head, disk, tmp_path, how):
    _backup_and_restore(token_head, disk, tmp_path, how, incremental=how == "flag")


def test_join_head_without_auth_from_a_host_with_a_token(open_head, disk, tmp_path):
    # a driver in token mode refuses the callbacks of this head's workers: alike must not send one
    assert os.path.exists(os.path.join(open_head.env["HOME"], ".ray", "auth_token"))
    _backup_and_restore(open_head, disk, tmp_path, "flag")


def _one_error_line(p) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("alike: error: "), p.stderr
    assert not RAY_LINE.search(lines[0].split("alike: error: ", 1)[1]), p.stderr
    return lines[0]


def test_wrong_address_one_error_line(token_head, disk, tmp_path):
    alike("init", "--store", tmp_path / "ads", env=token_head.env)
    port = _free_port()  # nothing listens there
    line = _one_error_line(alike("backup", "--store", tmp_path / "ads", f"image:{disk['day1']}",
                                 "--address", f"127.0.0.1:{port}", env=token_head.env, check=False))
    assert f"127.0.0.1:{port}" in line and "ray start --head" in line


@pytest.mark.parametrize("token", ["wrong", "none"])
def test_refused_token_one_error_line(token_head, disk, tmp_path, token):
    alike("init", "--store", tmp_path / "ads", env=token_head.env)
    home = tmp_path / "home"
    os.makedirs(home / ".ray")
    if token == "wrong":
        (home / ".ray" / "auth_token").write_text("0" * 32)
    env = dict(token_head.env, HOME=str(home), RAY_ADDRESS=token_head.address)
    before = token_head.drivers()
    line = _one_error_line(alike("backup", "--store", tmp_path / "ads", f"image:{disk['day1']}", env=env,
                                 check=False))
    assert "token" in line and token_head.address in line
    assert ("refused this host's" if token == "wrong" else "this host has no token") in line
    assert token_head.drivers() == before
