"""Paths that may be object-storage URLs: one place where the data path meets fsspec.

Every command that takes a path (fetch --output, shard inputs/--output, caption, stats, tokenizer,
bench loader, train --manifest) accepts a local path, `file://...`, or an fsspec URL such as
`s3://bucket/prefix` or `gs://bucket/prefix`. Local paths stay plain `pathlib.Path`s (the fast,
well-tested path); URLs become `upath.UPath`s, the pathlib API over fsspec, so the same code works
on both.

Credentials and endpoints come only from the backends' standard sources: for S3 (s3fs/botocore)
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, AWS_ENDPOINT_URL for S3-compatible stores,
~/.aws/config and credentials, instance roles; fsspec's own configuration (FSSPEC_S3_ENDPOINT_URL,
~/.config/fsspec). Nothing here reads, prints or stores them: error messages name the URL and what to
do, never a key.

Atomicity: a local file is written to a temp name and renamed in (aimv2data.atomic); an object store
PUT is already all-or-nothing (the object appears complete or not at all), so a URL is written in one
put. Readers of a directory-like prefix therefore see whole files, as locally.
"""
from __future__ import annotations

import io
import os
import posixpath
import re
from pathlib import Path

# fsspec protocol -> the package that implements it (for the "install X" message)
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "hf": "huggingface_hub", "http": "aiohttp", "https": "aiohttp"}


class StorageError(OSError):
    """A URL that cannot be used as given; the message says what to do (and never holds a credential)."""


def is_url(path) -> bool:
    """True for a remote fsspec URL (s3://, gs://, ...); local paths and file:// are not."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def local(path) -> str:
    """file:///x -> /x; anything else unchanged."""
    s = os.fspath(path) if not isinstance(path, str) else path
    return s[len("file://"):] if s.startswith("file://") else s


def protocol(url: str) -> str:
    return str(url).split("://", 1)[0].lower()


