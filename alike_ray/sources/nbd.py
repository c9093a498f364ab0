"""A small NBD client (fixed newstyle handshake, structured replies, block status).

Why our own: the reference client, libnbd, has Python bindings only as Debian's
python3-libnbd, built for Debian's /usr/bin/python3 and not for the interpreter Ray runs
here, and not on PyPI (the PyPI name `nbd` is an unrelated notebook tool). What a backup
needs from NBD is small: open an export with meta contexts, ask block status, read ranges
into a caller's buffer. This module does that in pure Python over TCP or a unix socket, so
that any Ray worker that reaches the host can read, with nothing to build.

Protocol reference: the NBD protocol document (doc/proto.md in the NBD project). Invariants:
- one request in flight per connection (a connection belongs to one thread);
- a read larger than the server's maximum block size is split; block status answers cover
  at most what was asked and may cover less: callers loop on the returned extents;
- reads land in the caller's buffer with recv_into (no copies); holes reported as
  NBD_REPLY_TYPE_OFFSET_HOLE are zero-filled and not counted as bytes read.
"""
from __future__ import annotations

import socket
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_ABORT = 2
OPT_STARTTLS = 5
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_DISC = 2
CMD_BLOCK_STATUS = 7

REPLY_FLAG_DONE = 1
TYPE_NONE = 0
TYPE_OFFSET_DATA = 1
TYPE_OFFSET_HOLE = 2
TYPE_BLOCK_STATUS = 5
TYPE_ERROR_BIT = 1 << 15

STATE_HOLE = 1   # base:allocation
STATE_ZERO = 2   # base:allocation
STATE_DIRTY = 1  # qemu:dirty-bitmap:*


class NBDError(Exception):
    """The NBD server refused or broke a request."""


