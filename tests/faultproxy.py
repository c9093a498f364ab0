"""A fault-injecting HTTP/1.1 proxy for the S3 tests (stdlib only, threads).

    proxy = FaultProxy("http://127.0.0.1:PORT", rate=0.15, seed=7).start()
    ... point boto3 / `alike --endpoint` at proxy.endpoint ...
    proxy.counts          # {"requests": n, "drop": n, "delay": n, "error": n, ...}
    proxy.fail_all("503") # every request from now on fails ("503", "500" or "drop")
    proxy.heal()          # back to the configured rate
    proxy.stop()

boto3 keeps connections alive, so faults are decided per *request*: the proxy parses each
request's head and body (Content-Length, or Transfer-Encoding: chunked, which is how aws-chunked
uploads with trailing checksums travel) and answers `Expect: 100-continue` itself. Each request
goes upstream on a fresh connection with `Connection: close`, so the whole response is simply
what the server sends before it closes; the proxy then relays it with the framing the server
gave it (or closes the client connection after a close-delimited response).

Faults, for a share `rate` of requests (chosen with a seeded random generator, so a run injects
the same sequence of decisions; which request gets which decision depends on thread timing):
- "drop":  the connection is closed; one of three places, chosen at random:
           before forwarding ("drop-before"), after the server handled the request but before
           any response byte ("drop-after"), or in the middle of the response ("drop-mid").
- "delay": the request waits 0.2 to 1 s (by default) before it is forwarded.
- "error": an HTTP 500 InternalError or 503 SlowDown with an S3 XML error body, not forwarded.
`kinds` weighs them; `only` restricts faults to requests that a predicate accepts.
`script(match, *faults)` makes the next matching requests fail in a given way, so that a test
is sure that faults hit, say, the uploads of packs. `fail_all(how)` and `fail_all_after(n, ...)`
make every request fail (from now, or after n more matching ones): a store that dies.
Counters are per kind ("drop", "delay", "error", and "drop-before|after|mid") and per
(method, kind) in `by_method` (ranged GETs as "GET(range)"); `log` keeps (method, path,
ranged, fault) of each request.
"""
from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

