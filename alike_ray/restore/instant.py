"""`alike instant`: boot a VM from a backup in seconds, without restoring its disks.

The version's disks are served by `alike mount` (read-only FUSE, blocks fetched on demand),
each under a qcow2 copy-on-write overlay (`qemu-img create -b`), and QEMU starts from the
overlays: the guest's writes land in the overlays, never in the store. Everything lives in a
run folder (default /var/tmp/alike-instant/NAME): the mount, the overlays, QEMU's pid file,
QMP socket and console log. `alike instant --stop NAME` stops QEMU, unmounts and removes the
folder; so does a failed start.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from storage.errors import StoreError

RUN_ROOT = os.environ.get("ALIKE_INSTANT_DIR", "/var/tmp/alike-instant")


class InstantError(StoreError):
    """{detail}"""


def _qmp(sock_path: str, *commands: dict) -> list:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock_path)
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting
    out = []
    for cmd in [{"execute": "qmp_capabilities"}, *commands]:
        f.write(json.dumps(cmd) + "\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                break
        out.append(msg)
    s.close()
    return out[1:]


def read_bytes(run: str) -> int:
    """Bytes QEMU has read from the VM's disks so far (QMP query-blockstats)."""
    [r] = _qmp(os.path.join(run, "qmp.sock"), {"execute": "query-blockstats"})
    return sum(d["stats"]["rd_bytes"] for d in r.get("return", []))


def start(spec, vm: str, version: str, meta: dict, name: str, memory: int = 512, store_arg: list | None = None) -> dict:
    t0 = time.monotonic()
    if not shutil.which("qemu-system-x86_64"):
        raise InstantError("qemu-system-x86_64 is not installed: install the qemu-system-x86 package")
    run = os.path.join(RUN_ROOT, name)
    if os.path.exists(os.path.join(run, "state.json")):
        raise InstantError(f"an instant VM named {name!r} exists: stop it with `alike instant --stop {name}` "
                           "or choose another --name")
    mnt = os.path.join(run, "mnt")
    os.makedirs(mnt, exist_ok=True)
    state = {"name": name, "vm": vm, "version": version, "run": run, "started": time.time()}
    try:
        log = open(os.path.join(run, "mount.log"), "w")
        mount = subprocess.Popen([sys.executable, "-m", "alike_ray.cli", "mount", *(store_arg or []), mnt],
                                 stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        state["mount_pid"] = mount.pid
        _save(run, state)
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            if mount.poll() is not None:
                raise InstantError(f"the store could not be mounted: {open(log.name).read().strip()[-300:]}")
            if time.monotonic() > deadline:
                raise InstantError("the store's mount did not come up within 60 s")
            time.sleep(0.05)
        drives = []
        names = sorted(os.listdir(os.path.join(mnt, vm, version)))
        for n, d in enumerate(meta["disks"]):
            disk_file = os.path.join(mnt, vm, version, os.path.splitext(d["name"])[0] + ".raw")
            if not os.path.exists(disk_file):
                disk_file = os.path.join(mnt, vm, version, names[n])
            overlay = os.path.join(run, f"disk{n}.qcow2")
            p = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", disk_file, overlay],
                               capture_output=True, text=True)
            if p.returncode:
                raise InstantError(f"qemu-img could not make the overlay of disk {n}: {p.stderr.strip()}")
            drives += ["-drive", f"file={overlay},format=qcow2,if=virtio,cache=writeback"]
        accel = "kvm:tcg" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"
        cmd = ["qemu-system-x86_64", "-name", name, "-machine", f"pc,accel={accel}", "-m", str(memory),
               *drives, "-display", "none", "-nic", "none", "-daemonize",
               "-pidfile", os.path.join(run, "qemu.pid"),
               "-qmp", f"unix:{os.path.join(run, 'qmp.sock')},server=on,wait=off",
               "-serial", f"file:{os.path.join(run, 'console.log')}"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            raise InstantError(f"QEMU did not start: {p.stderr.strip()[-300:]}")
        state["qemu_pid"] = int(open(os.path.join(run, "qemu.pid")).read())
        _save(run, state)
        # running = QEMU has read from the backup (the firmware reads the boot sector)
        deadline = time.monotonic() + 60
        while read_bytes(run) == 0:
            if time.monotonic() > deadline:
                raise InstantError("QEMU started but read nothing from the disks within 60 s")
            time.sleep(0.05)
        state["seconds_to_running"] = round(time.monotonic() - t0, 3)
        _save(run, state)
        return state
    except BaseException:
        stop(name, quiet=True)
        raise


def _save(run: str, state: dict) -> None:
    tmp = os.path.join(run, ".state.json")
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, os.path.join(run, "state.json"))


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def stop(name: str, quiet: bool = False) -> dict:
    run = os.path.join(RUN_ROOT, name)
    try:
        state = json.load(open(os.path.join(run, "state.json")))
    except (OSError, ValueError):
        if quiet:
            state = {"name": name}
        elif os.path.isdir(run):
            state = {"name": name}
        else:
            raise InstantError(f"no instant VM named {name!r} (see `alike instant --list`)") from None
    pid = state.get("qemu_pid")
    if not pid and os.path.exists(os.path.join(run, "qemu.pid")):
        pid = int(open(os.path.join(run, "qemu.pid")).read() or 0)
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    mnt = os.path.join(run, "mnt")
    if os.path.ismount(mnt):
        subprocess.run(["umount", mnt], capture_output=True)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
    mpid = state.get("mount_pid")
    for _ in range(100):
        if not _alive(mpid):
            break
        time.sleep(0.05)
    if _alive(mpid):
        os.kill(mpid, signal.SIGKILL)
    shutil.rmtree(run, ignore_errors=True)
    return {"name": name, "stopped": True}


def listing() -> list[dict]:
    out = []
    if os.path.isdir(RUN_ROOT):
        for name in sorted(os.listdir(RUN_ROOT)):
            try:
                st = json.load(open(os.path.join(RUN_ROOT, name, "state.json")))
            except (OSError, ValueError):
                continue
            st["running"] = _alive(st.get("qemu_pid"))
            out.append(st)
    return out
