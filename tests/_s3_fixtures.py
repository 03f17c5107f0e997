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
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
