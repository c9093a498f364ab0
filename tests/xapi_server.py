"""A protocol-level XenServer/XCP-ng XAPI test server (a stand-in for a pool master, NOT XAPI).

No XAPI can run on a test machine. This module is a small server that answers the XenAPI
XML-RPC protocol the way a XAPI pool master does, for the methods a backup source needs,
following the XenAPI reference (the datamodel in xapi-project/xen-api, ocaml/idl/datamodel*.ml,
the error codes of ocaml/xapi-consts/api_errors.ml, the XVA format of export.ml/import.ml and
stream_vdi.ml). It is faithful where a client can tell and dumb everywhere else. The contract
with alike's `xen:` source is /work/notes/xapi_spec.md.

What it implements (all of it real, nothing is faked from what a test says it did):
- XML-RPC at POST / (and /RPC2) over http or https (a self-signed cert made with
  `cryptography`), XAPI's envelope {"Status": "Success", "Value": v} /
  {"Status": "Failure", "ErrorDescription": [CODE, params...]}; ints are XML-RPC strings, as
  XAPI sends them; refs are OpaqueRef:<uuid4>; DateTimes are dateTime.iso8601.
- Errors: SESSION_AUTHENTICATION_FAILED, SESSION_INVALID, HOST_IS_SLAVE, MESSAGE_METHOD_UNKNOWN,
  MESSAGE_PARAMETER_COUNT_MISMATCH, HANDLE_INVALID, UUID_INVALID, FIELD_TYPE_ERROR (a missing
  required field of a constructor, the fields as in the datamodel), MAP_DUPLICATE_KEY,
  VM_BAD_POWER_STATE, VM_IS_TEMPLATE, OPERATION_NOT_ALLOWED, SR_FULL, VDI_IN_USE,
  VDI_INCOMPATIBLE_TYPE, VDI_NO_CBT_METADATA, SR_BACKEND_FAILURE_460, IMPORT_ERROR.
- Objects pool, host, SR, PBD, network, VM, VBD, VDI, VIF, task, session, with their records;
  generic <class>.get_all / get_all_records / get_record / get_by_uuid / get_by_name_label /
  get_<field> / add_to_<map> / remove_from_<map> / set_<a few fields>, and the specific
  methods of the spec: VM.snapshot/checkpoint/create/destroy/start/resume/shutdowns,
  VBD/VDI/VIF create/destroy, VDI.resize/enable_cbt/disable_cbt/data_destroy/
  list_changed_blocks/get_nbd_info, task.create/destroy.
- VDIs are sparse raw files under the root dir; a snapshot copies them (cp --reflink=auto
  --sparse=always) at that instant; list_changed_blocks compares the real contents of the two
  VDIs at 64 KiB granularity (numpy over pread chunks, holes skipped with SEEK_DATA); a
  data_destroyed VDI's contents are kept outside the SR, only for list_changed_blocks.
- NBD through real `qemu-nbd` processes (read-only, --shared=16, --persistent, TLS with an
  x509 cert of its own unless the network purpose is insecure_nbd), one per VDI and session
  (the export name carries the session, as XAPI's does), started on the first get_nbd_info,
  stopped by pid when the VDI goes and when the server stops.
- HTTP GET /export_raw_vdi, PUT /import_raw_vdi (raw only), PUT /import of an XVA (ova.xml,
  1 MiB chunks with inline sha1 .checksum members; a bad checksum fails the task and leaves
  nothing behind) with the task's result the XML-RPC encoding of the new VM refs.
  write_xva() writes such an archive, for tests.

What it does not do: run guests (power states are flags; a "guest write" is a test calling
guest_write), pools of more than one host (a slave only answers HOST_IS_SLAVE), RBAC, events
(event.from), Async.* methods, VHD/qcow2 formats on the HTTP handlers, VM.export, clone/copy/
revert, migration, the xxhash checksums of newer XVAs, HTTP basic auth, the CBT log files
of SM (bitmaps are computed from contents instead), and NBD exports are not withdrawn when
their session logs out (XAPI refuses new connections then).

Run it alone: python -m tests.xapi_server --root DIR [--port N] [--no-tls] [--vm NAME=IMAGE ...]
"""
from __future__ import annotations

import argparse
import atexit
import base64
import datetime
import errno
import hashlib
import inspect
import io
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import uuid as uuidlib
import weakref
import xmlrpc.client
from http.server import ThreadingHTTPServer
from xmlrpc.server import SimpleXMLRPCDispatcher, SimpleXMLRPCRequestHandler

import numpy as np

NULL = "OpaqueRef:NULL"
CBT_BLOCK = 64 * 1024
XVA_CHUNK = 1024 * 1024
EPOCH = "19700101T00:00:00Z"
API_MAJOR, API_MINOR = "2", "21"
ERR_460 = ["SR_BACKEND_FAILURE_460", "",
           "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are unrelated]", ""]

# Required fields of the constructors (the RW/StaticRO fields without a default value in
# ocaml/idl/datamodel.ml and datamodel_vm.ml); a missing one is FIELD_TYPE_ERROR [field].
REQUIRED = {
    "VM": ["name_label", "name_description", "user_version", "is_a_template", "affinity",
           "memory_static_max", "memory_dynamic_max", "memory_dynamic_min", "memory_static_min",
           "VCPUs_params", "VCPUs_max", "VCPUs_at_startup", "actions_after_shutdown",
           "actions_after_reboot", "actions_after_crash", "PV_bootloader", "PV_kernel", "PV_ramdisk",
           "PV_args", "PV_bootloader_args", "PV_legacy_args", "HVM_boot_policy", "HVM_boot_params",
           "platform", "PCI_bus", "other_config", "recommendations"],
    "VDI": ["name_label", "name_description", "SR", "virtual_size", "type", "sharable", "read_only",
            "other_config"],
    "VBD": ["VM", "VDI", "userdevice", "bootable", "mode", "type", "empty", "other_config",
            "qos_algorithm_type", "qos_algorithm_params"],
    "VIF": ["device", "network", "VM", "MAC", "MTU", "other_config", "qos_algorithm_type",
            "qos_algorithm_params"],
}
SETTABLE = {"name_label", "name_description", "other_config", "tags", "xenstore_data", "sm_config",
            "platform", "HVM_boot_params", "HVM_boot_policy", "PV_args", "is_a_template"}
UNLOCKED = {"VDI.list_changed_blocks"}  # takes the lock itself, compares outside it
CLASSES = ["session", "pool", "host", "SR", "PBD", "network", "VM", "VBD", "VDI", "VIF", "task"]


class Failure(Exception):
    """A XAPI failure: ErrorDescription = [code, params...] (all strings)."""

    def __init__(self, code, *params):
        super().__init__(code, *params)
        self.description = [str(code)] + [str(p) for p in params]


def _ref() -> str:
    return f"OpaqueRef:{uuidlib.uuid4()}"


def _uuid() -> str:
    return str(uuidlib.uuid4())


