"""What a first user trips over (issue 12, part 3), each tried as a new user would, through the
real CLI: gc right after a prune, files ls of NTFS/FAT, two backups of one VM at once, Ctrl-C,
restore targets that cannot take the restore, stats, versions, job preview and retention lines."""
from __future__ import annotations

import json

import pytest

from tests import images


@pytest.fixture
def pruned(alike, tmp_path):
    """A store where a prune just removed a version: its blocks are unused, and their packs
    are younger than gc's default grace period of 1 h. -> the store path."""
    store = tmp_path / "ads"
    alike.json("init", "--store", store, "--block-size", "64K")
    for n in range(2):
        img = images.random_image(tmp_path / f"day{n}.raw", 2)
        alike.json("backup", "--store", store, f"image:{img}", "--name", "vm")
    alike.json("prune", "--store", store, "--keep-last", "1")
    return store


def test_gc_says_what_the_grace_period_spared(alike, pruned):
    p = alike("gc", "--store", pruned, check=True)
    assert "deleted 0 packs" in p.stdout
    line = next(x for x in p.stdout.splitlines() if x.startswith("spared "))
    assert "younger than the --grace period (1h)" in line and "MiB" in line, line
    assert "--grace 0" in line and "no backup, vault or prune is writing" in line and "(in " in line, line

    dry = alike("gc", "--store", pruned, "--dry-run", check=True).stdout
    assert "would spare " in dry

    rep = alike.json("gc", "--store", pruned)
    assert rep["packs_deleted"] == 0 and rep["spared_packs"] >= 1 and rep["spared_bytes"] > 1024 * 1024
    assert rep["grace_seconds"] == 3600
    assert rep["spared_reclaimable_from"] <= rep["spared_reclaimable_by"]

    # what was spared is what --grace 0 deletes
    now = alike.json("gc", "--store", pruned, "--grace", "0")
    assert now["packs_deleted"] == rep["spared_packs"] and now["bytes_deleted"] == rep["spared_bytes"]
    assert now["spared_packs"] == 0
    assert "spared" not in alike("gc", "--store", pruned, check=True).stdout


def _dos_attribute_disk(tmp_path) -> str:
    """A dos-labelled disk: ext4, then FAT and NTFS holding /ro/locked.txt with the DOS
    read-only attribute and /ro/hidden.txt with the hidden one (set as Windows would: mattrib,
    ntfs-3g's attribute xattr)."""
    import os
    import subprocess
    import tempfile

    src = tmp_path / "tree"
    (src / "ro").mkdir(parents=True)
    for name in ("locked.txt", "hidden.txt", "plain.txt"):
        (src / "ro" / name).write_bytes(b"x" * 10)
    ext4 = images.ext4_fs(str(tmp_path / "ext4.fs"), 8, str(src))
    fat = images.fat_fs(str(tmp_path / "fat.fs"), 16, str(src))
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    for flag, name in (("+r", "locked.txt"), ("+h", "hidden.txt")):
        subprocess.run(["mattrib", "-i", fat, flag, f"::/ro/{name}"], env=env, check=True)
    ntfs = images.ntfs_fs(str(tmp_path / "ntfs.fs"), 16, str(src))
    mnt = tempfile.mkdtemp(prefix="alike-ntfs-")
    subprocess.run(["ntfs-3g", ntfs, mnt], check=True)
    try:  # FILE_ATTRIBUTE_READONLY 0x1, HIDDEN 0x2, ARCHIVE 0x20
        os.setxattr(f"{mnt}/ro/locked.txt", "system.ntfs_attrib_be", (0x21).to_bytes(4, "big"))
        os.setxattr(f"{mnt}/ro/hidden.txt", "system.ntfs_attrib_be", (0x22).to_bytes(4, "big"))
    finally:
        subprocess.run(["umount", mnt], check=True)
        os.rmdir(mnt)
    return images.partitioned_disk(str(tmp_path / "pc.raw"), "dos", [(ext4, "83"), (fat, "c"), (ntfs, "7")])