class NBDClient:
    """One connection to one export. `contexts`: meta contexts to negotiate (for block status)."""

    def __init__(self, host: str | None = None, port: int | None = None, export: str = "",
                 contexts: tuple[str, ...] = (), unix: str | None = None, timeout: float = 60.0,
                 tls=None, tls_name: str | None = None):
        """`tls`: an ssl.SSLContext to upgrade the connection with (NBD_OPT_STARTTLS, as XAPI's
        NBD servers and `qemu-nbd --tls-creds` require); `tls_name`: the name the server's
        certificate must carry (default: the host)."""
        self.export = export
        self._tls, self._tls_name = tls, tls_name or host
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            where = unix
        else:
            self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            where = (host, int(port))
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(where)
            self.contexts: dict[str, int] = {}
            self.max_block = 32 * 1024 * 1024
            self._handshake(list(contexts))
        except BaseException:
            self.sock.close()
            raise
        self._handle = 0

    # -- wire helpers --------------------------------------------------------------------
    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, mv: memoryview) -> None:
        got = 0
        while got < len(mv):
            k = self.sock.recv_into(mv[got:])
            if not k:
                raise NBDError(f"NBD server closed the connection (export {self.export!r})")
            got += k

    def _option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def _reply(self, opt: int):
        magic, ropt, rtype, ln = struct.unpack(">QIII", self._recv(20))
        if magic != REPLY_MAGIC or ropt != opt:
            raise NBDError(f"unexpected NBD option reply (magic {magic:#x}, option {ropt})")
        data = self._recv(ln) if ln else b""
        if rtype & REP_ERR:
            raise NBDError(f"NBD server refused option {opt} on export {self.export!r}: "
                           f"error {rtype & ~REP_ERR} {data.decode(errors='replace')}")
        return rtype, data

    def _handshake(self, contexts: list[str]) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise NBDError("not an NBD server speaking the fixed newstyle handshake")
        no_zeroes = bool(flags & FLAG_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0)))
        if self._tls is not None:
            self._option(OPT_STARTTLS)
            self._reply(OPT_STARTTLS)
            self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._tls_name)
        name = self.export.encode()
        self._option(OPT_STRUCTURED_REPLY)
        self._reply(OPT_STRUCTURED_REPLY)
        if contexts:
            q = b"".join(struct.pack(">I", len(c.encode())) + c.encode() for c in contexts)
            self._option(OPT_SET_META_CONTEXT, struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts)) + q)
            while True:
                rtype, data = self._reply(OPT_SET_META_CONTEXT)
                if rtype == REP_ACK:
                    break
                if rtype == REP_META_CONTEXT:
                    (cid,) = struct.unpack(">I", data[:4])
                    self.contexts[data[4:].decode()] = cid
        self._option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE))
        self.size = None
        while True:
            rtype, data = self._reply(OPT_GO)
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO:
                (info,) = struct.unpack(">H", data[:2])
                if info == INFO_EXPORT:
                    self.size, self.tflags = struct.unpack(">QH", data[2:12])
                elif info == INFO_BLOCK_SIZE:
                    _, _, mx = struct.unpack(">III", data[2:14])
                    self.max_block = max(4096, min(mx, 32 * 1024 * 1024))
        if self.size is None:
            raise NBDError(f"NBD export {self.export!r} did not say its size")

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0) -> int:
        self._handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self._handle, offset, length))
        return self._handle

    def _chunks(self, handle: int, on_chunk):
        """Read the reply to `handle`; call on_chunk(type, payload_len) for each structured chunk,
        which must consume exactly payload_len bytes."""
        while True:
            (magic,) = struct.unpack(">I", self._recv(4))
            if magic == SIMPLE_REPLY_MAGIC:
                err, h = struct.unpack(">IQ", self._recv(12))
                if h != handle:
                    raise NBDError("NBD reply for another request")
                if err:
                    raise NBDError(f"NBD request failed with error {err}")
                return "simple"
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NBDError(f"bad NBD reply magic {magic:#x}")
            flags, rtype, h, ln = struct.unpack(">HHQI", self._recv(16))
            if h != handle:
                raise NBDError("NBD reply for another request")
            if rtype & TYPE_ERROR_BIT:
                payload = self._recv(ln)
                err, mlen = struct.unpack(">IH", payload[:6])
                msg = payload[6:6 + mlen].decode(errors="replace")
                if flags & REPLY_FLAG_DONE:
                    raise NBDError(f"NBD request failed with error {err}: {msg}")
                self._error = NBDError(f"NBD request failed with error {err}: {msg}")
            elif ln or rtype != TYPE_NONE:
                on_chunk(rtype, ln)
            if flags & REPLY_FLAG_DONE:
                err = getattr(self, "_error", None)
                if err is not None:
                    self._error = None
                    raise err
                return "structured"

    # -- requests ------------------------------------------------------------------------
    def read_into(self, buf, offset: int) -> int:
        """Fill `buf` (a writable buffer) with the export's bytes from `offset`. -> bytes that
        came as data (holes are zero-filled and not counted)."""
        mv = memoryview(buf).cast("B")
        done = 0
        pos = 0
        while pos < len(mv):
            n = min(self.max_block, len(mv) - pos)
            base = offset + pos
            part = mv[pos:pos + n]
            h = self._request(CMD_READ, base, n)
            got = [0]

            def chunk(rtype, ln, part=part, base=base):
                if rtype == TYPE_OFFSET_DATA:
                    (o,) = struct.unpack(">Q", self._recv(8))
                    s = o - base
                    self._recv_into(part[s:s + ln - 8])
                    got[0] += ln - 8
                elif rtype == TYPE_OFFSET_HOLE:
                    o, hl = struct.unpack(">QI", self._recv(12))
                    s = o - base
                    part[s:s + hl] = bytes(hl)
                else:
                    self._recv(ln)

            if self._chunks(h, chunk) == "simple":
                self._recv_into(part)
                got[0] = n
            done += got[0]
            pos += n
        return done

    def block_status(self, context: str, offset: int = 0, length: int | None = None):
        """-> [(offset, length, flags)] covering [offset, offset+length) for one meta context."""
        if context not in self.contexts:
            raise NBDError(f"NBD export {self.export!r} has no meta context {context}")
        cid = self.contexts[context]
        end = self.size if length is None else offset + length
        out = []
        pos = offset
        while pos < end:
            ask = min(end - pos, 1 << 30)
            h = self._request(CMD_BLOCK_STATUS, pos, ask)
            got = []

            def chunk(rtype, ln):
                data = self._recv(ln)
                if rtype == TYPE_BLOCK_STATUS:
                    (c,) = struct.unpack(">I", data[:4])
                    if c == cid:
                        got.extend(struct.iter_unpack(">II", data[4:]))

            self._chunks(h, chunk)
            if not got:
                raise NBDError(f"NBD server gave no block status for {context} at {pos}")
            for ln, flags in got:
                ln = min(ln, end - pos)
                if ln <= 0:
                    break
                out.append((pos, ln, flags))
                pos += ln
        return out

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tls_context(cert_pem: str | None = None, ca_file: str | None = None):
    """An ssl context for an NBD server whose certificate is `cert_pem` (XAPI's get_nbd_info gives
    the host's certificate, usually self-signed: it is trusted as it is, as an anchor of its own,
    and the name is still checked), or signed by a CA of `ca_file`."""
    import ssl

    ctx = ssl.create_default_context(cafile=ca_file, cadata=cert_pem or None)
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


def extents(status, keep) -> list[tuple[int, int]]:
    """Merge block status entries whose flags pass `keep(flags)` into sorted (offset, length)."""
    out: list[list[int]] = []
    for off, ln, flags in status:
        if not keep(flags):
            continue
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += ln
        else:
            out.append([off, ln])
    return [(o, n) for o, n in out]
