"""A real S3 API on loopback for tests: moto's server in a subprocess, plus a fault-injecting proxy.

``moto_server`` speaks the S3 HTTP API, so the storage layer is exercised through s3fs/botocore exactly as
against AWS or MinIO. :class:`FaultyProxy` sits between the client and the server and answers a seeded share
of requests with ``503 SlowDown`` (before forwarding) or drops the response of a forwarded request (after the
server acted on it), so retries and idempotency are tested against real failures. Use the fixtures
``s3`` (a clean bucket prefix per test) and ``faulty_s3`` (the same behind the proxy).
"""

from __future__ import annotations

import http.client
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

__all__ = ["FaultyProxy", "MotoServer", "S3Env", "faulty_s3", "moto", "s3", "s3_options"]

BUCKET = "realfake-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_options(endpoint_url: str, botocore_retries: int | None = None) -> dict[str, Any]:
    """s3fs storage_options for a loopback endpoint (static test credentials, no instance cache)."""
    opts: dict[str, Any] = {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": endpoint_url,
        "client_kwargs": {"region_name": "us-west-2"},
        "skip_instance_cache": True,
    }
    if botocore_retries is not None:
        opts["config_kwargs"] = {"retries": {"max_attempts": botocore_retries, "mode": "standard"}}
    return opts


class MotoServer:
    """``moto_server`` in a subprocess on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> MotoServer:
        exe = Path(sys.executable).with_name("moto_server")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        self.proc = subprocess.Popen(
            [*cmd, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {self.proc.returncode} before serving")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/moto-api/data.json")
                conn.getresponse().read()
                conn.close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint_url} within {timeout_s}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass
class ProxyCounts:
    requests: int = 0
    failed_before: int = 0
    failed_after: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def injected(self) -> int:
        return self.failed_before + self.failed_after


class S3Interceptor:
    """An HTTP server on loopback in front of an S3 server: each request is read whole, handed to :meth:`decide`,
    then forwarded and its answer relayed, or answered with an S3 error instead (before or after forwarding).

    Subclasses decide: :class:`FaultyProxy` fails a seeded share of requests, a quota gateway refuses writes.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._in_flight = 0
        self._idle = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def decide(self, method: str, path: str, body: bytes) -> tuple[str, tuple[int, str, str] | None]:
        """``("pass", None)``, or ``("before" | "after", (status, code, message))``: the S3 error to answer with,
        before the request reaches the server or after it acted on it."""
        return "pass", None

    def acted(self, method: str, path: str) -> None:
        """Called once the server acted on a forwarded request, before its answer is relayed to the client."""

    def wait_idle(self) -> None:
        """Return once no request is being handled (each ends when answered, or when its forward failed)."""
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _error(self, status: int, code: str, message: str) -> None:
                body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}'
                        f"</Message><Resource>{self.path}</Resource></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self) -> None:
                with relay._idle:
                    relay._in_flight += 1
                try:
                    self._relay()
                finally:
                    with relay._idle:
                        relay._in_flight -= 1
                        relay._idle.notify_all()

            def _relay(self) -> None:
                body = self._body()
                if len(body) < int(self.headers.get("Content-Length", 0) or 0):
                    return  # the client died mid-body: S3 drops an incomplete request, and so does the relay
                when, error = relay.decide(self.command, self.path, body)
                if when == "before":
                    self._error(*error)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "host")}
                headers["Host"] = f"127.0.0.1:{relay.upstream_port}"
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection("127.0.0.1", relay.upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                relay.acted(self.command, self.path)
                if when == "after":
                    self._error(*error)
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # A HEAD answer has no body but must keep the object's length.
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815

        return Handler

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


SLOW_DOWN = (503, "SlowDown", "Please reduce your request rate. (injected)")


class FaultyProxy(S3Interceptor):
    """An HTTP proxy to ``upstream`` that fails a seeded share of requests with ``503 SlowDown``.

    Args:
        upstream_port: Port of the S3 server on 127.0.0.1.
        failure_rate: Share of requests that fail.
        after_share: Of the failing requests, the share that is forwarded first and then answered with an error
            (the server acted, the client sees a failure); the rest fail before reaching the server.
        seed: Seed of the failure draw.
    """

    def __init__(self, upstream_port: int, failure_rate: float, after_share: float = 0.3, seed: int = 0) -> None:
        self.failure_rate = failure_rate
        self.after_share = after_share
        self.rng = random.Random(seed)
        self.counts = ProxyCounts()
        super().__init__(upstream_port)

    def decide(self, method: str, path: str, body: bytes) -> tuple[str, tuple[int, str, str] | None]:
        with self.counts.lock:
            self.counts.requests += 1
            if self.rng.random() >= self.failure_rate:
                return "pass", None
            if self.rng.random() < self.after_share:
                self.counts.failed_after += 1
                return "after", SLOW_DOWN
            self.counts.failed_before += 1
            return "before", SLOW_DOWN


@dataclass
class S3Env:
    """A bucket prefix on a loopback S3 server and how to reach it."""

    endpoint_url: str
    bucket: str
    prefix: str
    storage_options: dict[str, Any]
    proxy: FaultyProxy | None = None

    @property
    def root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    """One moto server per test session, with the test bucket created."""
    import s3fs

    server = MotoServer().start()
    try:
        s3fs.S3FileSystem(**s3_options(server.endpoint_url)).mkdir(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(moto: MotoServer) -> S3Env:
    """A fresh prefix in the test bucket, reached directly."""
    return S3Env(moto.endpoint_url, BUCKET, f"t-{uuid.uuid4().hex[:10]}", s3_options(moto.endpoint_url))


@pytest.fixture
def faulty_s3(moto: MotoServer, request: pytest.FixtureRequest) -> Iterator[S3Env]:
    """A fresh prefix reached through :class:`FaultyProxy`; parametrize indirectly with a dict of its arguments
    (``failure_rate``, ``after_share``, ``seed``, ``botocore_retries``)."""
    params = dict(getattr(request, "param", {}) or {})
    botocore_retries = params.pop("botocore_retries", 1)
    proxy = FaultyProxy(moto.port, **{"failure_rate": 0.2, **params}).start()
    try:
        yield S3Env(
            proxy.endpoint_url,
            BUCKET,
            f"f-{uuid.uuid4().hex[:10]}",
            s3_options(proxy.endpoint_url, botocore_retries=botocore_retries),
            proxy,
        )
    finally:
        proxy.stop()
