"""What `aimv2 fetch` connects to, and what it records about each download.

img2dataset downloads with `urllib.request.urlopen`, which also opens `file://` and `ftp://` urls, follows
redirects to `ftp://`, and connects to any address a host name resolves to. `GuardedDownloader` (a subclass
of img2dataset's Downloader, bound in img2dataset.main for the call like NativeResizer) downloads with an
opener that knows http and https only, checks the scheme of the url and of every redirect, and checks the
address at connect time: the connection is made to the address that was checked, so a host name that
resolves to a public address for a check and to 169.254.169.254 for the connection (DNS rebinding) cannot
get through. Refused:
  - any scheme but http/https (any case), for the url and for each redirect;
  - link-local addresses (169.254.0.0/16, fe80::/10: cloud credential services), always;
  - private, loopback and other non-global addresses (10/8, 172.16/12, 192.168/16, 127/8, ::1, fc00::/7,
    100.64/10, 0/8, ...), unless allow_private (`--allow-private-addresses`; the demo and tests need it).
A refusal is a failed download with a message starting "refused" (reason refused_scheme, refused_link_local
or refused_private in the summary); it is never retried. Proxies from the environment are not used: the
check must see the address it connects to.

Each sample's json and parquet row also gets `final_url` (the url the response came from after redirects,
userinfo stripped), `stored_sha256` (of the bytes stored in the tar) and `reencoded` (the stored bytes are
not the downloaded ones, whose hash stays `sha256`).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import http.client
import io
import ipaddress
import math
import socket
import urllib.error
import urllib.parse
import urllib.request

import pyarrow as pa
from img2dataset.downloader import Downloader, compute_key, is_disallowed

from aimv2data.urls import ALLOWED_SCHEMES, strip_userinfo

REFUSED = "refused"        # the first word of every refusal message (summary.reason_class)
EXTRA_FIELDS = (("final_url", pa.string()), ("stored_sha256", pa.string()), ("reencoded", pa.bool_()))
# img2dataset's own user agent (download_image), so servers see the same client
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


class Refused(Exception):
    """A url or address fetch does not connect to. Not an OSError, so urllib passes it through unwrapped."""


def address_refusal(ip: str, allow_private: bool) -> str | None:
    """Why fetch does not connect to `ip` (None: it does)."""
    a = ipaddress.ip_address(ip.split("%", 1)[0])          # a scoped IPv6 address: fe80::1%eth0
    if a.version == 6 and a.ipv4_mapped is not None:      # ::ffff:169.254.169.254 is 169.254.169.254
        a = a.ipv4_mapped
    if a.is_link_local:
        return f"refused address {a} (link-local)"
    if not allow_private and not a.is_global:
        return f"refused address {a} (private or loopback; --allow-private-addresses fetches it)"
    return None


def scheme_refusal(url: str, what: str = "url") -> str | None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ALLOWED_SCHEMES:
        return None
    return f"refused {what} scheme {scheme!r}: only http and https are fetched"


def connect(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, *, allow_private: bool):
    """socket.create_connection, but to allowed addresses only: each address the name resolves to is checked,
    and the socket connects to that very address."""
    host, port = address
    refusal, error = None, None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        why = address_refusal(sockaddr[0], allow_private)
        if why:
            refusal = refusal or why
            continue
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            error = e
            sock.close()
    if error is not None:
        raise error
    raise Refused(refusal or f"no address found for {host}")


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, allow_private: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(connect, allow_private=allow_private)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, allow_private: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(connect, allow_private=allow_private)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow_private: bool):
        super().__init__()
        self.allow_private = allow_private

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, allow_private=self.allow_private), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow_private: bool):
        super().__init__()
        self.allow_private = allow_private

    def https_open(self, req):
        extra = {} if getattr(self, "_check_hostname", None) is None else {"check_hostname": self._check_hostname}
        return self.do_open(functools.partial(_HTTPSConnection, allow_private=self.allow_private), req,
                            context=self._context, **extra)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, but to http/https only (urllib follows ftp:// and names other schemes in an
    HTTPError that reads as an HTTP failure), and never with credentials from the Location."""

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:
            why = scheme_refusal(urllib.parse.urljoin(req.full_url, location), "redirect to")
            if why:
                fp.close()
                raise Refused(why)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return super().redirect_request(req, fp, code, msg, headers, strip_userinfo(newurl))


