"""Test-only S3 servers on 127.0.0.1: moto's S3 server, and a proxy in front of it that fails a set share
of requests the way a busy object store does.

    moto = MotoServer(log_path)                        # a subprocess; .stop() kills it by its process group
    with FaultProxy(moto.endpoint, rate=0.2, seed=1) as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.url, ...}     # clients talk to the proxy, the proxy to moto
        ...
        proxy.stats                                    # requests seen, faults injected by kind

The proxy (threads of this process; `close()` stops it) decides for the n-th request it receives, from a
seeded generator, whether to fail it and how:

    503       answers 503 SlowDown (S3's throttling reply) without forwarding the request
    500       answers 500 InternalError without forwarding
    reset     reads half of the request body (mid-upload) or just the headers, then resets the connection
              (TCP RST): the request never reaches the server
    truncate  GET only (object reads, listings): forwards the request, sends the response's headers with the
              full Content-Length and half of its body, then resets the connection (a body cut mid-read)
    stall     waits `stall_s` seconds, then forwards the request normally (a slow store)

Faults are transient by construction: the same request (method, path and query, Range) is failed at most
`max_in_a_row` times running, so a client that retries at least `max_in_a_row + 1` times always gets
through (a large `max_in_a_row` with `match`, a pattern of the paths to fail, makes a persistent fault). Faults stop after `max_faults` faults or `fault_window_s` seconds (a bound on what a test can
cost); the proxy keeps forwarding until it is closed. Faults only ever hit a request before the server
acts on it, or the body of a read: a lost reply to a write the server did carry out (after which a retried
CompleteMultipartUpload or conditional PUT would meet its own result) is not simulated.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

FAULTS = ("503", "500", "reset", "truncate", "stall")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authenticate", "proxy-authorization"}
ERROR_XML = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}


class MotoServer:
    """moto's S3 server on 127.0.0.1, a free port, in its own process group (stopped by its process id)."""

    def __init__(self, log_path: str | os.PathLike, timeout_s: float = 60):
        self.log_path = Path(log_path)
        with open(self.log_path, "w") as f:  # port 0: the server takes a free port and prints it
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                                         stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not (found := re.search(r"Running on (http://127\.0\.0\.1:\d+)", self.log_path.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto's S3 server did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        self.endpoint = found.group(1)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own process group: the server and nothing else
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point botocore (and so s3fs) at a test server."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a connection we reset on purpose: no traceback
        pass


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream` that fails a share `rate` of the requests (see the
    module docstring). A context manager; `close()` stops it."""

    def __init__(self, upstream: str, rate: float = 0.2, kinds: tuple[str, ...] = FAULTS, seed: int = 0,
                 stall_s: float = 2.0, max_in_a_row: int = 2, max_faults: int = 10_000,
                 fault_window_s: float = 900.0, match: str | None = None):
        unknown = set(kinds) - set(FAULTS)
        if unknown or not kinds:
            raise ValueError(f"fault kinds are {FAULTS}, got {kinds}")
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.rate, self.kinds, self.stall_s = rate, tuple(kinds), stall_s
        self.match = re.compile(match) if match else None  # fault only the requests whose path matches
        self.max_in_a_row, self.max_faults = max_in_a_row, max_faults
        self.fault_until = time.monotonic() + fault_window_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._running: Counter = Counter()  # request identity -> faults in a row
        self.stats: Counter = Counter()  # "requests", "faults", and one count per kind
        self.log: list[tuple[int, str, str, str]] = []  # (request number, fault, method, path) of each fault
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients use it

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self):
                proxy._handle(self)

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self.rate = rate

    # ---------------------------------------------------------------------------------------------------

    def _decide(self, method: str, path: str, range_: str | None) -> str | None:
        """The fault for this request, or None; the seeded generator is drawn in arrival order."""
        ident = (method, path, range_)
        with self._lock:
            n = self.stats["requests"]
            self.stats["requests"] += 1
            draw, pick = self._rng.random(), self._rng.random()
            kinds = [k for k in self.kinds if k != "truncate" or method == "GET"]
            if self.match is not None and not self.match.search(path):
                kinds = []
            if (draw >= self.rate or not kinds or self.stats["faults"] >= self.max_faults
                    or time.monotonic() > self.fault_until or self._running[ident] >= self.max_in_a_row):
                self._running.pop(ident, None)
                return None
            kind = kinds[int(pick * len(kinds))]
            self._running[ident] += 1
            self.stats["faults"] += 1
            self.stats[kind] += 1
            self.log.append((n, kind, method, path))
            return kind

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        method = h.command
        fault = self._decide(method, h.path, h.headers.get("Range"))
        if fault == "reset":
            length = int(h.headers.get("Content-Length") or 0)
            if length:
                h.rfile.read(length // 2)
            return self._reset(h)
        body = self._read_body(h)
        if fault in ERROR_XML:
            status, code, message = ERROR_XML[fault]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                   f"<RequestId>fault-proxy</RequestId></Error>").encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(xml)))
            h.end_headers()
            if method != "HEAD":  # a reply to HEAD has no body (the client would read it as the next reply)
                h.wfile.write(xml)
            return
        if fault == "stall":
            time.sleep(self.stall_s)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "expect"}
        if body or method in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            conn.request(method, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
        finally:
            conn.close()
        h.send_response_only(resp.status, resp.reason)
        for k, v in out_headers:
            if k.lower() == "content-length" and method != "HEAD":
                continue
            h.send_header(k, v)
        if method != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if method == "HEAD":
            return
        if fault == "truncate" and len(data) >= 2:
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            return self._reset(h)
        h.wfile.write(data)

    @staticmethod
    def _read_body(h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(h.rfile.read(size))
                h.rfile.readline()
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length) if length else b""

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        """Close the client's connection with a TCP reset (SO_LINGER 0), as a dropped connection looks."""
        h.close_connection = True
        try:
            h.wfile.flush()
        except OSError:
            pass
        sock = h.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.rfile.close()  # the file object holds a reference: the descriptor closes with the last one
            sock.close()
        except OSError:
            pass
