"""What a fetch is asked to do (`FetchOptions`), and the checks that need nothing but the options: they run
before anything heavy is imported or any file is read."""
from __future__ import annotations

import dataclasses
import os

from aimv2data.fetch.errors import FetchError
from aimv2data.fetch.input import SOURCES as SOURCE_SPECS

SOURCES = (*SOURCE_SPECS, "parquet")       # the mapped sources (input.py) and any parquet (--url-col, --caption-col)
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
# Pillow's own decompression-bomb threshold (2 * Image.MAX_IMAGE_PIXELS); ~13400 x 13400. aimv2 shard's
# default too (aimv2data/manifest/inspect_image.py; tests/test_faults_cli.py keeps them equal).
DEFAULT_MAX_PIXELS = 178_956_970
PARQUET_ONLY = ("url_col", "caption_col")   # settings that mean something for --source parquet only


@dataclasses.dataclass
class FetchOptions:
    source: str                            # coyo | dfn | parquet
    url_lists: list[str]                   # parquet files or directories of them
    output: str
    dfn_index: str | None = None           # dfn: sorted u8,u8 uid index (.npy)
    url_col: str = "url"                   # parquet source only
    caption_col: str | None = "caption"    # parquet source only; None: no captions
    processes: int = max(1, os.cpu_count() or 1)
    threads: int = 64
    shard_size: int = 10_000
    limit: int | None = None               # first N rows after filtering
    max_side: int = 2048                   # downscale when the long side is larger; 0: never
    max_pixels: int = DEFAULT_MAX_PIXELS   # refuse larger images before decoding
    distributor: str = "multiprocessing"
    timeout: int = 10
    retries: int = 0
    verify_hash: bool | None = None        # None: on for dfn (the pool's sha256), off otherwise
    keep_progressive: bool = False
    quality: int = 95
    retry_failed: bool = False             # download again only what failed transiently (retry.py)
    ray_address: str | None = None         # --distributor ray: the cluster (default: what ray.init finds)
    allow_private_addresses: bool = False  # fetch from private/loopback addresses too (guard.py)

    def settings(self) -> dict:
        """What defines the output: a rerun with different settings is refused, not mixed in. Recorded in
        the job file; `from_settings` reads it back."""
        keys = ("source", "url_col", "caption_col", "shard_size", "limit", "max_side", "max_pixels",
                "verify_hash", "keep_progressive", "quality")
        s = {k: getattr(self, k) for k in keys}
        s["verify_hash"] = bool(self.verify_hash)
        if self.source != "parquet":
            s.update(dict.fromkeys(PARQUET_ONLY))
        return s

    def from_settings(self, settings: dict) -> FetchOptions:
        """These options with a job's recorded settings in place of the ones that define the output."""
        fields = {k: v for k, v in settings.items() if settings["source"] == "parquet" or k not in PARQUET_ONLY}
        return dataclasses.replace(self, **fields)

    def differences(self, recorded: dict) -> list[str]:
        """How these options' settings differ from a job's recorded ones ("key: old -> new")."""
        mine = self.settings()
        return [f"{k}: {recorded.get(k)!r} -> {mine.get(k)!r}" for k in sorted(set(mine) | set(recorded))
                if mine.get(k) != recorded.get(k)]

    def check(self) -> None:
        """Refuse values that are wrong whatever the files say (the CLI's Click types catch most first)."""
        if self.source is not None and self.source not in SOURCES:
            raise FetchError(f"unknown source {self.source!r}: use {', '.join(SOURCES)}", "source")
        if self.shard_size < 1:
            raise FetchError("--shard-size must be at least 1", "shard-size")
        if self.limit is not None and self.limit < 1:
            raise FetchError("--limit must be at least 1", "limit")
        if self.max_side < 0:
            raise FetchError("--max-side must be 0 (never resize) or a positive number of pixels", "max-side")
        if self.distributor not in DISTRIBUTORS:
            raise FetchError(f"unknown distributor {self.distributor!r}: use one of {', '.join(DISTRIBUTORS)}",
                             "distributor")
        if self.retry_failed:
            return   # the rest is read from the output's own record
        if self.source == "dfn" and not self.dfn_index:
            raise FetchError("--source dfn needs --dfn-index FILE.npy (the DFN uid index)", "dfn-index")
        if self.source != "dfn" and self.dfn_index:
            raise FetchError("--dfn-index applies to --source dfn only", "dfn-index")
        if self.verify_hash and self.source != "dfn":
            raise FetchError("--verify-hash needs --source dfn (the pool's sha256 column)", "verify-hash")