def opener(allow_private: bool) -> urllib.request.OpenerDirector:
    """http and https only: no file, ftp or data handler, no proxy (the address check must see the peer)."""
    o = urllib.request.OpenerDirector()
    for h in (_HTTPHandler(allow_private), _HTTPSHandler(allow_private), _RedirectHandler(),
              urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
              urllib.request.UnknownHandler()):
        o.add_handler(h)
    return o


def download_once(url: str, timeout, user_agent_token, disallowed_header_directives, open_url):
    """img2dataset's download_image through `open_url`. Returns (stream or None, error or None, final url)."""
    agent = USER_AGENT + (f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
                          if user_agent_token else "")
    try:
        why = scheme_refusal(url)
        if why:
            return None, why, None
        with open_url(urllib.request.Request(url, headers={"User-Agent": agent}), timeout=timeout) as r:
            final = strip_userinfo(r.geturl())
            if disallowed_header_directives and is_disallowed(r.headers, user_agent_token,
                                                              disallowed_header_directives):
                return None, "Use of image disallowed by X-Robots-Tag directive", final
            return io.BytesIO(r.read()), None, final
    except urllib.error.HTTPError as e:
        e.close()
        return None, str(e), strip_userinfo(e.geturl())
    except Exception as e:  # img2dataset's rule: a failed download is a message, never a dead worker
        return None, str(e), None


class _AnnotatingWriter:
    """Wraps img2dataset's sample writer: adds EXTRA_FIELDS to the schema and to every sample."""

    def __init__(self, inner, final_urls, shard_id, output_folder, save_caption, oom_shard_count, schema,
                 encode_format):
        for name, kind in EXTRA_FIELDS:
            schema = schema.append(pa.field(name, kind))
        self.inner = inner(shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format)
        self.final_urls = final_urls

    def write(self, img, key, caption, meta):
        stored = hashlib.sha256(img).hexdigest() if img is not None else None
        meta.update(final_url=self.final_urls.pop(key, None), stored_sha256=stored,
                    reencoded=None if img is None else stored != meta.get("sha256"))
        self.inner.write(img, key, caption, meta)

    def close(self):
        self.inner.close()


class GuardedDownloader(Downloader):
    """img2dataset's Downloader with the checks above; same constructor plus `allow_private`."""

    def __init__(self, *args, allow_private: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.allow_private = allow_private

    def download_shard(self, row):
        import img2dataset.downloader as i2d

        shard_id = row[0]
        per_shard = math.ceil(math.log10(self.number_sample_per_shard))
        final_urls: dict[str, str | None] = {}
        open_url = opener(self.allow_private).open

        def download(x, timeout, retries, user_agent_token, disallowed_header_directives):
            key, url = x
            for _ in range(retries + 1):
                stream, err, final = download_once(url, timeout, user_agent_token, disallowed_header_directives,
                                                   open_url)
                if stream is not None or err.startswith(REFUSED):   # a refusal is final, not retried
                    break
            final_urls[compute_key(key, shard_id, per_shard, self.oom_shard_count)] = final
            return key, stream, err

        mine = copy.copy(self)
        mine.sample_writer_class = functools.partial(_AnnotatingWriter, self.sample_writer_class, final_urls)
        # img2dataset's download_shard calls the module's download_image_with_retry by name, and a worker
        # process runs one shard at a time: bind ours there for this shard
        original = i2d.download_image_with_retry
        i2d.download_image_with_retry = download
        try:
            return Downloader.download_shard(mine, row)
        finally:
            i2d.download_image_with_retry = original