ERRORS = {
    "500": (500, "Internal Server Error", "InternalError",
            "We encountered an internal error. Please try again."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


class _Closed(Exception):
    """The peer closed the connection."""


class _Conn:
    """A socket with a read buffer: lines and exact byte counts."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise _Closed()
        self.buf += data

    def read_until(self, sep: bytes, limit: int = 1 << 20) -> bytes:
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[:i + len(sep)])
                del self.buf[:i + len(sep)]
                return out
            if len(self.buf) > limit:
                raise ValueError("header too long")
            self._fill()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_all(self) -> bytes:
        try:
            while True:
                self._fill()
        except (_Closed, ConnectionError):
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out


def _headers(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    hdrs = []
    for line in lines[1:]:
        if not line:
            continue
        k, _, v = line.partition(":")
        hdrs.append((k.strip(), v.strip()))
    return lines[0], hdrs


def _get(hdrs, name: str) -> str | None:
    name = name.lower()
    for k, v in hdrs:
        if k.lower() == name:
            return v
    return None


def _read_chunked(conn: _Conn) -> bytes:
    """The raw bytes of a chunked body (chunks, last chunk, trailers), as received."""
    raw = bytearray()
    while True:
        line = conn.read_until(b"\r\n")
        raw += line
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, then an empty line
                t = conn.read_until(b"\r\n")
                raw += t
                if t == b"\r\n":
                    return bytes(raw)
        raw += conn.read_exact(size + 2)


def _split_chunked(data: bytes) -> int | None:
    """Length of a complete chunked body at the start of `data`, or None if it is incomplete."""
    pos = 0
    try:
        while True:
            end = data.index(b"\r\n", pos)
            size = int(data[pos:end].split(b";", 1)[0].strip() or b"0", 16)
            pos = end + 2
            if size == 0:
                while True:
                    end = data.index(b"\r\n", pos)
                    if end == pos:
                        return end + 2
                    pos = end + 2
            pos += size + 2
            if pos > len(data):
                return None
    except ValueError:
        return None


class FaultProxy:
    def __init__(self, upstream: str, rate: float = 0.0, seed: int = 0,
                 kinds: dict[str, float] | None = None, delay: tuple[float, float] = (0.2, 1.0),
                 only=None):
        u = urlsplit(upstream)
        self.up_host, self.up_port = u.hostname, u.port or 80
        self.rate = rate
        self.kinds = dict(kinds or {"drop": 1, "delay": 1, "error": 1})
        self.delay = delay
        self.only = only  # predicate(method, path) -> bool: which requests may get a fault
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.by_method: Counter = Counter()
        self.log: list[tuple[str, str, str]] = []
        self._fail_all: str | None = None
        self._fail_after: tuple | None = None
        self._script: list = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clients: set[socket.socket] = set()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    # -- control ------------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        t = threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stopping.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone does not, on Linux)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        with self.lock:
            clients = list(self._clients)
        for c in clients:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                c.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def fail_all(self, how: str = "503") -> None:
        """Every request from now on fails: '503', '500' (an S3 error answer) or 'drop'."""
        assert how in ("500", "503", "drop")
        with self.lock:
            self._fail_all = how
            self._fail_after = None

    def fail_all_after(self, n: int, how: str = "503", method: str | None = None, path_has: str = "") -> None:
        """Every request fails once `n` more requests matching (method, path substring) went
        through: a store that dies in the middle of a run."""
        with self.lock:
            self._fail_after = [n, how, method, path_has]

    def script(self, match, *faults: str) -> None:
        """The next requests that `match(method, path, headers)` accepts get `faults`, one each
        and in order ('drop-before', 'drop-after', 'drop-mid', 'error:500', 'error:503',
        'delay:SECONDS'), whatever the rate: a fault is sure to hit that kind of request."""
        with self.lock:
            self._script.append([match, list(faults)])

    def heal(self) -> None:
        with self.lock:
            self._fail_all = None
            self._fail_after = None

    def set_rate(self, rate: float) -> None:
        with self.lock:
            self.rate = rate

    def faults(self) -> int:
        return sum(self.counts[k] for k in ("drop", "delay", "error"))

    # -- decisions ----------------------------------------------------------------------------
    def _record(self, method: str, path: str, ranged: bool, d: str) -> str:
        kind = d.split(":")[0].split("-")[0]
        self.counts[kind] += 1
        if kind == "drop":
            self.counts[d] += 1
        self.by_method[(method + ("(range)" if ranged else ""), kind)] += 1
        self.log.append((method, path, ranged, d))
        return d

    def _decide(self, method: str, path: str, hdrs) -> str | None:
        """-> None, 'delay:S', 'error:500|503', 'drop-before|drop-after|drop-mid' (under lock)."""
        ranged = _get(hdrs, "range") is not None
        with self.lock:
            self.counts["requests"] += 1
            for entry in self._script:
                if entry[1] and self._fail_all is None and entry[0](method, path, hdrs):
                    self.counts["scripted"] += 1
                    return self._record(method, path, ranged, entry[1].pop(0))
            fa = self._fail_after
            if fa is not None and (fa[2] is None or fa[2] == method) and fa[3] in path:
                if fa[0] <= 0:
                    self._fail_all, self._fail_after = fa[1], None
                else:
                    fa[0] -= 1
            if self._fail_all is not None:
                how = self._fail_all
                self.counts["fail_all"] += 1
                return self._record(method, path, ranged, "drop-before" if how == "drop" else f"error:{how}")
            r = self.rng.random()
            pick = self.rng.random()
            sub = self.rng.random()
            if r >= self.rate or (self.only is not None and not self.only(method, path)):
                self.log.append((method, path, ranged, ""))
                return None
            total = sum(self.kinds.values())
            acc = 0.0
            kind = next(iter(self.kinds))
            for k, w in self.kinds.items():
                acc += w / total
                if pick < acc:
                    kind = k
                    break
            if kind == "delay":
                d = f"delay:{self.delay[0] + sub * (self.delay[1] - self.delay[0]):.3f}"
            elif kind == "error":
                d = "error:" + ("500" if sub < 0.5 else "503")
            else:
                d = ("drop-before", "drop-after", "drop-mid")[min(2, int(sub * 3))]
            return self._record(method, path, ranged, d)

    # -- serving ------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self._clients.add(c)
            t = threading.Thread(target=self._serve, args=(c,), name="faultproxy-conn", daemon=True)
            t.start()
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _serve(self, csock: socket.socket) -> None:
        conn = _Conn(csock)
        try:
            while not self._stopping.is_set():
                if not self._one(conn):
                    return
        except (_Closed, OSError, ValueError):
            return
        finally:
            with self.lock:
                self._clients.discard(csock)
            try:
                csock.close()
            except OSError:
                pass

    def _one(self, conn: _Conn) -> bool:
        """Handle one request on the client connection. -> keep the connection open?"""
        head = conn.read_until(b"\r\n\r\n")
        reqline, hdrs = _headers(head)
        method, path, _version = reqline.split(" ", 2)
        if (_get(hdrs, "expect") or "").lower() == "100-continue":
            conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            hdrs = [(k, v) for k, v in hdrs if k.lower() != "expect"]
        te = (_get(hdrs, "transfer-encoding") or "").lower()
        if "chunked" in te:
            body = _read_chunked(conn)
        else:
            body = conn.read_exact(int(_get(hdrs, "content-length") or 0))
        client_close = (_get(hdrs, "connection") or "").lower() == "close"

        d = self._decide(method, path, hdrs)
        if d and d.startswith("delay:"):
            time.sleep(float(d.split(":")[1]))
        elif d and d.startswith("error:"):
            status, reason, code, message = ERRORS[d.split(":")[1]]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                   f"<Message>{message}</Message><Resource>{path.split('?')[0]}</Resource>"
                   f"<RequestId>faultproxy-{self.counts['requests']}</RequestId></Error>").encode()
            conn.sock.sendall(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(xml)}\r\nx-amz-request-id: faultproxy\r\n"
                f"{'Connection: close' if client_close else 'Connection: keep-alive'}\r\n\r\n".encode() + xml)
            return not client_close
        elif d == "drop-before":
            return False

        # forward on a fresh upstream connection that the server closes after its answer
        fwd = [(k, v) for k, v in hdrs if k.lower() not in ("connection", "keep-alive", "proxy-connection")]
        fwd.append(("Connection", "close"))
        out = (reqline + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fwd) + "\r\n").encode("latin-1") + body
        up = socket.create_connection((self.up_host, self.up_port), timeout=120)
        try:
            up.sendall(out)
            resp = _Conn(up).read_all()
        finally:
            up.close()
        if d == "drop-after":
            return False
        i = resp.find(b"\r\n\r\n")
        if i < 0:
            return False
        rhead, rbody = resp[:i + 4], resp[i + 4:]
        status_line, rh = _headers(rhead)
        status = int(status_line.split(" ", 2)[1])
        # keep the connection only when the response is framed (length or chunks, or no body)
        framed = (method == "HEAD" or status in (204, 304) or _get(rh, "content-length") is not None
                  or "chunked" in (_get(rh, "transfer-encoding") or "").lower())
        if "chunked" in (_get(rh, "transfer-encoding") or "").lower():
            n = _split_chunked(rbody)
            if n is not None:
                rbody = rbody[:n]
        keep = framed and not client_close
        rh = [(k, v) for k, v in rh if k.lower() not in ("connection", "keep-alive")]
        rh.append(("Connection", "keep-alive" if keep else "close"))
        data = (status_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in rh) + "\r\n").encode("latin-1") + rbody
        if d == "drop-mid":
            # half of the body, then the close; for an answer without a body, half of its status
            # line (http.client takes a head cut between two header lines for a whole one)
            cut = len(data) - len(rbody) // 2 - len(rbody) % 2 if len(rbody) > 1 else len(status_line) // 2
            conn.sock.sendall(data[:max(1, cut)])
            return False
        conn.sock.sendall(data)
        return keep
