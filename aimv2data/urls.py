"""What of an image url is kept: everything but its userinfo (`user:password@`).

A url list from the web may carry credentials inside urls (`http://user:pass@host/a.jpg`). fetch strips them
before anything is written or requested, and the manifest strips them from the urls it copies from a tar's
json (a fetch made before this rule), so no stored or printed url holds them. The query string is kept: it
is part of the object's address (CDN variants, signed urls) and a retry needs it (docs/fetch.md).
"""
from __future__ import annotations

import re

# the authority's userinfo: after "scheme://", up to the last "@" before the path, query or fragment.
# One pattern for polars (Rust regex, aimv2data/fetch/input.py normalise) and Python (strip_userinfo).
USERINFO = r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#]*@"
_USERINFO = re.compile(USERINFO)

ALLOWED_SCHEMES = ("http", "https")


def strip_userinfo(url: str | None) -> str | None:
    return _USERINFO.sub(r"\1", url) if url else url