def filesystem(url: str):
    """(fsspec filesystem, path without protocol) for a URL, with a one-line error when the scheme has
    no installed backend."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError) as e:
        proto = protocol(url)
        pkg = BACKENDS.get(proto)
        if pkg or isinstance(e, ImportError):
            raise StorageError(f"{url}: no fsspec backend for {proto}:// URLs is installed; "
                               f"pip install {pkg or 'the fsspec backend for ' + proto}") from None
        raise StorageError(f"{url}: unknown URL scheme {proto}:// (fsspec knows no such protocol)") from None


def upath(path) -> Path:
    """A pathlib-style object for a local path or a URL (UPath over fsspec)."""
    if isinstance(path, Path) and not is_url(path):
        return path
    if not is_url(path):
        return Path(local(path))
    filesystem(str(path))                     # the "install s3fs" error before UPath's own
    from upath import UPath

    return UPath(str(path))


def join(base, *parts: str) -> str:
    """Join path parts onto a local path or a URL."""
    b = str(base)
    if is_url(b):
        return posixpath.join(b.rstrip("/"), *parts)
    return os.path.join(local(b), *parts)


def resolve_against(root, ref: str) -> str:
    """Where a manifest `shard` value points: a URL or absolute path as is, else relative to `root`. Under a
    URL root the result is normalised (`s3://b/manifest/../shards/a.tar` -> `s3://b/shards/a.tar`): an
    object store has no `..`, a key holding one is another key."""
    if is_url(ref) or ref.startswith("file://") or os.path.isabs(ref):
        return local(ref)
    if not is_url(root):
        return join(root, ref)
    scheme, rest = join(root, ref).split("://", 1)
    bucket = rest.split("/", 1)[0]
    path = posixpath.normpath(rest)
    if path.split("/", 1)[0] != bucket or path.startswith(("/", "..")):
        raise StorageError(f"{ref!r} relative to {as_str(root)} climbs out of the bucket {bucket!r}; write that "
                           "shard as a URL (s3://...) in the manifest")
    return f"{scheme}://{path}"


def as_str(path) -> str:
    """The user-facing form of a path or URL (a UPath prints as its URL)."""
    return str(path) if is_url(path) else str(local(str(path)))


def open_file(path, mode: str = "rb", **kw):
    """Open a local path or URL. For URLs, reads are ranged GETs with read-ahead (kw: block_size,
    cache_type): nothing is downloaded to disk."""
    if not is_url(path):
        return open(local(str(path)), mode)
    fs, p = filesystem(str(path))
    try:
        return fs.open(p, mode, **kw)
    except Exception as e:
        raise friendly(e, str(path)) from None


def read_bytes(path) -> bytes:
    if not is_url(path):
        return Path(local(str(path))).read_bytes()
    fs, p = filesystem(str(path))
    try:
        return fs.cat_file(p)
    except Exception as e:
        raise friendly(e, str(path)) from None


def read_range(path, offset: int, size: int) -> bytes:
    """`size` bytes at `offset`: a pread locally, one ranged GET at a URL."""
    if not is_url(path):
        with open(local(str(path)), "rb") as f:
            return os.pread(f.fileno(), size, offset)
    fs, p = filesystem(str(path))
    try:
        return fs.cat_file(p, start=offset, end=offset + size)
    except Exception as e:
        raise friendly(e, str(path)) from None


def write_bytes(path, data: bytes) -> None:
    """All-or-nothing write: temp + rename locally, one PUT to an object store."""
    if not is_url(path):
        from aimv2data.atomic import write_bytes_atomic

        write_bytes_atomic(local(str(path)), data)
        return
    fs, p = filesystem(str(path))
    try:
        fs.pipe_file(p, data)
    except Exception as e:
        raise friendly(e, str(path)) from None


def read_parquet(path, columns=None):
    """A polars DataFrame from a local parquet file or a URL (read through fsspec, so the same credentials
    and endpoint as everything else)."""
    import polars as pl

    if not is_url(path):
        return pl.read_parquet(local(str(path)), columns=columns)
    return pl.read_parquet(io.BytesIO(read_bytes(path)), columns=columns)


def parquet_columns(path) -> list[str]:
    import pyarrow.parquet as pq

    if not is_url(path):
        return pq.read_schema(local(str(path))).names
    with open_file(path, "rb") as f:
        return pq.read_schema(f).names


def is_file(path) -> bool:
    """Whether a file exists; at a URL, a store that does not answer raises StorageError saying so (UPath's own
    is_file() says False, which would read as "no such file")."""
    if not is_url(path):
        return Path(local(str(path))).is_file()
    try:
        stat(str(path))
    except StorageError as e:
        if str(e).endswith("no such object or prefix"):
            return False
        raise
    return True


def stat(path) -> tuple[int, object]:
    """(size, version) of a file: version is the mtime in ns locally, the ETag (else last-modified) of an
    object; a changed file has a changed version."""
    if not is_url(path):
        st = os.stat(local(str(path)))
        return st.st_size, st.st_mtime_ns
    fs, p = filesystem(str(path))
    try:
        info = fs.info(p)
    except Exception as e:
        raise friendly(e, str(path)) from None
    version = info.get("ETag") or info.get("etag") or str(info.get("LastModified") or info.get("mtime") or "")
    return int(info["size"]), str(version).strip('"')


def missing(urls: list[str]) -> list[str]:
    """The URLs among `urls` that name no object, asked of the store together (a HEAD each); an
    unreachable store or refused credentials raise StorageError, not "missing"."""
    from concurrent.futures import ThreadPoolExecutor

    def gone(url: str) -> bool:
        fs, p = filesystem(url)
        try:
            fs.info(p)
        except FileNotFoundError:
            return True
        except Exception as e:
            raise friendly(e, url) from None
        return False

    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:
        return [u for u, g in zip(urls, pool.map(gone, urls)) if g]


def check_reachable(url: str, *, for_writing: bool = False) -> None:
    """Fail fast with one line when a URL's bucket does not exist, the credentials are missing or refused,
    or the endpoint does not answer; before any work starts or anything is written."""
    if not is_url(url):
        return
    fs, p = filesystem(url)
    bucket = p.split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True) if not for_writing else fs.info(bucket)
    except FileNotFoundError:
        raise StorageError(f"{url}: bucket {bucket!r} does not exist; create it or fix the URL") from None
    except Exception as e:
        raise friendly(e, url) from None


UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
               "ConnectionError", "ConnectionClosedError", "ServerDisconnectedError", "ClientOSError",
               "ConnectionRefusedError", "ConnectionResetError", "TimeoutError", "FSTimeoutError")


def unreachable(e: BaseException) -> bool:
    """The store did not answer (refused, reset or timed-out connections), as opposed to an answer."""
    low = str(e).lower()
    return (type(e).__name__ in UNREACHABLE or "could not connect" in low or "connect timeout" in low
            or "cannot connect" in low or "connection was closed" in low or "server disconnected" in low)


def endpoint(url: str) -> str:
    """The endpoint a URL's requests go to (no credential is part of it), for error messages."""
    try:
        fs = filesystem(url)[0]
    except StorageError:
        return "(unknown)"
    ep = (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url") or getattr(fs, "endpoint_url", None)
    if not ep and protocol(url) in ("s3", "s3a"):
        ep = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
              or os.environ.get("FSSPEC_S3_ENDPOINT_URL") or "AWS S3's default")
    ep = str(ep or f"{protocol(url)}:// default")
    return re.sub(r"//[^/@]*@", "//", ep)     # never a user:password an endpoint URL might carry


HTTP_403 = re.compile(r"(?<![\w:.])403(?![\w.])")   # the status code, not a port or a number inside a name


def friendly(e: BaseException, url: str) -> StorageError:
    """An fsspec/s3fs/botocore exception -> a one-line StorageError that says what to do."""
    if isinstance(e, StorageError):
        return e
    name, text = type(e).__name__, str(e)
    low = text.lower()
    proto = protocol(url)
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    if "nosuchbucket" in low or "bucket does not exist" in low or "specified bucket" in low:
        return StorageError(f"{url}: bucket {bucket!r} does not exist; create it or fix the URL")
    if name in ("NoCredentialsError", "PartialCredentialsError") or "unable to locate credentials" in low:
        return StorageError(f"{url}: no credentials for {proto}://; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                            "(or AWS_PROFILE, ~/.aws/credentials, an instance role)")
    if unreachable(e):     # before the 403 test: an endpoint's text (its port, say) may hold "403"
        first = text.splitlines()[0][:200] if text else ""
        return StorageError(f"{url}: the store is unreachable: the endpoint {endpoint(url)} does not answer "
                            f"({name}: {first}); check AWS_ENDPOINT_URL / FSSPEC_S3_ENDPOINT_URL and the network")
    if (isinstance(e, PermissionError) or "accessdenied" in low or "invalidaccesskeyid" in low
            or "signaturedoesnotmatch" in low or "forbidden" in low or HTTP_403.search(low)):
        return StorageError(f"{url}: access denied by the store (credentials wrong or without rights to "
                            f"{bucket!r}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the bucket policy")
    if isinstance(e, FileNotFoundError):
        return StorageError(f"{url}: no such object or prefix")
    first = text.splitlines()[0] if text else ""
    return StorageError(f"{url}: {name}: {first[:200]}")