def _now() -> xmlrpc.client.DateTime:
    return xmlrpc.client.DateTime(datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H:%M:%SZ"))


def _is_zero(b) -> bool:
    return not any(memoryview(b).cast("B")) if len(b) < 4096 else \
        not np.frombuffer(b, np.uint8).any()


def vm_record(name: str, *, description: str = "", memory: int = 256 << 20, vcpus: int = 1,
              power_state: str = "Halted", tags=(), uuid: str | None = None) -> dict:
    """A full VM record as XAPI gives it (ints as strings), refs left empty."""
    mem = str(int(memory))
    return {
        "uuid": uuid or _uuid(), "name_label": name, "name_description": description,
        "allowed_operations": [], "current_operations": {},
        "power_state": power_state, "user_version": "1", "is_a_template": False,
        "is_default_template": False, "suspend_VDI": NULL, "resident_on": NULL,
        "scheduled_to_be_resident_on": NULL, "affinity": NULL,
        "memory_overhead": "0", "memory_target": mem, "memory_static_max": mem,
        "memory_dynamic_max": mem, "memory_dynamic_min": mem, "memory_static_min": str(min(int(mem), 16 << 20)),
        "VCPUs_params": {}, "VCPUs_max": str(vcpus), "VCPUs_at_startup": str(vcpus),
        "actions_after_softreboot": "soft_reboot", "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart", "actions_after_crash": "restart",
        "consoles": [], "VIFs": [], "VBDs": [], "VUSBs": [], "crash_dumps": [], "VTPMs": [],
        "PV_bootloader": "", "PV_kernel": "", "PV_ramdisk": "", "PV_args": "",
        "PV_bootloader_args": "", "PV_legacy_args": "",
        "HVM_boot_policy": "BIOS order", "HVM_boot_params": {"order": "cdn"}, "HVM_shadow_multiplier": 1.0,
        "platform": {"acpi": "1", "apic": "true", "pae": "true", "viridian": "false", "nx": "true",
                     "device-model": "qemu-upstream-compat"},
        "PCI_bus": "", "other_config": {}, "domid": "-1", "domarch": "", "last_boot_CPU_flags": {},
        "is_control_domain": False, "metrics": NULL, "guest_metrics": NULL,
        "last_booted_record": "", "recommendations": "", "xenstore_data": {},
        "ha_always_run": False, "ha_restart_priority": "", "is_a_snapshot": False,
        "snapshot_of": NULL, "snapshots": [], "snapshot_time": xmlrpc.client.DateTime(EPOCH),
        "transportable_snapshot_id": "", "blobs": {}, "tags": list(tags), "blocked_operations": {},
        "snapshot_info": {}, "snapshot_metadata": "", "parent": NULL, "children": [],
        "bios_strings": {}, "protection_policy": NULL, "is_snapshot_from_vmpp": False,
        "snapshot_schedule": NULL, "is_vmss_snapshot": False, "appliance": NULL,
        "start_delay": "0", "shutdown_delay": "0", "order": "0", "VGPUs": [], "attached_PCIs": [],
        "suspend_SR": NULL, "version": "0", "generation_id": "0:0", "hardware_platform_version": "0",
        "has_vendor_device": False, "requires_reboot": False, "reference_label": "",
        "domain_type": "hvm", "NVRAM": {}, "pending_guidances": [],
    }


def vdi_record(name: str, sr: str, size: int, *, vtype: str = "user", uuid: str | None = None) -> dict:
    u = uuid or _uuid()
    return {
        "uuid": u, "name_label": name, "name_description": "", "allowed_operations": [],
        "current_operations": {}, "SR": sr, "VBDs": [], "crash_dumps": [], "virtual_size": str(int(size)),
        "physical_utilisation": "0", "type": vtype, "sharable": False, "read_only": False,
        "other_config": {}, "storage_lock": False, "location": u, "managed": True, "missing": False,
        "parent": NULL, "xenstore_data": {}, "sm_config": {}, "is_a_snapshot": False,
        "snapshot_of": NULL, "snapshots": [], "snapshot_time": xmlrpc.client.DateTime(EPOCH),
        "tags": [], "allow_caching": False, "on_boot": "persist", "metadata_of_pool": NULL,
        "metadata_latest": False, "is_tools_iso": False, "cbt_enabled": False,
    }


def vbd_record(vm: str, vdi: str, userdevice: str, *, vtype: str = "Disk", mode: str = "RW",
               bootable: bool = False, empty: bool = False, device: str = "") -> dict:
    return {
        "uuid": _uuid(), "allowed_operations": [], "current_operations": {}, "VM": vm, "VDI": vdi,
        "device": device, "userdevice": userdevice, "bootable": bootable, "mode": mode, "type": vtype,
        "unpluggable": True, "storage_lock": False, "empty": empty, "other_config": {},
        "currently_attached": False, "status_code": "0", "status_detail": "", "runtime_properties": {},
        "qos_algorithm_type": "", "qos_algorithm_params": {}, "qos_supported_algorithms": [],
        "metrics": NULL,
    }


def vif_record(vm: str, network: str, device: str, mac: str) -> dict:
    return {
        "uuid": _uuid(), "allowed_operations": [], "current_operations": {}, "device": device,
        "network": network, "VM": vm, "MAC": mac, "MTU": "1500", "other_config": {},
        "currently_attached": False, "status_code": "0", "status_detail": "", "runtime_properties": {},
        "qos_algorithm_type": "", "qos_algorithm_params": {}, "qos_supported_algorithms": [],
        "metrics": NULL, "MAC_autogenerated": False, "locking_mode": "network_default",
        "ipv4_allowed": [], "ipv6_allowed": [], "ipv4_configuration_mode": "None", "ipv4_addresses": [],
        "ipv4_gateway": "", "ipv6_configuration_mode": "None", "ipv6_addresses": [], "ipv6_gateway": "",
    }


# -- certificates ---------------------------------------------------------------------------------

def make_cert(directory: str, cn: str = "localhost") -> dict:
    """A self-signed server certificate for CN `cn`, SAN DNS:localhost + IP:127.0.0.1, written as
    server-cert.pem / server-key.pem, plus ca-cert.pem: the same name and key with CA:TRUE.

    The server cert is self-signed (a client can pin it alone, as XAPI's clients pin the host
    certificate); ca-cert.pem is there because qemu/gnutls wants a CA:TRUE cert as the CA and
    a CA:FALSE cert as the server's, and both verify the other (same subject, same key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    os.makedirs(directory, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())

    def build(ca: bool) -> bytes:
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=365))
             .add_extension(x509.SubjectAlternativeName(
                 [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
             .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=not ca,
                                          key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), True)
             .add_extension(ski, False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False))
        if not ca:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    paths = {n: os.path.join(directory, n) for n in ("server-cert.pem", "server-key.pem", "ca-cert.pem")}
    with open(paths["server-cert.pem"], "wb") as f:
        f.write(build(False))
    with open(paths["ca-cert.pem"], "wb") as f:
        f.write(build(True))
    fd = os.open(paths["server-key.pem"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    return paths


# -- XVA ------------------------------------------------------------------------------------------

def _xmlrpc_value(v) -> str:
    """The XML-RPC <value> of v alone (as XAPI's Xmlrpc.to_string writes ova.xml)."""
    s = xmlrpc.client.dumps((v,), allow_none=False)
    return s.replace("<params>\n<param>\n", "", 1).rsplit("</param>\n</params>", 1)[0].strip()


def _parse_xmlrpc_value(s: str):
    (v,), _ = xmlrpc.client.loads(
        "<?xml version='1.0'?><methodResponse><params><param>" + s + "</param></params></methodResponse>")
    return v


def write_xva(out, name: str, disks=(), *, power_state: str = "Halted", suspend: bytes | None = None,
              memory: int = 64 << 20, vcpus: int = 1, tags=(), corrupt: tuple | None = None,
              skip_zero_chunks: bool = True) -> None:
    """Write an XVA (the format of XAPI's VM.export) of one VM to `out` (a path or a binary file).

    disks: bytes or paths of raw images, in userdevice order. power_state "Suspended" with
    `suspend` (the memory image) writes a suspended VM with its suspend VDI. corrupt=(i, chunk)
    writes a wrong checksum for that chunk of VDI i (the suspend VDI is the last one)."""
    datas = []
    for d in disks:
        if isinstance(d, (bytes, bytearray, memoryview)):
            datas.append(bytes(d))
        else:
            with open(d, "rb") as f:
                datas.append(f.read())
    if suspend is not None:
        size = max(int(memory), len(suspend))
        datas.append(bytes(suspend) + bytes(size - len(suspend)))
    ids = iter(range(1000))
    nid = lambda: f"Ref:{next(ids)}"  # noqa: E731
    vm_id, sr_id, net_id, vif_id = nid(), nid(), nid(), nid()
    vdi_ids = [nid() for _ in datas]
    vbd_ids = [nid() for _ in disks]
    vm = vm_record(name, memory=memory, vcpus=vcpus, power_state=power_state, tags=tags)
    vm["VBDs"], vm["VIFs"] = vbd_ids, [vif_id]
    if suspend is not None:
        vm["suspend_VDI"] = vdi_ids[-1]
    objects = [{"class": "VM", "id": vm_id, "snapshot": vm}]
    for i, data in enumerate(datas):
        is_suspend = suspend is not None and i == len(datas) - 1
        rec = vdi_record("Suspend image" if is_suspend else f"{name} disk {i}", sr_id, len(data),
                         vtype="suspend" if is_suspend else "user")
        rec["VBDs"] = [] if is_suspend else [vbd_ids[i]]
        objects.append({"class": "VDI", "id": vdi_ids[i], "snapshot": rec})
    for i, _ in enumerate(disks):
        rec = vbd_record(vm_id, vdi_ids[i], str(i), bootable=i == 0, device=f"xvd{chr(97 + i)}")
        objects.append({"class": "VBD", "id": vbd_ids[i], "snapshot": rec})
    sr = {"uuid": _uuid(), "name_label": "Local storage", "name_description": "", "type": "ext",
          "content_type": "user", "VDIs": vdi_ids, "PBDs": [], "other_config": {}, "sm_config": {}}
    objects.append({"class": "SR", "id": sr_id, "snapshot": sr})
    net = {"uuid": _uuid(), "name_label": "Pool-wide network associated with eth0", "name_description": "",
           "bridge": "xenbr0", "MTU": "1500", "VIFs": [vif_id], "PIFs": [], "other_config": {}, "purpose": []}
    objects.append({"class": "network", "id": net_id, "snapshot": net})
    objects.append({"class": "VIF", "id": vif_id, "snapshot": vif_record(vm_id, net_id, "0", "aa:bb:cc:00:00:01")})
    header = {"version": {"hostname": "xcp-test", "date": "2025-01-01", "product_version": "8.3.0",
                          "product_brand": "XCP-ng", "build_number": "release/test", "xapi_major": 24,
                          "xapi_minor": 19, "export_vsn": 2},
              "objects": objects}
    own = isinstance(out, (str, os.PathLike))
    f = open(out, "wb") if own else out
    try:
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            def add(member: str, payload: bytes):
                ti = tarfile.TarInfo(member)
                ti.size, ti.mtime, ti.mode = len(payload), int(time.time()), 0o644
                tar.addfile(ti, io.BytesIO(payload))
            add("ova.xml", _xmlrpc_value(header).encode())
            for i, data in enumerate(datas):
                n = max(1, -(-len(data) // XVA_CHUNK))
                for c in range(n):
                    chunk = data[c * XVA_CHUNK:(c + 1) * XVA_CHUNK]
                    if skip_zero_chunks and c != n - 1 and _is_zero(chunk):
                        continue
                    member = f"{vdi_ids[i]}/{c:08d}"
                    add(member, chunk)
                    digest = hashlib.sha1(chunk).hexdigest()
                    if corrupt == (i, c):
                        digest = hashlib.sha1(chunk + b"x").hexdigest()
                    add(member + ".checksum", digest.encode())
    finally:
        if own:
            f.close()


# -- HTTP plumbing ----------------------------------------------------------------------------------

class _Body:
    """The request body as a file: Content-Length or chunked transfer encoding."""

    def __init__(self, rfile, headers):
        self.rfile = rfile
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self.left = None if self.chunked else int(headers.get("Content-Length") or 0)
        self.chunk_left = 0
        self.done = False

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while (n < 0 or len(out) < n) and not self.done:
            want = (1 << 20) if n < 0 else n - len(out)
            if not self.chunked:
                if self.left <= 0:
                    self.done = True
                    break
                b = self.rfile.read(min(want, self.left))
                if not b:
                    raise EOFError("premature end of the request body")
                self.left -= len(b)
                out += b
                continue
            if self.chunk_left == 0:
                line = self.rfile.readline(1024).strip()
                size = int(line.split(b";")[0] or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024).strip():
                        pass
                    self.done = True
                    break
                self.chunk_left = size
            b = self.rfile.read(min(want, self.chunk_left))
            if not b:
                raise EOFError("premature end of the request body")
            self.chunk_left -= len(b)
            out += b
            if self.chunk_left == 0:
                self.rfile.readline(16)
        return bytes(out)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class _Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/", "/RPC2")
    timeout = 300

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def log_request(self, code="-", size="-"):
        pass

    def _params(self):
        u = urllib.parse.urlsplit(self.path)
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(u.query).items()}
        return u.path, q

    def _reply(self, code: int, body: bytes = b"", ctype: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)
        self.close_connection = True

    def do_GET(self):
        path, q = self._params()
        self.server.xapi._http(self, "GET", path, q)

    def do_PUT(self):
        path, q = self._params()
        self.server.xapi._http(self, "PUT", path, q)


class _HTTPServer(ThreadingHTTPServer, SimpleXMLRPCDispatcher):
    daemon_threads = True
    logRequests = False

    def __init__(self, addr, xapi, ssl_ctx):
        self.xapi = xapi
        self.ssl_ctx = ssl_ctx
        self.conns: dict[threading.Thread, socket.socket] = {}
        self.conns_lock = threading.Lock()
        SimpleXMLRPCDispatcher.__init__(self, allow_none=True, encoding=None)
        ThreadingHTTPServer.__init__(self, addr, _Handler)

    def _dispatch(self, method, params):
        return self.xapi._call(method, params)

    def get_request(self):
        sock, addr = self.socket.accept()
        if self.ssl_ctx is not None:
            sock = self.ssl_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def process_request(self, request, client_address):
        t = threading.Thread(target=self._serve_one, args=(request, client_address), daemon=True,
                             name="xapi-http")
        with self.conns_lock:
            self.conns[t] = request
        t.start()

    def _serve_one(self, request, client_address):
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self.conns_lock:
                self.conns.pop(threading.current_thread(), None)

    def handle_error(self, request, client_address):
        import sys as _sys

        if isinstance(_sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            return  # a client that refused our certificate, or went away: what a server shrugs at
        if not self.xapi._stopping:
            super().handle_error(request, client_address)

    def close_all(self, timeout: float = 5.0) -> None:
        with self.conns_lock:
            items = list(self.conns.items())
        for _, s in items:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t, _ in items:
            t.join(timeout)


# -- the server -------------------------------------------------------------------------------------

_LIVE: "weakref.WeakSet[XapiServer]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for s in list(_LIVE):
        try:
            s.stop()
        except Exception:
            pass


class XapiServer:
    """A protocol-level XAPI pool master (see the module docstring). Test-side API:
    start() -> url, stop(), `with XapiServer(...) as srv`, add_vm(), add_sr(), vdi_of(),
    vdi_path(), guest_write(), export(), set_memory(), set_nbd(), objects(cls) -> {ref: record},
    nbd_pids(), credentials_file(), url, ca_file (the HTTPS cert, self-signed: the CA bundle),
    nbd_ca_dir (ca-cert.pem for a qemu NBD client).
    `calls`: every call made, in order: (method, args without the session) for XML-RPC (the
    password of a login shown as "***"), ("HTTP GET /export_raw_vdi", ((key, value), ...)) for
    the HTTP handlers (the query without session_id)."""

    def __init__(self, root, username: str = "root", password: str = "secret", tls: bool = True,
                 nbd: str | None = "nbd", sr_size: int = 1 << 40, slave_of: str | None = None,
                 port: int = 0, host: str = "127.0.0.1"):
        self.root = os.path.abspath(os.fspath(root))
        self.username, self.password = username, password
        self.tls, self.slave_of = tls, slave_of
        self.bind = (host, port)
        self.lock = threading.RLock()
        self.t: dict[str, dict[str, dict]] = {c: {} for c in CLASSES}
        self.calls: list[tuple[str, tuple]] = []
        self.on_snapshot = None  # test hook: called with the VM's uuid right after each snapshot/checkpoint
        self._files: dict[str, str] = {}          # VDI ref -> data file (in the SR)
        self._cbt_kept: dict[str, str] = {}       # data_destroyed VDI ref -> kept contents (outside the SR)
        self._cbt_epoch: dict[str, int] = {}      # live VDI ref -> CBT epoch (bumped by disable/resize)
        self._cbt_link: dict[str, tuple] = {}     # snapshot VDI ref -> (origin VDI ref, epoch)
        self._memory: dict[str, bytes] = {}       # VM ref -> "memory" for checkpoints
        self._nbd: dict[tuple, dict] = {}         # (VDI ref, session, tls) -> {pid, port, name}
        self._nbd_pids: set[int] = set()          # every qemu-nbd this server started
        self._mac = 0
        self._stopping = False
        self._local = threading.local()   # the session of the call this thread serves
        self.httpd: _HTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.url = ""
        os.makedirs(self.root, exist_ok=True)
        for d in ("cbt-log", "nbd", "tls"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        self.https_cert = make_cert(os.path.join(self.root, "tls", "https"))
        self.ca_file = self.https_cert["server-cert.pem"]
        self.nbd_cert = make_cert(os.path.join(self.root, "tls", "nbd"))
        # for a qemu client (tls-creds-x509,endpoint=client,dir=nbd_ca_dir): ca-cert.pem alone
        self.nbd_ca_dir = os.path.join(self.root, "tls", "nbd-client")
        os.makedirs(self.nbd_ca_dir, exist_ok=True)
        shutil.copyfile(self.nbd_cert["ca-cert.pem"], os.path.join(self.nbd_ca_dir, "ca-cert.pem"))
        self._populate(sr_size, nbd)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> str:
        ctx = None
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.https_cert["server-cert.pem"], self.https_cert["server-key.pem"])
        self.httpd = _HTTPServer(self.bind, self, ctx)
        port = self.httpd.server_address[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True, name="xapi-server")
        self.thread.start()
        _LIVE.add(self)
        return self.url

    def stop(self) -> None:
        self._stopping = True
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd.close_all()
            self.httpd = None
        if self.thread is not None:
            self.thread.join(5)
            self.thread = None
        with self.lock:
            keys = list(self._nbd)
        for k in keys:
            self._nbd_stop(k)
        for pid in list(self._nbd_pids):
            _kill_pid(pid)
        _LIVE.discard(self)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- initial objects ------------------------------------------------------------------------
    def _new(self, cls: str, rec: dict) -> str:
        ref = _ref()
        rec.setdefault("uuid", _uuid())
        self.t[cls][ref] = rec
        return ref

    def _populate(self, sr_size: int, nbd) -> None:
        self.host_ref = self._new("host", {
            "name_label": "xcp-test", "name_description": "Default install", "hostname": "xcp-test",
            "address": "127.0.0.1", "API_version_major": API_MAJOR, "API_version_minor": API_MINOR,
            "API_version_vendor": "XenSource", "API_version_vendor_implementation": {}, "enabled": True,
            "software_version": {"product_version": "8.3.0", "product_brand": "XCP-ng", "platform_name": "XCP",
                                 "xapi": "24.19", "build_number": "release/test"},
            "other_config": {}, "capabilities": [], "cpu_info": {"cpu_count": "2"}, "memory_overhead": "0",
            "PIFs": [], "PBDs": [], "resident_VMs": [], "tags": [], "edition": "xcp-ng"})
        self.pool_ref = self._new("pool", {
            "name_label": "", "name_description": "", "master": self.host_ref, "default_SR": NULL,
            "suspend_image_SR": NULL, "crash_dump_SR": NULL, "other_config": {}, "ha_enabled": False,
            "tags": [], "restrictions": {}})
        self.sr_ref = self.add_sr("Local storage", sr_size)
        self.t["pool"][self.pool_ref]["default_SR"] = self.sr_ref
        self.t["pool"][self.pool_ref]["suspend_image_SR"] = self.sr_ref
        self.net_ref = self._new("network", {
            "name_label": "Pool-wide network associated with eth0", "name_description": "", "bridge": "xenbr0",
            "MTU": "1500", "purpose": [nbd] if nbd else [], "VIFs": [], "PIFs": [], "other_config": {},
            "managed": True, "tags": [], "blobs": {}, "default_locking_mode": "unlocked",
            "allowed_operations": [], "current_operations": {}, "assigned_ips": {}})
        dom0 = vm_record("Control domain on host: xcp-test", power_state="Running", memory=1 << 30, vcpus=2)
        dom0.update(is_control_domain=True, resident_on=self.host_ref, domid="0", domain_type="pv")
        self._new("VM", dom0)
        tmpl = vm_record("Debian Bookworm 12", description="Template for Debian 12")
        tmpl.update(is_a_template=True, is_default_template=True, other_config={"default_template": "true"})
        self._new("VM", tmpl)

    def add_sr(self, name: str, size: int) -> str:
        with self.lock:
            ref = self._new("SR", {
                "name_label": name, "name_description": "", "type": "ext", "content_type": "user",
                "physical_size": str(int(size)), "physical_utilisation": "0", "virtual_allocation": "0",
                "VDIs": [], "PBDs": [], "shared": False, "other_config": {}, "sm_config": {"devserial": "scsi-test"},
                "tags": [], "allowed_operations": ["vdi_create", "vdi_destroy", "vdi_snapshot",
                                                   "vdi_enable_cbt", "vdi_disable_cbt", "vdi_data_destroy",
                                                   "vdi_list_changed_blocks"],
                "current_operations": {}, "local_cache_enabled": False, "clustered": False, "is_tools_sr": False})
            os.makedirs(self._sr_dir(ref), exist_ok=True)
            self._new("PBD", {"host": self.host_ref, "SR": ref, "device_config": {"device": "/dev/sda3"},
                              "currently_attached": True, "other_config": {}})
            return ref

    def _sr_dir(self, sr_ref: str) -> str:
        return os.path.join(self.root, "sr-" + self.t["SR"][sr_ref]["uuid"])

    # -- records --------------------------------------------------------------------------------
    def _get(self, cls: str, ref) -> dict:
        rec = self.t[cls].get(ref) if isinstance(ref, str) else None
        if rec is None:
            raise Failure("HANDLE_INVALID", cls, ref)
        return rec

    def _record(self, cls: str, ref: str) -> dict:
        """The record as XAPI returns it: the stored fields plus the derived sets."""
        rec = dict(self._get(cls, ref))
        by = lambda c, f: [r for r, x in self.t[c].items() if x.get(f) == ref]  # noqa: E731
        if cls == "VM":
            rec.update(VBDs=by("VBD", "VM"), VIFs=by("VIF", "VM"), snapshots=by("VM", "snapshot_of"))
        elif cls == "VDI":
            rec.update(VBDs=by("VBD", "VDI"), snapshots=by("VDI", "snapshot_of"))
            p = self._files.get(ref)
            rec["physical_utilisation"] = str(os.stat(p).st_blocks * 512 if p and os.path.exists(p) else 0)
        elif cls == "SR":
            vdis = by("VDI", "SR")
            used = sum(int(self.t["VDI"][v]["virtual_size"]) for v in vdis
                       if self.t["VDI"][v]["type"] != "cbt_metadata")
            rec.update(VDIs=vdis, PBDs=by("PBD", "SR"), physical_utilisation=str(used), virtual_allocation=str(used))
        elif cls == "network":
            rec["VIFs"] = by("VIF", "network")
        elif cls == "host":
            rec.update(resident_VMs=by("VM", "resident_on"), PBDs=by("PBD", "host"))
        return rec

    def _sr_free(self, sr_ref: str) -> int:
        r = self._record("SR", sr_ref)
        return int(r["physical_size"]) - int(r["physical_utilisation"])

    def _attached(self, vdi_ref: str) -> bool:
        return any(b["VDI"] == vdi_ref and b["currently_attached"] for b in self.t["VBD"].values())

    def _by_uuid(self, cls: str, uuid) -> str:
        for ref, rec in self.t[cls].items():
            if rec["uuid"] == uuid:
                return ref
        raise Failure("UUID_INVALID", cls, uuid)

    # -- XML-RPC dispatch ----------------------------------------------------------------------
    def _call(self, method: str, params) -> dict:
        try:
            return {"Status": "Success", "Value": self._invoke(method, tuple(params))}
        except Failure as e:
            return {"Status": "Failure", "ErrorDescription": e.description}
        except Exception as e:  # a bug here: answer as XAPI does for an internal error
            return {"Status": "Failure", "ErrorDescription": ["INTERNAL_ERROR", f"{type(e).__name__}: {e}"]}

    def _invoke(self, method: str, params: tuple):
        with self.lock:
            shown = params
            if method.startswith("session.login"):
                shown = tuple("***" if i == 1 else p for i, p in enumerate(params))
            elif params:
                shown = params[1:]
            self.calls.append((method, shown))
        if method == "session.login_with_password":
            if not 2 <= len(params) <= 4:
                raise Failure("MESSAGE_PARAMETER_COUNT_MISMATCH", method, 4, len(params))
            return self._login(*params)
        fn, nargs = self._resolve(method)
        if len(params) != nargs + 1:
            raise Failure("MESSAGE_PARAMETER_COUNT_MISMATCH", method, nargs + 1, len(params))
        session = params[0]
        with self.lock:
            if not isinstance(session, str) or session not in self.t["session"]:
                raise Failure("SESSION_INVALID", session)
            self.t["session"][session]["last_active"] = _now()
        self._local.session = session
        return fn(*params[1:])

    def _resolve(self, method: str):
        """(function, number of params after the session) for a method name."""
        cls, _, op = method.partition(".")
        special = getattr(self, "_x_" + method.replace(".", "__"), None)
        if special is not None:
            n = len(inspect.signature(special).parameters)
            return (special if method in UNLOCKED else self._locked(special)), n
        if cls not in self.t or not op or cls == "session" and op not in ("get_record", "get_uuid", "get_this_host",
                                                                           "get_this_user", "get_all_records"):
            raise Failure("MESSAGE_METHOD_UNKNOWN", method)
        if op == "get_all":
            return self._locked(lambda: list(self.t[cls])), 0
        if op == "get_all_records":
            return self._locked(lambda: {r: self._record(cls, r) for r in self.t[cls]}), 0
        if op == "get_record":
            return self._locked(lambda ref: self._record(cls, ref)), 1
        if op == "get_by_uuid":
            return self._locked(lambda u: self._by_uuid(cls, u)), 1
        if op == "get_by_name_label" and cls not in ("VBD", "VIF", "PBD"):
            return self._locked(lambda n: [r for r, x in self.t[cls].items() if x.get("name_label") == n]), 1
        sample = self._sample(cls)
        if op.startswith("get_") and op[4:] in sample:
            return self._locked(lambda ref: self._record(cls, ref)[op[4:]]), 1
        if op.startswith("set_") and op[4:] in sample and op[4:] in SETTABLE:
            def setter(ref, value, f=op[4:]):
                self._get(cls, ref)[f] = value
                return ""
            return self._locked(setter), 2
        if op.startswith("add_to_") and isinstance(sample.get(op[7:]), dict):
            def add_to(ref, k, v, f=op[7:]):
                m = self._get(cls, ref)[f]
                if k in m:
                    raise Failure("MAP_DUPLICATE_KEY", cls, f, ref, k)
                m[k] = v
                return ""
            return self._locked(add_to), 3
        if op.startswith("remove_from_") and isinstance(sample.get(op[12:]), dict):
            def remove_from(ref, k, f=op[12:]):
                self._get(cls, ref)[f].pop(k, None)
                return ""
            return self._locked(remove_from), 2
        if op in ("add_tags", "remove_tags") and "tags" in sample:
            def tags(ref, tag):
                t = self._get(cls, ref)["tags"]
                if op == "add_tags" and tag not in t:
                    t.append(tag)
                if op == "remove_tags" and tag in t:
                    t.remove(tag)
                return ""
            return self._locked(tags), 2
        raise Failure("MESSAGE_METHOD_UNKNOWN", method)

    def _sample(self, cls: str) -> dict:
        if self.t[cls]:
            return next(iter(self.t[cls].values()))
        return {"VM": vm_record(""), "VDI": vdi_record("", NULL, 0), "VBD": vbd_record(NULL, NULL, "0"),
                "VIF": vif_record(NULL, NULL, "0", ""), "task": self._task_record("", "")}.get(cls, {})

    def _locked(self, fn):
        def run(*a):
            with self.lock:
                return fn(*a)
        run.__signature__ = inspect.signature(fn)
        return run

    # -- session --------------------------------------------------------------------------------
    def _login(self, user, pw, version="1.0", originator=""):
        if self.slave_of:
            raise Failure("HOST_IS_SLAVE", self.slave_of)
        if user != self.username or pw != self.password:
            raise Failure("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
        with self.lock:
            return self._new("session", {"this_host": self.host_ref, "this_user": NULL, "last_active": _now(),
                                         "pool": False, "originator": originator, "is_local_superuser": True,
                                         "auth_user_name": user, "subject": NULL, "validation_time": _now()})

    def _x_session__logout(self):
        with self.lock:
            self.t["session"].pop(self._local.session, None)
        return ""

    def _x_pool__get_master(self, pool):
        self._get("pool", pool)
        return self.host_ref

    # -- VM -------------------------------------------------------------------------------------
    def _x_VM__create(self, record):
        for f in REQUIRED["VM"]:
            if not isinstance(record, dict) or f not in record:
                raise Failure("FIELD_TYPE_ERROR", f)
        rec = vm_record(record["name_label"])
        rec.update({k: v for k, v in record.items() if k in rec and k not in ("uuid", "VBDs", "VIFs", "snapshots")})
        ps = record.get("power_state", "Halted")
        if ps == "Suspended" and rec.get("suspend_VDI", NULL) in self.t["VDI"]:
            rec["power_state"] = "Suspended"
        else:
            rec.update(power_state="Halted", suspend_VDI=NULL)
        rec.update(is_a_snapshot=False, snapshot_of=NULL, is_control_domain=False, resident_on=NULL)
        return self._new("VM", rec)

    def _x_VM__destroy(self, vm):
        rec = self._get("VM", vm)
        if rec["is_control_domain"]:
            raise Failure("OPERATION_NOT_ALLOWED", "The control domain cannot be destroyed")
        if not rec["is_a_snapshot"] and rec["power_state"] != "Halted" and not rec["is_a_template"]:
            raise Failure("VM_BAD_POWER_STATE", vm, "halted", rec["power_state"].lower())
        for cls in ("VBD", "VIF"):
            for r in [r for r, x in self.t[cls].items() if x["VM"] == vm]:
                del self.t[cls][r]
        del self.t["VM"][vm]
        self._memory.pop(vm, None)
        return ""

    def _set_power(self, vm, state):
        rec = self.t["VM"][vm]
        rec["power_state"] = state
        on = state in ("Running", "Paused")
        rec["resident_on"] = self.host_ref if on else NULL
        rec["domid"] = str(1 + sum(1 for x in self.t["VM"].values() if x["domid"] != "-1")) if on else "-1"
        for cls in ("VBD", "VIF"):
            for x in self.t[cls].values():
                if x["VM"] == vm:
                    x["currently_attached"] = on and not (cls == "VBD" and x["empty"])

    def _check_startable(self, vm, expected):
        rec = self._get("VM", vm)
        if rec["is_a_template"] or rec["is_a_snapshot"]:
            raise Failure("VM_IS_TEMPLATE", vm)
        if rec["power_state"] != expected:
            raise Failure("VM_BAD_POWER_STATE", vm, expected.lower(), rec["power_state"].lower())
        return rec

    def _x_VM__start(self, vm, start_paused, force):
        self._check_startable(vm, "Halted")
        self._set_power(vm, "Paused" if start_paused else "Running")
        return ""

    def _x_VM__resume(self, vm, start_paused, force):
        rec = self._check_startable(vm, "Suspended")
        sv = rec["suspend_VDI"]
        rec["suspend_VDI"] = NULL
        if sv in self.t["VDI"]:
            self._destroy_vdi(sv)
        self._set_power(vm, "Paused" if start_paused else "Running")
        return ""

    def _shutdown(self, vm, clean: bool):
        rec = self._get("VM", vm)
        ok = ("Running",) if clean else ("Running", "Paused", "Suspended")
        if rec["is_control_domain"]:
            raise Failure("OPERATION_NOT_ALLOWED", "The control domain cannot be shut down")
        if rec["power_state"] not in ok:
            raise Failure("VM_BAD_POWER_STATE", vm, "running", rec["power_state"].lower())
        if rec["power_state"] == "Suspended" and rec["suspend_VDI"] in self.t["VDI"]:
            self._destroy_vdi(rec["suspend_VDI"])
            rec["suspend_VDI"] = NULL
        self._set_power(vm, "Halted")
        return ""

    def _x_VM__hard_shutdown(self, vm):
        return self._shutdown(vm, False)

    def _x_VM__clean_shutdown(self, vm):
        return self._shutdown(vm, True)

    def _x_VM__snapshot(self, vm, new_name):
        return self._snapshot(vm, new_name, checkpoint=False)

    def _x_VM__checkpoint(self, vm, new_name):
        return self._snapshot(vm, new_name, checkpoint=True)

    def _snapshot(self, vm, new_name, checkpoint: bool) -> str:
        rec = self._get("VM", vm)
        if rec["is_a_snapshot"] or rec["is_a_template"] or rec["is_control_domain"]:
            raise Failure("OPERATION_NOT_ALLOWED", f"VM {vm} cannot be snapshotted")
        if checkpoint and rec["power_state"] != "Running":
            raise Failure("VM_BAD_POWER_STATE", vm, "running", rec["power_state"].lower())
        now = _now()
        snap = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in rec.items()}
        snap.update(uuid=_uuid(), name_label=new_name, is_a_snapshot=True, is_a_template=True, snapshot_of=vm,
                    snapshot_time=now, power_state="Suspended" if checkpoint else "Halted", resident_on=NULL,
                    domid="-1", suspend_VDI=NULL, parent=NULL, transportable_snapshot_id=_uuid())
        sref = self._new("VM", snap)
        created = []
        try:
            for b in sorted((x for x in self.t["VBD"].values() if x["VM"] == vm), key=lambda x: int(x["userdevice"])):
                if b["type"] == "CD" or b["empty"] or b["VDI"] not in self.t["VDI"]:
                    nb = vbd_record(sref, NULL, b["userdevice"], vtype=b["type"], mode=b["mode"], empty=True,
                                    device=b["device"], bootable=b["bootable"])
                    self._new("VBD", nb)
                    continue
                nv = self._snapshot_vdi(b["VDI"], now)
                created.append(nv)
                self._new("VBD", vbd_record(sref, nv, b["userdevice"], vtype=b["type"], mode=b["mode"],
                                            bootable=b["bootable"], device=b["device"]))
            for v in [x for x in self.t["VIF"].values() if x["VM"] == vm]:
                self._new("VIF", vif_record(sref, v["network"], v["device"], v["MAC"]))
            if checkpoint:
                size = int(rec["memory_static_max"])
                mem = self._memory_of(vm)[:size]
                vdi = self._create_vdi(vdi_record("Suspend image", self._vm_sr(vm), size, vtype="suspend"))
                created.append(vdi)
                with open(self._files[vdi], "r+b") as f:
                    f.write(mem)
                snap["suspend_VDI"] = vdi
        except BaseException:
            for v in created:
                self._destroy_vdi(v)
            self._x_VM__destroy(sref)
            raise
        if self.on_snapshot is not None:  # a test's hook: what the disks held at this instant, a guest write now
            self.on_snapshot(rec["uuid"])
        return sref

    def _vm_sr(self, vm) -> str:
        for b in self.t["VBD"].values():
            if b["VM"] == vm and b["VDI"] in self.t["VDI"]:
                return self.t["VDI"][b["VDI"]]["SR"]
        return self.sr_ref

    def _memory_of(self, vm) -> bytes:
        if vm not in self._memory:
            # a seeded pattern, mostly zeros: a 4 KiB page of bytes every 1 MiB of the first 8 MiB
            seed = int(hashlib.sha256(self.t["VM"][vm]["uuid"].encode()).hexdigest()[:8], 16)
            rng = np.random.default_rng(seed)
            mem = bytearray(8 << 20)
            for i in range(8):
                mem[i << 20:(i << 20) + 4096] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
            self._memory[vm] = bytes(mem)
        return self._memory[vm]

    # -- VDI ------------------------------------------------------------------------------------
    def _create_vdi(self, rec: dict) -> str:
        sr = rec["SR"]
        self._get("SR", sr)
        size = int(rec["virtual_size"])
        if size < 0:
            raise Failure("FIELD_TYPE_ERROR", "virtual_size")
        free = self._sr_free(sr)
        if size > free:
            raise Failure("SR_FULL", size, free)
        ref = self._new("VDI", rec)
        rec["location"] = rec["uuid"]
        path = os.path.join(self._sr_dir(sr), rec["uuid"] + ".img")
        with open(path, "wb") as f:
            f.truncate(size)
        self._files[ref] = path
        return ref

    def _snapshot_vdi(self, vdi, now) -> str:
        src = self.t["VDI"][vdi]
        if vdi not in self._files:
            raise Failure("VDI_INCOMPATIBLE_TYPE", vdi, src["type"])
        free = self._sr_free(src["SR"])
        if int(src["virtual_size"]) > free:
            raise Failure("SR_FULL", src["virtual_size"], free)
        rec = vdi_record(src["name_label"], src["SR"], int(src["virtual_size"]), vtype=src["type"])
        rec.update(name_description=src["name_description"], is_a_snapshot=True, snapshot_of=vdi, snapshot_time=now,
                   cbt_enabled=src["cbt_enabled"], other_config=dict(src["other_config"]),
                   sm_config=dict(src["sm_config"]), tags=list(src["tags"]))
        ref = self._new("VDI", rec)
        rec["location"] = rec["uuid"]
        path = os.path.join(self._sr_dir(src["SR"]), rec["uuid"] + ".img")
        subprocess.run(["cp", "--reflink=auto", "--sparse=always", self._files[vdi], path], check=True)
        self._files[ref] = path
        if src["cbt_enabled"]:
            self._cbt_link[ref] = (vdi, self._cbt_epoch.setdefault(vdi, 0))
        return ref

    def _destroy_vdi(self, vdi) -> None:
        for k in [k for k in self._nbd if k[0] == vdi]:
            self._nbd_stop(k)
        for d in (self._files, self._cbt_kept):
            p = d.pop(vdi, None)
            if p and os.path.exists(p):
                os.unlink(p)
        self._cbt_link.pop(vdi, None)
        self._cbt_epoch.pop(vdi, None)
        self.t["VDI"].pop(vdi, None)

    def _x_VDI__create(self, record):
        for f in REQUIRED["VDI"]:
            if not isinstance(record, dict) or f not in record:
                raise Failure("FIELD_TYPE_ERROR", f)
        try:
            size = int(record["virtual_size"])
        except (TypeError, ValueError):
            raise Failure("FIELD_TYPE_ERROR", "virtual_size") from None
        rec = vdi_record(record["name_label"], record["SR"], size, vtype=record["type"])
        for k in ("name_description", "sharable", "read_only", "other_config", "xenstore_data", "sm_config", "tags"):
            if k in record:
                rec[k] = record[k]
        return self._create_vdi(rec)

    def _x_VDI__destroy(self, vdi):
        self._get("VDI", vdi)
        if self._attached(vdi):
            raise Failure("VDI_IN_USE", vdi, "destroy")
        for b in self.t["VBD"].values():
            if b["VDI"] == vdi:
                b["VDI"], b["empty"] = NULL, True
        self._destroy_vdi(vdi)
        return ""

    def _x_VDI__snapshot(self, vdi, driver_params):
        self._get("VDI", vdi)
        return self._snapshot_vdi(vdi, _now())

    def _x_VDI__resize(self, vdi, size):
        rec = self._get("VDI", vdi)
        if rec["type"] == "cbt_metadata":
            raise Failure("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
        size = int(size)
        if size < int(rec["virtual_size"]):
            raise Failure("VDI_TOO_SMALL", vdi, size)  # XAPI/SM do not shrink
        extra = size - int(rec["virtual_size"])
        if extra > self._sr_free(rec["SR"]):
            raise Failure("SR_FULL", extra, self._sr_free(rec["SR"]))
        with open(self._files[vdi], "r+b") as f:
            f.truncate(size)
        rec["virtual_size"] = str(size)
        if rec["is_a_snapshot"]:
            self._cbt_link.pop(vdi, None)
        else:
            self._cbt_epoch[vdi] = self._cbt_epoch.get(vdi, 0) + 1
        return ""

    def _x_VDI__enable_cbt(self, vdi):
        rec = self._get("VDI", vdi)
        if rec["type"] == "cbt_metadata":
            raise Failure("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
        if rec["is_a_snapshot"]:
            raise Failure("OPERATION_NOT_ALLOWED", f"VDI {vdi} is a snapshot")
        if not rec["cbt_enabled"]:
            rec["cbt_enabled"] = True
            self._cbt_epoch[vdi] = self._cbt_epoch.get(vdi, 0) + 1
        return ""

    def _x_VDI__disable_cbt(self, vdi):
        rec = self._get("VDI", vdi)
        if rec["type"] == "cbt_metadata":
            raise Failure("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
        if rec["is_a_snapshot"]:
            raise Failure("OPERATION_NOT_ALLOWED", f"VDI {vdi} is a snapshot")
        if rec["cbt_enabled"]:
            rec["cbt_enabled"] = False
            self._cbt_epoch[vdi] = self._cbt_epoch.get(vdi, 0) + 1
        return ""

    def _x_VDI__data_destroy(self, vdi):
        rec = self._get("VDI", vdi)
        if rec["type"] == "cbt_metadata":
            return ""
        if not (rec["is_a_snapshot"] and rec["cbt_enabled"]):
            raise Failure("VDI_NO_CBT_METADATA", vdi)
        if self._attached(vdi):
            raise Failure("VDI_IN_USE", vdi, "data_destroy")
        for k in [k for k in self._nbd if k[0] == vdi]:
            self._nbd_stop(k)
        kept = os.path.join(self.root, "cbt-log", rec["uuid"] + ".img")
        os.replace(self._files.pop(vdi), kept)
        self._cbt_kept[vdi] = kept
        rec["type"] = "cbt_metadata"
        return ""

    def _cbt_id(self, vdi):
        rec = self.t["VDI"][vdi]
        if rec["is_a_snapshot"]:
            return self._cbt_link.get(vdi) if rec["cbt_enabled"] else None
        return (vdi, self._cbt_epoch.get(vdi, 0)) if rec["cbt_enabled"] else None

    def _x_VDI__list_changed_blocks(self, vdi_from, vdi_to):
        # resolve under the lock (the wrapper is not used: the comparison runs outside it)
        with self.lock:
            a, b = self._get("VDI", vdi_from), self._get("VDI", vdi_to)
            if self._attached(vdi_to) and any(
                    self.t["VM"][x["VM"]]["power_state"] == "Running"
                    for x in self.t["VBD"].values() if x["VDI"] == vdi_to and x["currently_attached"]):
                raise Failure("VDI_IN_USE", vdi_to, "list_changed_blocks")
            ida, idb = self._cbt_id(vdi_from), self._cbt_id(vdi_to)
            if ida is None or ida != idb or a["virtual_size"] != b["virtual_size"]:
                raise Failure(*ERR_460)
            size = int(b["virtual_size"])
            fa = open(self._files.get(vdi_from) or self._cbt_kept[vdi_from], "rb")
            fb = open(self._files.get(vdi_to) or self._cbt_kept[vdi_to], "rb")
        with fa, fb:
            bits = changed_blocks(fa.fileno(), fb.fileno(), size)
        return base64.b64encode(np.packbits(bits).tobytes()).decode()

    def _x_VDI__get_nbd_info(self, vdi):
        with self.lock:
            rec = self._get("VDI", vdi)
            if rec["type"] == "cbt_metadata":
                raise Failure("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
            purposes = {p for n in self.t["network"].values() for p in n["purpose"]}
            out = []
            for purpose, tls in (("nbd", True), ("insecure_nbd", False)):
                if purpose not in purposes:
                    continue
                e = self._nbd_start(vdi, self._local.session, tls)
                out.append({"address": "127.0.0.1", "port": str(e["port"]), "exportname": e["name"],
                            "cert": self._nbd_pem() if tls else "", "subject": "localhost" if tls else ""})
            return out

    def _nbd_pem(self) -> str:
        with open(self.nbd_cert["server-cert.pem"]) as f:
            return f.read()

    # -- VBD / VIF / task ----------------------------------------------------------------------
    def _x_VBD__create(self, record):
        for f in REQUIRED["VBD"]:
            if not isinstance(record, dict) or f not in record:
                raise Failure("FIELD_TYPE_ERROR", f)
        vm = record["VM"]
        self._get("VM", vm)
        empty = bool(record["empty"])
        if not empty:
            self._get("VDI", record["VDI"])
        rec = vbd_record(vm, record["VDI"] if not empty else NULL, str(record["userdevice"]), vtype=record["type"],
                         mode=record["mode"], bootable=bool(record["bootable"]), empty=empty,
                         device=record.get("device", ""))
        rec.update(other_config=dict(record["other_config"]), qos_algorithm_type=record["qos_algorithm_type"],
                   qos_algorithm_params=dict(record["qos_algorithm_params"]))
        return self._new("VBD", rec)

    def _x_VBD__destroy(self, vbd):
        rec = self._get("VBD", vbd)
        if rec["currently_attached"]:
            raise Failure("OPERATION_NOT_ALLOWED", "VBD currently attached to a running VM")
        del self.t["VBD"][vbd]
        return ""

    def _x_VBD__plug(self, vbd):
        rec = self._get("VBD", vbd)
        if self.t["VM"][rec["VM"]]["power_state"] != "Running":
            raise Failure("VM_BAD_POWER_STATE", rec["VM"], "running", self.t["VM"][rec["VM"]]["power_state"].lower())
        rec["currently_attached"] = not rec["empty"]
        return ""

    def _x_VBD__unplug(self, vbd):
        self._get("VBD", vbd)["currently_attached"] = False
        return ""

    def _x_VIF__create(self, record):
        for f in REQUIRED["VIF"]:
            if not isinstance(record, dict) or f not in record:
                raise Failure("FIELD_TYPE_ERROR", f)
        self._get("VM", record["VM"])
        self._get("network", record["network"])
        rec = vif_record(record["VM"], record["network"], str(record["device"]), record["MAC"])
        rec.update(MTU=str(record["MTU"]), other_config=dict(record["other_config"]))
        return self._new("VIF", rec)

    def _x_VIF__destroy(self, vif):
        self._get("VIF", vif)
        del self.t["VIF"][vif]
        return ""

    def _task_record(self, label, description) -> dict:
        return {"name_label": label, "name_description": description, "allowed_operations": [],
                "current_operations": {}, "created": _now(), "finished": xmlrpc.client.DateTime(EPOCH),
                "status": "pending", "resident_on": getattr(self, "host_ref", NULL), "progress": 0.0,
                "type": "<none/>", "result": "", "error_info": [], "other_config": {}, "subtask_of": NULL,
                "subtasks": [], "backtrace": "()"}

    def _x_task__create(self, label, description):
        return self._new("task", self._task_record(label, description))

    def _x_task__destroy(self, task):
        self._get("task", task)
        del self.t["task"][task]
        return ""

    def _x_task__cancel(self, task):
        rec = self._get("task", task)
        if rec["status"] == "pending":
            rec.update(status="cancelled", finished=_now(), error_info=["TASK_CANCELLED", task])
        return ""

    # -- NBD ------------------------------------------------------------------------------------
    def _nbd_start(self, vdi, session, tls: bool) -> dict:
        key = (vdi, session, tls)
        e = self._nbd.get(key)
        if e is not None and _alive(e["pid"]):
            return e
        if vdi not in self._files:
            raise Failure("VDI_INCOMPATIBLE_TYPE", vdi, self.t["VDI"][vdi]["type"])
        name = f"/{self.t['VDI'][vdi]['uuid']}?session_id={session}"
        pidfile = os.path.join(self.root, "nbd", f"{uuidlib.uuid4().hex}.pid")
        last = ""
        for _ in range(8):
            port = _free_port()
            cmd = ["qemu-nbd", "--read-only", "--shared=16", "--persistent", "--fork", f"--pid-file={pidfile}",
                   "--bind=127.0.0.1", f"--port={port}", f"--export-name={name}", "--format=raw"]
            if tls:
                cmd += ["--object", f"tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,"
                                    f"dir={os.path.dirname(self.nbd_cert['server-cert.pem'])}",
                        "--tls-creds=tls0"]
            cmd.append(self._files[vdi])
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if p.returncode == 0:
                pid = int(open(pidfile).read().strip())
                self._nbd_pids.add(pid)
                os.unlink(pidfile)
                if _wait_port(port, 10):
                    e = {"pid": pid, "port": port, "name": name}
                    self._nbd[key] = e
                    return e
                _kill_pid(pid)
                last = "qemu-nbd did not listen"
            else:
                last = p.stderr.strip()
                if "in use" not in last.lower():
                    break
        raise Failure("INTERNAL_ERROR", f"qemu-nbd failed to start: {last}")

    def _nbd_stop(self, key) -> None:
        with self.lock:
            e = self._nbd.pop(key, None)
        if e is not None:
            _kill_pid(e["pid"])

    def nbd_pids(self) -> set[int]:
        """The pids of every qemu-nbd this server started (running or not)."""
        return set(self._nbd_pids)

    # -- HTTP handlers --------------------------------------------------------------------------
    def _http(self, h: _Handler, verb: str, path: str, q: dict) -> None:
        with self.lock:
            self.calls.append((f"HTTP {verb} {path}", tuple(sorted((k, v) for k, v in q.items() if k != "session_id"))))
            ok = q.get("session_id") in self.t["session"]
        body = _Body(h.rfile, h.headers) if verb == "PUT" else None
        route = {("GET", "/export_raw_vdi"): self._h_export_raw, ("PUT", "/import_raw_vdi"): self._h_import_raw,
                 ("PUT", "/import"): self._h_import}.get((verb, path))
        if route is None:
            return h._reply(404, b"not found\n")
        if not ok:
            if body is not None and (body.chunked or body.left <= 64 << 20):
                body.drain()  # so that the client reads the 401 rather than a reset
            return h._reply(401, b"unauthorised: no valid session_id\n")
        try:
            route(h, q, body)
        except (BrokenPipeError, ConnectionResetError, EOFError, ssl.SSLError, OSError):
            h.close_connection = True

    def _http_vdi(self, q) -> str | None:
        v = q.get("vdi", "")
        with self.lock:
            if v in self.t["VDI"]:
                return v
            return next((r for r, x in self.t["VDI"].items() if x["uuid"] == v), None)

    def _h_export_raw(self, h, q, body):
        if q.get("format", "raw") != "raw":
            return h._reply(400, b"only format=raw is supported here\n")
        with self.lock:
            vdi = self._http_vdi(q)
            if vdi is None or vdi not in self._files:
                return h._reply(404, b"no such VDI\n")
            size = int(self.t["VDI"][vdi]["virtual_size"])
            f = open(self._files[vdi], "rb")
        with f:
            h.send_response(200)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("Content-Length", str(size))
            h.send_header("Connection", "close")
            h.end_headers()
            off = 0
            while off < size:
                b = os.pread(f.fileno(), min(4 << 20, size - off), off)
                b = b or bytes(min(4 << 20, size - off))
                h.wfile.write(b)
                off += len(b)
        h.close_connection = True

    def _h_import_raw(self, h, q, body):
        if q.get("format", "raw") != "raw":
            return h._reply(400, b"only format=raw is supported here\n")
        with self.lock:
            vdi = self._http_vdi(q)
            if vdi is None or vdi not in self._files:
                body.drain()
                return h._reply(404, b"no such VDI\n")
            size = int(self.t["VDI"][vdi]["virtual_size"])
            f = open(self._files[vdi], "r+b")
        with f:
            off = 0
            while True:
                b = body.read(4 << 20)
                if not b:
                    break
                if off + len(b) > size:
                    body.drain()
                    return h._reply(400, b"more bytes than the VDI's virtual size\n")
                _write_sparse(f.fileno(), b, off)
                off += len(b)
        h._reply(200, b"")

    def _h_import(self, h, q, body):
        with self.lock:
            task = q.get("task_id") if q.get("task_id") in self.t["task"] else \
                self._new("task", self._task_record("VM import", ""))
            sr = q.get("sr_id") if q.get("sr_id") in self.t["SR"] else self.sr_ref
        try:
            try:
                vms = self._import_xva(body, sr)
            except (Failure, EOFError, ConnectionError, ssl.SSLError):
                raise
            except Exception as e:  # e.g. ENOSPC: the task fails rather than staying pending
                raise Failure("INTERNAL_ERROR", f"{type(e).__name__}: {e}") from None
        except (EOFError, ConnectionError, ssl.SSLError):
            with self.lock:
                if task in self.t["task"]:
                    self.t["task"][task].update(status="failure", error_info=["IMPORT_ERROR_PREMATURE_EOF"],
                                                finished=_now(), progress=1.0)
            raise
        except Failure as e:
            with self.lock:
                if task in self.t["task"]:
                    self.t["task"][task].update(status="failure", error_info=e.description, finished=_now(),
                                                progress=1.0)
            try:
                body.drain()
            except Exception:
                pass
            return h._reply(500, (" ".join(e.description) + "\n").encode())
        body.drain()
        with self.lock:
            if task in self.t["task"]:
                self.t["task"][task].update(status="success", progress=1.0, finished=_now(),
                                            result=_xmlrpc_value(vms).replace("<string>", "").replace("</string>", ""))
        h._reply(200, b"")

    def _import_xva(self, body, sr) -> list[str]:
        created: list[tuple[str, str]] = []
        files: dict[str, str] = {}     # XVA VDI id -> new VDI ref

        def fail(msg):
            raise Failure("IMPORT_ERROR", msg)
        try:
            tar = tarfile.open(fileobj=body, mode="r|")
        except tarfile.TarError as e:
            fail(f"not a tar archive: {e}")
        try:
            first = tar.next()
            if first is None or first.name != "ova.xml":
                fail("the archive does not start with ova.xml")
            header = _parse_xmlrpc_value(tar.extractfile(first).read().decode())
            objs = {o["id"]: o for o in header["objects"]}
            with self.lock:
                for o in header["objects"]:
                    if o["class"] == "VDI":
                        s = o["snapshot"]
                        rec = vdi_record(s.get("name_label", ""), sr, int(s["virtual_size"]), vtype=s.get("type", "user"))
                        rec.update(name_description=s.get("name_description", ""),
                                   other_config=dict(s.get("other_config", {})))
                        ref = self._create_vdi(rec)
                        created.append(("VDI", ref))
                        files[o["id"]] = ref
                vm_objs = [o for o in header["objects"] if o["class"] == "VM"]
                if not vm_objs:
                    fail("no VM in the archive")
                vms, vm_map = [], {}
                for o in vm_objs:
                    s = o["snapshot"]
                    rec = vm_record(s["name_label"])
                    rec.update({k: v for k, v in s.items() if k in rec and k not in (
                        "uuid", "VBDs", "VIFs", "snapshots", "resident_on", "suspend_VDI", "snapshot_of", "parent",
                        "affinity", "metrics", "guest_metrics", "children", "consoles")})
                    sv = files.get(s.get("suspend_VDI"))
                    rec.update(power_state="Suspended" if s.get("power_state") == "Suspended" and sv else "Halted",
                               suspend_VDI=sv or NULL, is_a_snapshot=False, is_control_domain=False, domid="-1")
                    ref = self._new("VM", rec)
                    created.append(("VM", ref))
                    vms.append(ref)
                    vm_map[o["id"]] = ref
                for o in header["objects"]:
                    s = o["snapshot"]
                    if o["class"] == "VBD" and s.get("VM") in vm_map:
                        empty = bool(s.get("empty")) or s.get("VDI") not in files
                        rec = vbd_record(vm_map[s["VM"]], NULL if empty else files[s["VDI"]], str(s.get("userdevice", "0")),
                                         vtype=s.get("type", "Disk"), mode=s.get("mode", "RW"),
                                         bootable=bool(s.get("bootable")), empty=empty, device=s.get("device", ""))
                        created.append(("VBD", self._new("VBD", rec)))
                    elif o["class"] == "VIF" and s.get("VM") in vm_map:
                        if s.get("network") in self.t["network"]:  # a network of this pool, by ref
                            net = s["network"]
                        else:  # the archive's network, by name; else the pool's first one
                            net_name = objs.get(s.get("network"), {}).get("snapshot", {}).get("name_label")
                            net = next((r for r, x in self.t["network"].items() if x["name_label"] == net_name),
                                       self.net_ref)
                        created.append(("VIF", self._new("VIF", vif_record(vm_map[s["VM"]], net, str(s.get("device", "0")),
                                                                          s.get("MAC", "")))))
            pending: dict[str, str] = {}   # chunk member -> sha1 of what was written
            while (m := tar.next()) is not None:
                if not m.isfile():
                    continue
                vid, _, rest = m.name.partition("/")
                if vid not in files:
                    fail(f"unexpected file {m.name}")
                data = tar.extractfile(m).read()
                if rest.endswith(".checksum"):
                    chunk_name = m.name[:-len(".checksum")]
                    want = data.decode().strip().lower()
                    got = pending.pop(chunk_name, None)
                    if got is None:
                        fail(f"checksum {m.name} of no chunk")
                    if got != want:
                        fail(f"Block {chunk_name} checksum failed: original = {want}; recomputed = {got}")
                    continue
                if "." in rest:
                    fail(f"unsupported checksum file: {m.name}")
                try:
                    n = int(rest)
                except ValueError:
                    fail(f"unexpected file {m.name}")
                ref = files[vid]
                if n * XVA_CHUNK + len(data) > int(self.t["VDI"][ref]["virtual_size"]):
                    fail(f"{m.name} lies beyond the VDI's virtual size")
                with open(self._files[ref], "r+b") as f:
                    _write_sparse(f.fileno(), data, n * XVA_CHUNK)
                pending[m.name] = hashlib.sha1(data).hexdigest()
            if pending:
                fail(f"no checksum for {sorted(pending)[0]}")
            return vms
        except Failure:
            self._undo(created)
            raise
        except (tarfile.TarError, EOFError, KeyError, ValueError, TypeError) as e:
            self._undo(created)
            raise Failure("IMPORT_ERROR", f"{type(e).__name__}: {e}") from None
        except BaseException:
            self._undo(created)
            raise

    def _undo(self, created) -> None:
        with self.lock:
            for cls, ref in reversed(created):
                if cls == "VDI":
                    self._destroy_vdi(ref)
                else:
                    self.t[cls].pop(ref, None)

    # -- test-side API --------------------------------------------------------------------------
    def credentials_file(self, path=None) -> str:
        path = os.fspath(path or os.path.join(self.root, "credentials.toml"))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"username = {json.dumps(self.username)}\npassword = {json.dumps(self.password)}\n")
        return path

    def add_vm(self, name: str, disks=(), tags=(), power_state: str = "Running", memory: int = 256 << 20,
               vcpus: int = 1, cd: bool = True, description: str = "", sr: str | None = None) -> str:
        """A VM with a VDI per disk (an int: a sparse disk of that size; bytes: a disk holding them;
        a path: a copy of that image, converted to raw if it is not), a VIF, a CD drive; -> uuid."""
        with self.lock:
            sr = sr or self.sr_ref
            vm = self._new("VM", vm_record(name, description=description, memory=memory, vcpus=vcpus, tags=tags))
            for i, d in enumerate(disks):
                if isinstance(d, int):
                    size, src = d, None
                elif isinstance(d, (bytes, bytearray, memoryview)):
                    size, src = len(d), bytes(d)
                else:
                    size, src = _image_size(os.fspath(d)), os.fspath(d)
                vdi = self._create_vdi(vdi_record(f"{name} disk {i}", sr, size))
                if isinstance(src, bytes):
                    with open(self._files[vdi], "r+b") as f:
                        _write_sparse(f.fileno(), src, 0)
                elif src is not None:
                    _copy_image(src, self._files[vdi])
                self._new("VBD", vbd_record(vm, vdi, str(i), bootable=i == 0, device=f"xvd{chr(97 + i)}"))
            if cd:
                self._new("VBD", vbd_record(vm, NULL, "3", vtype="CD", mode="RO", empty=True, device="xvdd"))
            self._mac += 1
            self._new("VIF", vif_record(vm, self.net_ref, "0", f"aa:bb:cc:{self._mac >> 16 & 255:02x}:"
                                                           f"{self._mac >> 8 & 255:02x}:{self._mac & 255:02x}"))
            if power_state in ("Running", "Paused"):
                self._set_power(vm, power_state)
            elif power_state == "Suspended":
                rec = self.t["VM"][vm]
                sv = self._create_vdi(vdi_record("Suspend image", sr, int(rec["memory_static_max"]), vtype="suspend"))
                with open(self._files[sv], "r+b") as f:
                    f.write(self._memory_of(vm)[:int(rec["memory_static_max"])])
                rec.update(power_state="Suspended", suspend_VDI=sv)
            return self.t["VM"][vm]["uuid"]

    def _vm_ref(self, vm) -> str:
        return vm if vm in self.t["VM"] else self._by_uuid("VM", vm)

    def _vdi_ref(self, vdi) -> str:
        return vdi if vdi in self.t["VDI"] else self._by_uuid("VDI", vdi)

    def vdi_of(self, vm, n: int = 0) -> str:
        """The uuid of the VDI of the n-th disk (by userdevice) of a VM (uuid or ref)."""
        with self.lock:
            ref = self._vm_ref(vm)
            disks = sorted((b for b in self.t["VBD"].values() if b["VM"] == ref and b["type"] == "Disk"
                            and b["VDI"] in self.t["VDI"]), key=lambda b: int(b["userdevice"]))
            return self.t["VDI"][disks[n]["VDI"]]["uuid"]

    def vdi_path(self, vdi) -> str | None:
        with self.lock:
            return self._files.get(self._vdi_ref(vdi))

    def guest_write(self, vdi, offset: int, data: bytes) -> None:
        """What the guest writes to its disk (into the live VDI's file)."""
        with self.lock:
            ref = self._vdi_ref(vdi)
            if offset < 0 or offset + len(data) > int(self.t["VDI"][ref]["virtual_size"]):
                raise ValueError("write beyond the disk")
            fd = os.open(self._files[ref], os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

    def export(self, vdi) -> bytes:
        with self.lock:
            ref = self._vdi_ref(vdi)
            with open(self._files.get(ref) or self._cbt_kept[ref], "rb") as f:
                return f.read()

    def set_memory(self, vm, data: bytes) -> None:
        with self.lock:
            self._memory[self._vm_ref(vm)] = bytes(data)

    def set_nbd(self, purpose: str | None) -> None:
        with self.lock:
            self.t["network"][self.net_ref]["purpose"] = [purpose] if purpose else []

    def objects(self, cls: str) -> dict:
        with self.lock:
            return {r: self._record(cls, r) for r in self.t[cls]}


# -- helpers ----------------------------------------------------------------------------------------

def changed_blocks(fd_a: int, fd_b: int, size: int, block: int = CBT_BLOCK) -> np.ndarray:
    """A bool per `block` of [0, size): do the two files differ there? Holes in both are equal."""
    nblocks = -(-size // block)
    changed = np.zeros(nblocks, dtype=bool)
    ranges = sorted(_data_ranges(fd_a, size) + _data_ranges(fd_b, size))
    merged: list[list[int]] = []
    for s, e in ranges:
        s, e = s // block * block, min(size, -(-e // block) * block)
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    step = 256 * block
    for s, e in merged:
        for off in range(s, e, step):
            n = min(step, e - off)
            nb = -(-n // block)

            def rd(fd):
                buf = bytearray(nb * block)  # zeros past the end of the file
                os.preadv(fd, [memoryview(buf)[:n]], off)
                return np.frombuffer(buf, dtype=np.uint64).reshape(nb, block // 8)
            changed[off // block: off // block + nb] |= (rd(fd_a) != rd(fd_b)).any(axis=1)
    return changed


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    out, off = [], 0
    try:
        while off < size:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            if d >= size:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, min(h, size)))
            off = h
    except OSError:  # no SEEK_DATA here: all of it is data
        return [(0, size)]
    return out


def _write_sparse(fd: int, data: bytes, off: int) -> None:
    """pwrite, leaving holes where zeros land on holes."""
    step = 1 << 20
    mv = memoryview(data)
    for i in range(0, len(data), step):
        part = mv[i:i + step]
        if _is_zero(part) and not _has_data(fd, off + i, len(part)):
            continue
        os.pwrite(fd, part, off + i)


def _has_data(fd: int, off: int, n: int) -> bool:
    try:
        d = os.lseek(fd, off, os.SEEK_DATA)
    except OSError as e:  # ENXIO: a hole from `off` to the end; else no SEEK_DATA: assume data
        return e.errno != errno.ENXIO
    return d < off + n


def _image_size(path: str) -> int:
    p = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True, text=True, check=True)
    return int(json.loads(p.stdout)["virtual-size"])


def _copy_image(src: str, dst: str) -> None:
    p = subprocess.run(["qemu-img", "info", "--output=json", src], capture_output=True, text=True, check=True)
    if json.loads(p.stdout)["format"] == "raw":
        subprocess.run(["cp", "--reflink=auto", "--sparse=always", src, dst], check=True)
    else:
        subprocess.run(["qemu-img", "convert", "-O", "raw", src, dst], check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def _alive(pid: int) -> bool:
    """Is the process there and not a zombie?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _is_qemu_nbd(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "qemu-nbd"
    except OSError:
        return False


def _kill_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM a qemu-nbd we started, by pid, then SIGKILL; wait until it is gone (or a zombie)."""
    if not (_alive(pid) and _is_qemu_nbd(pid)):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if not _alive(pid):
                return
            time.sleep(0.02)


# -- running it alone --------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.xapi_server",
                                 description="A protocol-level XAPI test server (not XAPI): see tests/xapi_server.py")
    ap.add_argument("--root", required=True, help="directory for the SR files, certs and credentials")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tls", dest="tls", action="store_true", default=True, help="https (the default)")
    ap.add_argument("--no-tls", dest="tls", action="store_false", help="plain http")
    ap.add_argument("--nbd", choices=["nbd", "insecure_nbd", "none"], default="nbd",
                    help="the purpose of the pool network: TLS NBD, plain NBD or none")
    ap.add_argument("--vm", "--image", dest="vms", action="append", default=[], metavar="NAME=IMAGEPATH",
                    help="a running VM with that image as its disk (repeatable)")
    ap.add_argument("--username", default="root")
    ap.add_argument("--password", default="secret")
    ap.add_argument("--sr-size", type=int, default=1 << 40)
    a = ap.parse_args(argv)
    srv = XapiServer(a.root, username=a.username, password=a.password, tls=a.tls,
                     nbd=None if a.nbd == "none" else a.nbd, sr_size=a.sr_size, port=a.port)
    for spec in a.vms:
        name, sep, path = spec.partition("=")
        if not sep:
            ap.error(f"--vm wants NAME=IMAGEPATH, not {spec!r}")
        srv.add_vm(name, disks=[path])
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    url = srv.start()
    creds = srv.credentials_file()
    print(f"url: {url}", flush=True)
    print(f"ca_file: {srv.ca_file if a.tls else ''}", flush=True)
    print(f"credentials: {creds}", flush=True)
    print(f"nbd_ca_dir: {srv.nbd_ca_dir}", flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
