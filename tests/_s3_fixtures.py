"""A real S3-protocol server on loopback for the object-storage tests: moto's standalone server on
127.0.0.1, started and stopped by the test. The code under test talks to it exactly as to AWS: through
fsspec/s3fs, with the endpoint from AWS_ENDPOINT_URL and keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY."""
from __future__ import annotations

import contextlib
import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clear_fs_cache() -> None:
    """fsspec caches filesystem instances by their arguments, not by the environment they read."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


def _reset(endpoint: str) -> None:
    """moto keeps its buckets in process-wide state, shared by every server started in this process: an
    earlier test module's buckets and objects would still be there (and `mkdir` of a bucket then fails)."""
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()


@contextlib.contextmanager
def s3_server(buckets=("data",)):
    """Start moto on 127.0.0.1, point the standard AWS_* variables at it, create `buckets`; yields the
    endpoint URL. Everything is restored (and the server stopped) on exit."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one line per request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    _reset(endpoint)
    old = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    clear_fs_cache()
    try:
        import fsspec

        fs = fsspec.filesystem("s3")
        for b in buckets:
            fs.mkdir(b)
        yield endpoint
    finally:
        clear_fs_cache()
        with contextlib.suppress(OSError):
            _reset(endpoint)   # the next server (or a moto mock) in this process starts empty too
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class PausableProxy:
    """A TCP proxy on 127.0.0.1 in front of a server (moto): `pause()` drops every open connection and
    refuses new ones until `resume()`, an outage of the store as its clients see it. Its threads end on
    `close()` (a context manager)."""

    def __init__(self, target_port: int):
        import threading

        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.paused, self.closed = threading.Event(), threading.Event()
        self._lock, self._conns, self._threads = threading.Lock(), set(), []
        self._start(self._accept)

    def _start(self, fn, *args) -> None:
        import threading

        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            if self.paused.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=30)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            self._start(self._pump, client, upstream)
            self._start(self._pump, upstream, client)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def pause(self) -> None:
        self.paused.set()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            self._drop(s)

    def resume(self) -> None:
        self.paused.clear()

    def close(self) -> None:
        self.closed.set()
        self.pause()
        for t in self._threads:
            t.join(timeout=10)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