def test_files_ls_folder_sizes_and_dos_permissions(alike, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    alike.json("backup", "--store", store, f"image:{_dos_attribute_disk(tmp_path)}", "--name", "pc")
    for part, fs in ((1, "ext4"), (2, "fat16"), (3, "ntfs")):
        sel = ["--partition", part, "--store", store]
        ls = alike("files", "pc", "ls", *sel, check=True).stdout
        folder = next(x for x in ls.splitlines() if x.endswith(" ro/"))
        assert "?" not in ls, ls
        cols = folder.split()
        assert cols[0] == "drwxr-xr-x" if fs != "ext4" else cols[0].startswith("d"), folder
        assert int(cols[2]) > 0, f"{fs}: a folder's size is what its filesystem records, as ls -l shows: {folder}"
        res = alike.json("files", "pc", "ls", "/ro", *sel)
        perm = {e["name"]: e["permissions"] for e in res["entries"]}
        if fs == "ext4":
            assert perm == {n: "rw-r--r--" for n in ("hidden.txt", "locked.txt", "plain.txt")}, perm
            continue
        assert perm == {"locked.txt": "r--r--r--", "hidden.txt": "rw-r--r--", "plain.txt": "rw-r--r--"}, (fs, perm)
        assert {e["name"]: e["readonly"] for e in res["entries"]} == {
            "locked.txt": True, "hidden.txt": False, "plain.txt": False}
        assert all(e["mode"] is None for e in res["entries"])  # no Unix mode bits on the disk
        text = alike("files", "pc", "ls", "/ro", *sel, check=True).stdout
        assert any(x.startswith("-r--r--r--") and x.endswith("locked.txt") for x in text.splitlines()), text


def test_second_backup_of_a_vm_is_refused_naming_the_first(alike, tmp_path):
    """Two real CLI backups of one VM into one store: the second is refused at once, naming
    the first, while the first runs on (held still with SIGSTOP once it has claimed the VM, so
    that no timing decides the test) and commits."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    img = images.random_image(tmp_path / "web.raw", 8)
    first = subprocess.Popen([sys.executable, "-m", "alike_ray.cli", "backup", "--store", str(store), f"image:{img}",
                              "--name", "web", "--json"], env=dict(os.environ, RAY_ADDRESS=alike.address),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    claim = f".vm-{b'web'.hex()}"
    try:
        deadline = time.monotonic() + 240
        while not (store / "locks").is_dir() or not any(n.endswith(claim) for n in os.listdir(store / "locks")):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first backup never claimed its VM"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = alike("backup", "--store", store, f"image:{img}", "--name", "web")
            other = alike("backup", "--store", store, f"image:{img}", "--name", "db", "--json")
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("alike: error: web is being backed up into this store already "
                                                       f"by backup (pid {first.pid} on {socket.gethostname()}, since "), lines
        assert other.returncode == 0, other.stderr  # another VM is not held up
        out, err = first.communicate(timeout=240)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert [v["vm"] for v in alike.json("versions", "--store", store)["versions"]].count("web") == 1
    assert not [n for n in os.listdir(store / "locks") if ".vm-" in n], "claims left behind"
    alike.json("backup", "--store", store, f"image:{img}", "--name", "web")  # free again


def test_kvm_and_all_extras():
    """`pip install 'alike-ray[kvm]'` and `[all]` bring libvirt-python, and the README says so."""
    import os
    import tomllib

    from packaging.requirements import Requirement

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    for name in ("kvm", "all"):
        reqs = [Requirement(r) for r in extras[name]]  # what pip parses
        assert "libvirt-python" in {r.name for r in reqs}, extras
    assert set(extras["kvm"]) <= set(extras["all"])
    readme = open(os.path.join(root, "README.md")).read()
    assert "alike-ray[kvm]" in readme and "alike-ray[all]" in readme


def _wait_for(path, proc, what: str) -> None:
    import os
    import time

    deadline = time.monotonic() + 240
    while not os.path.exists(path):
        assert proc.poll() is None, (what, proc.communicate())
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.05)


def test_ctrl_c_of_a_backup_is_one_line_and_exit_130(alike, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while a backup's worker is
    in the middle of the data (held there by a pause point): the one "interrupted" line, exit
    130, no traceback of Ray's (ActorDiedError, "Unhandled error"), nothing partial committed."""
    import os
    import signal
    import subprocess
    import sys

    store = tmp_path / "ads"
    alike.json("init", "--store", store, "--block-size", "64K")
    img = images.random_image(tmp_path / "web.raw", 4)
    flag = tmp_path / "paused"
    env = dict(os.environ, RAY_ADDRESS=alike.address, ALIKE_CRASH_AT="absorbed:1:pause",
               ALIKE_CRASH_FLAG=str(flag))
    p = subprocess.Popen([sys.executable, "-m", "alike_ray.cli", "backup", "--store", str(store), f"image:{img}",
                          "--name", "web"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for(flag, p, "the backup reaching its data")
        os.killpg(p.pid, signal.SIGINT)
        flag.unlink()  # the worker goes on, into the index shards the interrupted driver stops
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
        flag.unlink(missing_ok=True)
    assert p.returncode == 130, err
    assert err.strip().splitlines() == ["alike: interrupted; nothing partial was committed"], err
    # the worker, let go at the Ctrl-C, may have committed its version whole just before it was
    # stopped; what must never be is a partial one
    assert len(alike.json("versions", "--store", store)["versions"]) <= 1
    assert alike.json("verify", "--store", store)["ok"]


def test_versions_mark_pins_and_job_preview_labels_its_columns(alike, tmp_path):
    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    img = images.random_image(tmp_path / "web.raw", 1)
    old = alike.json("backup", "--store", store, f"image:{img}", "--name", "web")["version"]
    new = alike.json("backup", "--store", store, f"image:{img}", "--name", "web")["version"]
    alike("pin", f"web@{old}", "--note", "before the upgrade", "--store", store, check=True)
    rows = {r["version"]: r for r in alike.json("versions", "--store", store)["versions"]}
    assert rows[new]["pinned"] is None
    assert rows[old]["pinned"]["note"] == "before the upgrade" and rows[old]["pinned"]["since"]
    lines = alike("versions", "--store", store, check=True).stdout.splitlines()
    assert lines[0].split()[-1] == "PINNED"
    assert next(x for x in lines if old in x).endswith("pinned: before the upgrade")
    assert "pinned" not in next(x for x in lines if new in x)

    job = tmp_path / "daily.toml"
    job.write_text(f'name = "daily"\nstore = "{store}"\nsources = [{{uri = "image:{img}", name = "web", '
                   'tags = ["prod"]}]\n')
    text = alike("job", "preview", job, check=True).stdout.splitlines()
    assert text[1].split() == ["VM", "POWER", "DISKS", "TAGS"], text
    assert text[2].split() == ["web", "n/a", "1", "prod"], text
    assert "n/a: a disk image file has no power state" in text[3], text


def test_job_retention_line_names_the_removed_as_removed():
    from alike_ray.jobs import retention_text

    line = retention_text({"removed": ["db@20260101-000000-000", "web@20260101-000000-000"], "kept": 6})
    assert line.startswith("kept 6, removed 2: db@20260101-000000-000, web@20260101-000000-000 ")
    assert retention_text({"removed": [], "kept": 3}) == "kept 3, removed none"


def test_stats_names_each_figure(alike, corpus, tmp_path, s3_bucket):
    """Two VMs of one sparse 64 MiB disk (12 MiB of files): the dedup ratio is reckoned on the
    blocks with data, not on the holes; blocks used by versions and blocks in the index are two
    figures (they differ after a prune, until gc); per-VM and free-space lines; S3: n/a."""
    import shutil

    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    for vm in ("web", "web-copy"):
        alike.json("backup", "--store", store, f"image:{corpus['web']}", "--name", vm)
    img = images.random_image(tmp_path / "tmp.raw", 1)
    alike.json("backup", "--store", store, f"image:{img}", "--name", "tmp")
    alike.json("backup", "--store", store, f"image:{images.random_image(tmp_path / 'tmp2.raw', 1)}", "--name", "tmp")
    s = alike.json("stats", "--store", store)
    assert s["logical_bytes"] == 2 * 64 * images.MiB + 2 * images.MiB
    web = {v["vm"]: v for v in s["per_vm"]}["web"]
    assert web["logical_bytes"] == 64 * images.MiB and web["versions"] == 1
    assert 12 * images.MiB <= web["data_bytes"] < 64 * images.MiB  # holes and zero blocks do not count
    assert s["data_bytes"] == 2 * web["data_bytes"] + 2 * images.MiB
    assert s["dedup_ratio"] == round(s["data_bytes"] / s["stored_bytes"], 2)
    assert s["dedup_ratio"] < s["logical_bytes"] / s["stored_bytes"]  # what it said before, holes counted
    assert s["referenced_blocks"] == s["index_blocks"]
    assert abs(s["free_bytes"] - shutil.disk_usage(store).free) < 64 * images.MiB

    alike.json("prune", "--store", store, "--keep-last", "1")  # tmp's first version goes
    s = alike.json("stats", "--store", store)
    assert s["referenced_blocks"] < s["index_blocks"]
    gc = alike.json("gc", "--store", store, "--grace", "0")
    assert gc["live_blocks"] == s["referenced_blocks"]
    text = alike("stats", "--store", store, check=True).stdout
    assert "data / stored" in text and "used by versions" in text and "free on the filesystem of" in text
    assert any(x.split()[:2] == ["web-copy", "1"] for x in text.splitlines()), text

    endpoint, bucket = s3_bucket
    alike.json("init", "--store", f"s3://{bucket}/ods", "--endpoint", endpoint)
    s3 = alike.json("stats", "--store", f"s3://{bucket}/ods", "--endpoint", endpoint)
    assert s3["free_bytes"] is None and s3["free_note"].startswith("n/a")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size, read_only=False) -> a folder on a tmpfs of its own (a real full or
    read-only filesystem: chmod would not stop root); unmounted after the test."""
    import subprocess

    mounted = []

    def mount(name, size, read_only=False):
        d = tmp_path / name
        d.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "alike-test", str(d)], capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", str(d)], check=False)


def one_error(p, code):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code, p.stderr
    assert len(lines) == 1 and lines[0].startswith("alike: error: "), p.stderr
    assert "Traceback" not in p.stderr and "Unhandled error" not in p.stderr
    return lines[0]


def test_restore_targets_that_cannot_take_it(alike, tmp_path, tmpfs):
    """A read-only folder, an existing folder with --force, a filesystem too small: refused
    before any data moves, one line each; a disk that fills during the restore: the restore's
    own wording (not the backup's "Nothing partial was committed"), no Ray error after it."""
    import os
    import subprocess
    import sys

    store = tmp_path / "ads"
    alike.json("init", "--store", store)
    img = images.random_image(tmp_path / "web.raw", 4)
    alike.json("backup", "--store", store, f"image:{img}", "--name", "web")

    ro = tmpfs("ro", "1m", read_only=True)
    line = one_error(alike("restore", "--store", store, "web", "--to", ro / "web.raw"), 2)
    assert str(ro) in line

    folder = tmp_path / "existing"
    folder.mkdir()
    line = one_error(alike("restore", "--store", store, "web", "--to", folder, "--force"), 2)
    assert "is a folder" in line and folder.is_dir()

    small = tmpfs("small", "2m")
    line = one_error(alike("restore", "--store", store, "web", "--to", small / "web.raw"), 4)
    assert "No space left for the restore on" in line and "needs 4.0 MiB" in line and "committed" not in line
    line = one_error(alike("restore", "--store", store, "web", "--to", small / "web.qcow2"), 4)
    assert "needs 8.0 MiB" in line  # the raw file, then the qcow2 one
    assert os.listdir(small) == []

    # room when checked, none once the writes begin (held at the first write task, then filled)
    full = tmpfs("full", "8m")
    flag = tmp_path / "paused"
    env = dict(os.environ, RAY_ADDRESS=alike.address, ALIKE_CRASH_AT="restore-task:1:pause",
               ALIKE_CRASH_FLAG=str(flag))
    p = subprocess.Popen([sys.executable, "-m", "alike_ray.cli", "restore", "--store", str(store), "web", "--to",
                          str(full / "web.raw")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(flag, p, "the restore's first write")
        with open(full / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\xff" * 65536)
                    f.flush()
            except OSError:
                pass
    finally:
        flag.unlink(missing_ok=True)
        out, err = p.communicate(timeout=240)
    p.stderr = err
    line = one_error(p, 4)
    assert "No space left for the restore on" in line and "committed" not in line, line
    assert os.listdir(full) == ["filler"]
