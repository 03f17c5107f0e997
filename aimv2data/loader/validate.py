"""One rule for damaged JPEGs, called by both decoders (`pil`, `dali`) before they decode, so they accept
and reject the same samples.

Why a rule of our own: libjpeg treats most damage inside the entropy-coded data as a *warning* ("Corrupt
JPEG data: premature end of data segment", "extraneous bytes before marker") and returns an image with
grey or smeared blocks. Pillow throws those warnings away and raises only on the fatal errors; DALI's CPU
decoder prints them on stderr and raises on none of these. The two decoders therefore disagreed on
damaged files, and DALI trained on them without a count.

The rule walks the JPEG's marker segments (cheap: no pixel is decoded) and inside each scan checks the
byte-stuffing that every JPEG encoder must produce: an 0xFF byte is followed by 0x00 (a stuffed data
byte), a restart marker RST0..7 in cyclic order, fill 0xFF, or a marker that may legally follow a scan
(DHT, DQT, DRI, SOS, COM, APPn, EOI). Random bytes written over scan data break this with high
probability; the file must also end its last scan with EOI (a truncated file does not). Damage that keeps
the stuffing intact decodes in both decoders alike (as smeared blocks) and is not detectable without a
full decode (`aimv2 shard --verify decode` rejects it at manifest time).
"""
from __future__ import annotations

import numpy as np

_AFTER_SCAN = {0xC4, 0xDA, 0xDB, 0xDD, 0xD9, 0xFE, *range(0xE0, 0xF0)}   # DHT SOS DQT DRI EOI COM APPn


def jpeg_problem(data: bytes) -> str | None:
    """None if `data` is not a JPEG or passes the rule; else why it is damaged (one line)."""
    if data[:2] != b"\xff\xd8":
        return None                                   # not a JPEG: the decoder's own checks apply
    n = len(data)
    arr = np.frombuffer(data, dtype=np.uint8)
    pos, scans = 2, 0
    while pos < n:
        if data[pos] != 0xFF:
            return f"jpeg: expected a marker at byte {pos}, found 0x{data[pos]:02X}"
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos + 1 >= n:
            break
        marker = data[pos + 1]
        if marker == 0xD9:
            return None if scans else "jpeg: EOI before any scan"
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn outside a scan: standalone
            pos += 2
            continue
        if pos + 4 > n:
            break
        seg_end = pos + 2 + (data[pos + 2] << 8 | data[pos + 3])
        if seg_end > n:
            break
        if marker != 0xDA:
            pos = seg_end
            continue
        scans += 1
        pos, problem = _scan_end(arr, seg_end)
        if problem:
            return problem
    return "jpeg: no EOI marker at the end (truncated file)"


def _scan_end(arr: np.ndarray, start: int) -> tuple[int, str | None]:
    """Position of the marker that ends the scan starting at `start`, or a problem."""
    ff = np.flatnonzero(arr[start:-1] == 0xFF) + start
    nxt = arr[ff + 1]
    ok = (nxt == 0x00) | (nxt == 0xFF) | ((nxt >= 0xD0) & (nxt <= 0xD7))
    stop = np.flatnonzero(~ok)
    rst = nxt[:stop[0] if len(stop) else len(nxt)]
    rst = rst[(rst >= 0xD0) & (rst <= 0xD7)].astype(np.int64) - 0xD0
    if len(rst) and (rst != np.arange(len(rst)) % 8).any():
        i = int(np.flatnonzero(rst != np.arange(len(rst)) % 8)[0])
        return 0, f"jpeg: restart marker {i} of a scan is RST{rst[i]}, expected RST{i % 8} (damaged scan data)"
    if not len(stop):
        return len(arr), "jpeg: no EOI marker at the end (truncated file)"
    at = int(ff[stop[0]])
    marker = int(arr[at + 1])
    if marker not in _AFTER_SCAN:
        return 0, f"jpeg: invalid marker 0xFF{marker:02X} at byte {at} inside the scan data (damaged)"
    return at, None
