"""A loopback HTTP server for the demo and the tests: serves a dict of routes and/or a directory,
plus a set of hostile routes that misbehave the way the web does (404s, stalls, HTML or empty
bodies, truncated and corrupt images, a decompression bomb, an opt-out header).

    with LoopbackServer(routes={"/a.jpg": jpeg_bytes}, directory="images/") as srv:
        srv.url("/a.jpg")          # http://127.0.0.1:PORT/a.jpg
        srv.hits["/a.jpg"]         # how many times it was requested

A route is `bytes` (200, content type from the extension) or `(status, headers, body)`.
Everything binds to 127.0.0.1 only; nothing leaves the machine. To try `aimv2 fetch` by hand:
`python -m aimv2data.serve DIR [PORT]` serves a directory until Ctrl-C (127.0.0.1 is a loopback
address: fetch it with `--allow-private-addresses`).
"""
from __future__ import annotations

import functools
import io
import mimetypes
import struct
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

Route = tuple[int, dict[str, str], bytes]

# Hostile routes, by path. The value is the reason class `aimv2 fetch` reports for it
# (see aimv2data/fetch/summary.py), so tests and the demo know what to expect.
HOSTILE: dict[str, str] = {
    "/hostile/404.jpg": "http_404",
    "/hostile/500.jpg": "http_500",
    "/hostile/slow.jpg": "timeout",
    "/hostile/html.jpg": "html_body",
    "/hostile/empty.jpg": "empty_body",
    "/hostile/truncated.jpg": "truncated",
    "/hostile/corrupt.jpg": "undecodable",
    "/hostile/bomb.png": "too_large",
    "/hostile/noai.jpg": "opt_out",
}
BOMB_SIDE = 20000


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=None)
def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid side x side RGB PNG of zeros: ~5 MB on the wire, side*side*3 bytes (1.2 GB for
    20000) once decoded. Built row by row with zlib so making it never holds the raw pixels."""
    row = bytes(1 + side * 3)  # filter byte 0 + one row of black pixels
    z = zlib.compressobj(1)
    idat = b"".join([z.compress(row) for _ in range(side)] + [z.flush()])
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@functools.lru_cache(maxsize=None)
def small_jpeg(seed: int = 0, size: tuple[int, int] = (96, 64)) -> bytes:
    """A small valid baseline JPEG (a gradient), the payload of the truncated and opt-out routes."""
    import numpy as np
    from PIL import Image

    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([x + 0 * y, y + 0 * x, (x + y + seed * 37) % 256], axis=2).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def hostile_route(path: str) -> Route | None:
    """The (status, headers, body) of a hostile path, built on demand (the bomb costs ~1 s once)."""
    jpeg = {"Content-Type": "image/jpeg"}
    if path == "/hostile/404.jpg":
        return 404, {"Content-Type": "text/plain"}, b"not found"
    if path == "/hostile/500.jpg":
        return 500, {"Content-Type": "text/plain"}, b"server error"
    if path == "/hostile/html.jpg":  # a login wall or error page served in place of an image
        return 200, jpeg, b"<!DOCTYPE html><html><body><h1>Please log in</h1></body></html>"
    if path == "/hostile/empty.jpg":
        return 200, jpeg, b""
    if path == "/hostile/truncated.jpg":  # the connection dropped half way through a JPEG
        data = small_jpeg(1)
        return 200, jpeg, data[: len(data) // 2]
    if path == "/hostile/corrupt.jpg":  # a JPEG signature followed by noise
        return 200, jpeg, b"\xff\xd8\xff\xe0" + bytes((i * 151 + 7) % 251 for i in range(4096))
    if path == "/hostile/bomb.png":
        return 200, {"Content-Type": "image/png"}, bomb_png()
    if path == "/hostile/noai.jpg":  # a good image whose server opts out of AI training
        return 200, {**jpeg, "X-Robots-Tag": "noai, noimageai"}, small_jpeg(2)
    return None


class LoopbackServer:
    """Threaded HTTP server on 127.0.0.1. `delay` (seconds) stalls every non-hostile response,
    to make a run slow enough to interrupt; `/hostile/slow.jpg` stalls for `slow_s`."""

    def __init__(self, routes: dict[str, bytes | Route] | None = None, directory: str | Path | None = None,
                 port: int = 0, delay: float = 0.0, slow_s: float = 30.0, hostile: bool = True,
                 flaky: dict[str, list] | None = None):
        self.routes = dict(routes or {})
        # path -> what its first requests get, in order: an HTTP status (e.g. 503), or "stall" (no answer
        # for slow_s, a client time-out); later requests get the route. For --retry-failed tests.
        self.flaky = dict(flaky or {})
        self.directory = Path(directory).resolve() if directory is not None else None
        self.port, self.delay, self.slow_s, self.hostile = port, delay, slow_s, hostile
        self.hits: Counter[str] = Counter()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "LoopbackServer":
        handler = functools.partial(_Handler, self)
        self._httpd = _Server(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True  # a stalled client must not block stop()
        self._httpd.block_on_close = False
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="loopback-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + "/" + path.lstrip("/")

    # -- routing -----------------------------------------------------------------------------
    def resolve(self, path: str) -> Route | None:
        if path in self.routes:
            r = self.routes[path]
            return r if isinstance(r, tuple) else (200, {"Content-Type": _mime(path)}, r)
        if self.hostile and path.startswith("/hostile/"):
            return hostile_route(path)
        if self.directory is not None:
            f = (self.directory / path.lstrip("/")).resolve()
            if f.is_relative_to(self.directory) and f.is_file():
                return 200, {"Content-Type": _mime(path)}, f.read_bytes()
        return None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)  # returns at once when the server stops


def _mime(path: str) -> str:
    return mimetypes.guess_type(path)[0] or "application/octet-stream"


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the default backlog of 5 drops connections when img2dataset opens 64 at once


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def __init__(self, server: LoopbackServer, *args, **kwargs):
        self.loopback = server
        super().__init__(*args, **kwargs)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv = self.loopback
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        srv.hits[path] += 1
        early = srv.flaky.get(path, [])
        if srv.hits[path] <= len(early):
            what = early[srv.hits[path] - 1]
            if what == "stall":
                srv.sleep(srv.slow_s)
                return  # hang up without a response
            route = (int(what), {"Content-Type": "text/plain"}, b"try again later")
        elif path == "/hostile/slow.jpg" and srv.hostile:
            srv.sleep(srv.slow_s)
            if srv.stopping:
                return  # hang up without a response
            route = (200, {"Content-Type": "image/jpeg"}, small_jpeg(3))
        else:
            route = srv.resolve(path)
            if srv.delay and not path.startswith("/hostile/"):
                srv.sleep(srv.delay)
        if route is None:
            route = (404, {"Content-Type": "text/plain"}, b"not found")
        status, headers, body = route
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout): nothing to do

    def log_message(self, *args):  # keep test and demo output clean
        pass


def serve_forever(directory: str | Path, port: int = 0) -> None:
    """Serve a directory until interrupted (for trying `aimv2 fetch` by hand)."""
    with LoopbackServer(directory=directory, port=port) as srv:
        print(f"serving {directory} at {srv.base_url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    import sys

    serve_forever(sys.argv[1] if len(sys.argv) > 1 else ".", int(sys.argv[2]) if len(sys.argv) > 2 else 0)
