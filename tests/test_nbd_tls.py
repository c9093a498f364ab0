"""alike's NBD client over TLS (NBD_OPT_STARTTLS) against a real `qemu-nbd --tls-creds`, as XAPI's
NBD servers require: reads match, a certificate of another server is refused, block status works."""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import time

import numpy as np
import pytest

from alike_ray.sources import nbd


def make_cert(folder: str, name: str = "127.0.0.1") -> str:
    """A server certificate for `name` in the files qemu's tls-creds-x509 wants (ca-cert.pem must
    be a CA and server-cert.pem must not be one, as gnutls checks), signed by a CA of its own;
    -> the server certificate's PEM, which is what XAPI's get_nbd_info hands out."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject, issuer, pub, signer, ca):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
        if not ca:
            san = x509.IPAddress(ipaddress.ip_address(name)) if name[0].isdigit() else x509.DNSName(name)
            b = b.add_extension(x509.SubjectAlternativeName([san]), False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alike test CA")])
    ca = build(ca_name, ca_name, ca_key.public_key(), ca_key, True)
    cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), ca_name, key.public_key(), ca_key, False)
    os.makedirs(folder, exist_ok=True)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    for f, data in (("ca-cert.pem", ca.public_bytes(serialization.Encoding.PEM)), ("server-cert.pem", pem),
                    ("server-key.pem", key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))):
        with open(os.path.join(folder, f), "wb") as fh:
            fh.write(data)
    return pem.decode()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tls_export(tmp_path):
    img = tmp_path / "disk.raw"
    rng = np.random.default_rng(7)
    data = np.zeros(8 << 20, np.uint8)
    data[1 << 20:(1 << 20) + 300000] = rng.integers(0, 256, 300000, dtype=np.uint8)
    data[-5000:] = 7
    img.write_bytes(data.tobytes())
    pem = make_cert(str(tmp_path / "pki"))
    port = _port()
    pidfile = tmp_path / "nbd.pid"
    export = "/0c1d7e33-uuid?session_id=OpaqueRef:abc"
    subprocess.run(["qemu-nbd", "--read-only", "--persistent", "--shared=4", "--fork", f"--pid-file={pidfile}",
                    "--bind=127.0.0.1", f"--port={port}", f"--export-name={export}", "--format=raw",
                    f"--object=tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir={tmp_path / 'pki'}", "--tls-creds=tls0",
                    str(img)], check=True, timeout=30)
    try:
        yield port, export, pem, data
    finally:
        os.kill(int(pidfile.read_text()), 15)
        time.sleep(0.05)


def test_reads_over_tls(tls_export):
    port, export, pem, data = tls_export
    ctx = nbd.tls_context(pem)
    with nbd.NBDClient("127.0.0.1", port, export, ("base:allocation",), tls=ctx) as c:
        assert c.size == len(data)
        alloc = nbd.extents(c.block_status("base:allocation"), lambda f: not f & nbd.STATE_ZERO)
        assert alloc and alloc[0][0] <= 1 << 20
    with nbd.NBDClient("127.0.0.1", port, export, tls=ctx) as c:
        buf = np.zeros(len(data), np.uint8)
        c.read_into(buf, 0)
        assert np.array_equal(buf, data)
        part = np.zeros(12345, np.uint8)
        c.read_into(part, (1 << 20) + 777)
        assert np.array_equal(part, data[(1 << 20) + 777:(1 << 20) + 777 + 12345])


def test_other_certificate_refused(tls_export, tmp_path):
    port, export, _, _ = tls_export
    other = make_cert(str(tmp_path / "other"))
    with pytest.raises(ssl.SSLError):
        nbd.NBDClient("127.0.0.1", port, export, tls=nbd.tls_context(other))


def test_plain_client_refused_by_tls_server(tls_export):
    port, export, _, _ = tls_export
    with pytest.raises(nbd.NBDError):
        nbd.NBDClient("127.0.0.1", port, export)
