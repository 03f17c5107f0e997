"""The manifest's columns (manifests/SPEC.md is the public description) and atomic file writers.

Every file of a manifest is written to a temp name in the same directory and renamed into place, so a
reader (or a killed writer) never sees half a file: a part either exists complete or not at all.
Temp names start with '.' and end in '.tmp' (aimv2data/atomic.py), so `samples/*.parquet` globs never match them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from aimv2data.atomic import atomic_write, write_json_atomic  # noqa: F401  (re-exported)

SCHEMA_VERSION = "1.1"   # 1.1: stored_sha256, reencoded

# What `aimv2 shard` reads of one member at most, by kind (--max-caption-bytes etc.); a member whose tar
# header claims more is rejected unread. Real alt-texts and synthetic captions are well under 1 KiB (and
# 77 tokens are used), img2dataset's json a few KiB, a 50 MP JPEG about 25 MiB.
MAX_CAPTION_BYTES = 64 << 10
MAX_JSON_BYTES = 1 << 20
MAX_IMAGE_BYTES = 64 << 20

SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()),           # webdataset key (member path up to the first dot)
    ("source", pa.string()),        # data source: json `source`, else --source, else the input's name
    ("uid", pa.string()),           # json `uid` (DataComp), else json `id` (COYO), as a string
    ("url", pa.string()),
    ("sha256", pa.string()),        # json `sha256` (of the downloaded bytes), else of the stored member
    ("shard", pa.string()),         # tar path, relative to the manifest dir (or absolute)
    ("member", pa.string()),        # image member name inside the tar
    ("offset", pa.int64()),         # byte offset of the image member's DATA in the tar
    ("size", pa.int64()),           # bytes
    ("format", pa.string()),        # jpeg | png | webp (from the bytes, not the extension)
    ("width", pa.int32()),          # DISPLAY size: EXIF orientation applied
    ("height", pa.int32()),
    ("orientation", pa.int8()),     # EXIF 1..8 (1 when absent or unreadable)
    ("mode", pa.string()),          # PIL mode of the stored image (RGB, L, CMYK, P, RGBA, LA, I;16, 1, ...)
    ("alpha", pa.bool_()),          # has transparency
    ("bit_depth", pa.int8()),       # bits per sample (PNG may be 1, 2, 4, 16)
    ("original_width", pa.int32()), # img2dataset's size before its resize, when the json has it
    ("original_height", pa.int32()),
    ("bucket", pa.int16()),         # aspect bucket id, see _manifest.json `buckets`
    ("caption", pa.string()),       # alt-text (.txt, else json `caption`); null when empty
    ("stored_sha256", pa.string()), # 1.1: of the stored member (json `stored_sha256`, else computed)
    ("reencoded", pa.bool_()),      # 1.1: stored bytes are not the downloaded ones; null when unknown
])

REJECT_SCHEMA = pa.schema([
    ("key", pa.string()),           # null for problems of the tar itself
    ("source", pa.string()),
    ("url", pa.string()),
    ("uid", pa.string()),
    ("shard", pa.string()),
    ("member", pa.string()),
    ("offset", pa.int64()),
    ("size", pa.int64()),
    ("reason", pa.string()),        # stable vocabulary, manifests/SPEC.md
    ("detail", pa.string()),        # human-readable specifics
])

REASONS = (
    "tar_unreadable", "tar_truncated", "tar_tail", "tar_damaged", "missing_from_tar", "missing_image", "duplicate_member",
    "empty_file", "not_an_image", "unsupported_format", "truncated", "corrupt", "decompression_bomb",
    "animated", "too_small", "extreme_aspect", "caption_too_large", "json_too_large", "image_too_large",
)

SYN_PREFIX = "syn_"
SYN_TYPE = pa.list_(pa.string())


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd",
                                                  write_page_checksum=True))  # readers can verify pages


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)
