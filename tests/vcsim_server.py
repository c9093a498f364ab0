"""govmomi's vCenter simulator as a test peer: builds tests/vcsim (once, cached) and runs it.

    with Vcsim(tmp_path) as sim:           # or sim = Vcsim(dir).start() ... sim.stop()
        sim.url, sim.host, sim.port, sim.username, sim.password, sim.cert_file
        sim.ssl_context()                   # verifies the launcher's own certificate
        sim.guest_write("DC0_H0_VM0", disk_key, offset, data)   # into the VM's current disk
        sim.folder_url("DC0_H0_VM0/disk1-flat.vmdk")            # /folder/...?dcPath=&dsName=
        sim.stats()                         # what the launcher's own work cost so far (/alike/stats)

What the simulator does itself and what tests/vcsim adds: the package comment of
tests/vcsim/main.go. The build: tests/vcsim/build.sh (Debian packages, GO111MODULE=off).
"""
from __future__ import annotations

import json
import os
import select
import signal
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "vcsim" / "build.sh"


class VcsimBuildError(RuntimeError):
    pass


def build(timeout: float = 1800) -> str:
    """Build the launcher if its cached binary is missing; returns the binary's path."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not os.access(lines[-1], os.X_OK):
        raise VcsimBuildError(f"tests/vcsim/build.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return lines[-1]


class Vcsim:
    """One launcher process. stop() ends only the process that start() started.

    By default one QueryChangedDiskAreas answer covers at most 16 MiB and 64 areas (the launcher's
    own defaults are 256 MiB and 1024), so that a client that does not loop over the disk fails
    on the 64 MiB model disks. None leaves the launcher's default.
    """

    def __init__(self, workdir, *, username: str = "alike", password: str = "alike-vcsim-pw",
                 http: bool = False, disk_mb: int = 64, second_disk_mb: int = 16, seed: bool = True,
                 granule: int = 64 << 10, cbt_span: int | None = 16 << 20, cbt_max_areas: int | None = 64,
                 folder_auth: bool = True, extra_args: tuple[str, ...] = ()):
        self.workdir = Path(workdir)
        self.username, self.password = username, password
        self.args = ["-listen", "127.0.0.1:0", "-username", username, "-password", password,
                     "-disk-mb", str(disk_mb), "-second-disk-mb", str(second_disk_mb),
                     f"-seed={'true' if seed else 'false'}", "-granule", str(granule),
                     f"-folder-auth={'true' if folder_auth else 'false'}", "-exit-on-stdin-eof"]
        if http:
            self.args.append("-http")
        if cbt_span is not None:
            self.args += ["-cbt-span", str(cbt_span)]
        if cbt_max_areas is not None:
            self.args += ["-cbt-max-areas", str(cbt_max_areas)]
        self.args += list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self.log_path = self.workdir / "vcsim.log"

    # -- life cycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "Vcsim":
        binary = build()
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([binary, "-dir", str(self.workdir / "state"), *self.args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"vcsim did not start; its log:\n{self.log_text()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    continue
                line += chunk
        self.info = json.loads(line.decode())
        return self

    def stop(self, timeout: float = 10) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def __enter__(self) -> "Vcsim":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- what the launcher printed ---------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.info["url"]

    @property
    def base_url(self) -> str:
        return f"{self.info['scheme']}://{self.info['host']}:{self.info['port']}"

    @property
    def host(self) -> str:
        return self.info["host"]

    @property
    def port(self) -> int:
        return self.info["port"]

    @property
    def cert_file(self) -> str:
        return self.info["cert_file"]

    @property
    def datacenter(self) -> str:
        return self.info["datacenter"]

    @property
    def datastores(self) -> dict[str, str]:
        return self.info["datastores"]

    @property
    def vms(self) -> list[str]:
        return self.info["vms"]

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.cert_file:
            return None
        return ssl.create_default_context(cafile=self.cert_file)

    # -- helpers for tests -------------------------------------------------------------------
    def folder_url(self, path: str, datastore: str = "LocalDS_0") -> str:
        """The datastore HTTP URL of "dir/file" on a datastore."""
        q = urllib.parse.urlencode({"dcPath": self.datacenter, "dsName": datastore})
        return f"{self.base_url}/folder/{urllib.parse.quote(path)}?{q}"

    def _request(self, method: str, path: str, data: bytes | None = None, headers=None):
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers or {})
        with urllib.request.urlopen(req, context=self.ssl_context(), timeout=60) as resp:
            return json.loads(resp.read())

    def credentials_file(self, path) -> str:
        """A mode-0600 TOML with this simulator's username and password (as alike's --credentials wants)."""
        path = os.fspath(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"username = {json.dumps(self.username)}\npassword = {json.dumps(self.password)}\n")
        return path

    def guest_write(self, vm: str, disk_key: int, offset: int, data: bytes) -> dict:
        """A write by the guest: into the VM's current disk (tests/vcsim's /alike/write)."""
        q = urllib.parse.urlencode({"vm": vm, "disk": disk_key, "offset": offset})
        return self._request("PUT", f"/alike/write?{q}", data, {"Content-Type": "application/octet-stream"})

    def stats(self) -> dict:
        """{name: {"calls", "seconds", "bytes"}}: what the launcher's own emulation work (its snapshot
        copies, content-hash passes, consolidations, QueryChangedDiskAreas, ...) cost since it started
        (tests/vcsim's /alike/stats; main.go's package comment names them)."""
        return self._request("GET", "/alike/stats")["costs"]

    def disks(self, vm: str) -> dict:
        """Each disk's key, capacity, current file, chain and snapshots' files (/alike/disks)."""
        return self._request("GET", "/alike/disks?" + urllib.parse.urlencode({"vm": vm}))
