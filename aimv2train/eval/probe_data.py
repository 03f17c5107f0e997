"""Labelled image sets for probing, and the frozen trunk's features of them, cached on disk.

A data set is either
  - an image-folder tree, `DATA/<class>/**/<image>` (torchvision's ImageFolder layout: one folder per
    class, any depth below it), or
  - a manifest directory (`aimv2 shard`) whose samples/*.parquet carry a label column (`--label-col`).

The trunk is frozen, so each image is encoded once: `encode(...)` writes every final-norm token of every
image under CACHE/<key>/, where the key hashes the encoder's weights, the data (names, sizes, labels) and
the preprocessing, so a changed checkpoint or data set never reuses stale features:

    meta.json                    what was encoded (checkpoint, data, preprocessing, encoder hash)
    part_00000.tokens.npy        (tokens of the part's images, D), cache dtype (float16 by default)
    part_00000.pooled.npy        (images, D) float32: mean over each image's tokens, taken in float32
    part_00000.json              rows, labels, token counts, grids, skipped images -- written last
    complete.json                written when every part is there

Each part is written atomically and its json last, so an interrupted encode resumes at the first
missing part. Images that fail to decode are skipped and named (part json, then the results).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aimv2data.atomic import atomic_write, write_text_atomic
from aimv2data.manifest import layout
from aimv2data.paper import PATCH_SIZE
from .embed import IMAGE_SUFFIXES
from ..model.encoder import Encoder
from ..model.preprocess import fixed_resolution, load_rgb, native_resolution

CACHE_VERSION = 1
PART_SIZE = 1024  # images per cache part: the unit of resumption (L at 224 px: 0.5 GB in float16)


class ProbeDataError(ValueError):
    """A data set that cannot be probed; the message says what and what to do."""


# ------------------------------------------------------------------------------------------ data sets

@dataclass(frozen=True)
class Item:
    name: str             # image file path, or "<shard>:<key>" for a manifest row
    label: int
    path: str             # the image file, or the tar holding it
    offset: int = -1      # manifest rows: the image member's bytes are [offset, offset + size) of `path`
    size: int = -1

    def open(self):
        if self.offset < 0:
            return self.path
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"short read: {len(data)} of {self.size} bytes at offset {self.offset} (truncated tar?)")
        return io.BytesIO(data)

    def stamp(self) -> str:
        """What identifies this image's bytes cheaply: size and mtime of the file, or its tar slice."""
        if self.offset >= 0:
            return f"{self.name}|{self.offset}|{self.size}|{self.label}"
        try:
            st = os.stat(self.path)
            return f"{self.name}|{st.st_size}|{st.st_mtime_ns}|{self.label}"
        except OSError:
            return f"{self.name}|missing|{self.label}"


@dataclass
class LabelledSet:
    root: str
    kind: str                                   # "folder" | "manifest"
    classes: list[str]
    items: list[Item]
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) not even listed

    def fingerprint(self) -> str:
        h = hashlib.sha256("\n".join(self.classes).encode())
        for it in self.items:
            h.update(it.stamp().encode())
        return h.hexdigest()

    def counts(self) -> dict[str, int]:
        n = np.bincount([it.label for it in self.items], minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, n)}


def _class_index(found: list[str], classes: list[str] | None, root: Path, what: str) -> dict[str, int]:
    """Class name -> index: the data set's own sorted classes, or those of the training set."""
    if classes is None:
        return {c: i for i, c in enumerate(found)}
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ProbeDataError(f"{root}: {what} {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
                             f"{'is' if len(unknown) == 1 else 'are'} not in the training set "
                             f"({len(classes)} classes: {classes[:5]}...); a probe cannot predict an unseen class: "
                             f"remove {'it' if len(unknown) == 1 else 'them'} or add training images")
    return {c: i for i, c in enumerate(classes)}


def image_folder(root: str | os.PathLike, classes: list[str] | None = None) -> LabelledSet:
    """DATA/<class>/**/<image>: class names are the sub-folder names, sorted; empty folders are ignored."""
    root = Path(root)
    per_class = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            per_class[d.name] = files
    if not per_class:
        raise ProbeDataError(f"{root}: no class folders with images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it; "
                             f"expected DATA/<class>/<image>, or a manifest directory with a label column")
    index = _class_index(list(per_class), classes, root, "class folders")
    items = [Item(str(f), index[c], str(f)) for c, files in per_class.items() for f in files]
    return LabelledSet(str(root), "folder", list(index), items)


def manifest_set(root: str | os.PathLike, label_col: str = "label", classes: list[str] | None = None) -> LabelledSet:
    """Rows of MANIFEST/samples/*.parquet with their `label_col`; rows whose label is null are dropped
    (counted and named). Integer labels keep their numeric order, others sort as strings."""
    import polars as pl

    root = Path(root)
    files = layout.sample_files(root)
    if not files:
        raise ProbeDataError(f"{root}: no samples/*.parquet; is it a manifest written by `aimv2 shard`?")
    frames = []
    for f in files:
        cols = pl.read_parquet_schema(f)
        if label_col not in cols:
            other = [c for c in cols if c not in ("key", "shard", "offset", "size", "member", "sha256", "url")]
            raise ProbeDataError(f"{f}: no label column {label_col!r}; pass --label-col (its columns: {other[:12]})")
        frames.append(pl.read_parquet(f, columns=["key", "shard", "offset", "size", label_col]))
    df = pl.concat(frames, how="vertical_relaxed")
    nulls = df.filter(pl.col(label_col).is_null())
    dropped = [(f"{s}:{k}", f"null {label_col}") for s, k in zip(nulls["shard"], nulls["key"])]
    df = df.filter(pl.col(label_col).is_not_null())
    if df.height == 0:
        raise ProbeDataError(f"{root}: every row has a null {label_col!r}; nothing to probe")
    names = [str(v) for v in sorted(df[label_col].unique().to_list())]  # ints keep numeric order
    index = _class_index(names, classes, root, f"{label_col} values")
    items = []
    for key, shard, off, size, lab in df.iter_rows():
        tar = Path(shard) if Path(shard).is_absolute() else root / shard
        items.append(Item(f"{shard}:{key}", index[str(lab)], str(tar), int(off), int(size)))
    return LabelledSet(str(root), "manifest", list(index), items, dropped)


def open_dataset(path: str | os.PathLike, label_col: str = "label", classes: list[str] | None = None) -> LabelledSet:
    """An image-folder tree or a manifest directory (recognised by its _manifest.json)."""
    p = Path(path)
    if not p.is_dir():
        raise ProbeDataError(f"{p}: not a directory; DATA is an image-folder tree (DATA/<class>/<image>) or a "
                             f"manifest directory with a label column")
    if layout.is_manifest(p):
        return manifest_set(p, label_col, classes)
    return image_folder(p, classes)


# ------------------------------------------------------------------------------------------ encoding

@dataclass(frozen=True)
class Preprocess:
    """How an image becomes encoder input: fixed R x R (shorter side to R, centre crop) or native aspect
    on at most `max_patches` patches: exactly what `aimv2 embed` does (aimv2train.model.preprocess)."""
    resolution: int | None = None
    max_patches: int | None = None
    patch_size: int = PATCH_SIZE

    def __post_init__(self):
        if (self.resolution is None) == (self.max_patches is None):
            raise ValueError("pass exactly one of resolution= (fixed) and max_patches= (native resolution)")
        if self.resolution is not None and self.resolution % self.patch_size:
            raise ValueError(f"--resolution {self.resolution} is not a multiple of the patch size {self.patch_size}")

    def __call__(self, img) -> torch.Tensor:
        if self.resolution is not None:
            return fixed_resolution(img, self.resolution)
        return native_resolution(img, self.max_patches, self.patch_size)

    def describe(self) -> str:
        return f"{self.resolution}px" if self.resolution else f"native, <= {self.max_patches} patches"


class _Decoded(torch.utils.data.Dataset):
    """Item i -> (i, pixels or None, error or None); runs in loader workers."""

    def __init__(self, items: list[Item], prep: Preprocess):
        self.items, self.prep = items, prep

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            return i, self.prep(load_rgb(self.items[i].open())), None
        except Exception as e:  # noqa: BLE001 - an undecodable image is skipped and named, not fatal
            return i, None, f"{type(e).__name__}: {e}"


def encoder_hash(encoder: Encoder) -> str:
    """sha256 over the encoder's config and every weight's bytes: the cache key's checkpoint part."""
    h = hashlib.sha256(json.dumps(asdict(encoder.cfg), sort_keys=True).encode())
    for name, t in sorted(encoder.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a bare temp name
            np.save(f, array)
    atomic_write(path, write)


def _save_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj) + "\n")


@dataclass
class EncodeReport:
    cache: Path
    images: int                 # encoded images in the cache
    skipped: list[dict]         # {"name", "reason"}
    encoded_now: int            # images encoded by this call (0: everything came from the cache)
    seconds: float


def cache_key(enc_hash: str, data: LabelledSet, prep: Preprocess, dtype: str) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{enc_hash}|{data.fingerprint()}|{prep}|{dtype}".encode())
    return h.hexdigest()[:20]


@torch.inference_mode()
def encode(encoder: Encoder, data: LabelledSet, cache_root: str | os.PathLike, prep: Preprocess, *,
           enc_hash: str | None = None, batch_size: int = 64, device: str = "cpu", workers: int = 0,
           dtype: str = "float16", part_size: int = PART_SIZE, describe: dict | None = None,
           progress: bool = True) -> EncodeReport:
    """Encode `data` with the frozen encoder into CACHE/<key>/ (or find it there); see the module doc."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"cache dtype must be float16 or float32, got {dtype!r}")
    enc_hash = enc_hash or encoder_hash(encoder)
    cache = Path(cache_root) / cache_key(enc_hash, data, prep, dtype)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (cache / "meta.json").is_file():
        _save_json(cache / "meta.json", {"version": CACHE_VERSION, "encoder_sha256": enc_hash, "data": data.root,
                                         "kind": data.kind, "classes": data.classes, "images": len(data.items),
                                         "preprocess": asdict(prep), "dtype": dtype, "part_size": part_size,
                                         **(describe or {})})
    parts = [(j, data.items[s:s + part_size]) for j, s in enumerate(range(0, len(data.items), part_size))]
    todo = [(j, items) for j, items in parts if not (cache / f"part_{j:05d}.json").is_file()]
    done_images = len(data.items) - sum(len(items) for _, items in todo)
    encoder = encoder.to(device).eval()
    bar = tqdm(total=len(data.items), initial=done_images, desc="encode", unit="img", disable=not progress)
    for j, items in todo:
        _encode_part(encoder, items, cache, j, prep, batch_size, device, workers, dtype, bar)
    bar.close()
    encoded_now = sum(len(items) for _, items in todo)
    metas = [json.loads((cache / f"part_{j:05d}.json").read_text()) for j, _ in parts]
    skipped = [s for m in metas for s in m["skipped"]]
    n = sum(len(m["rows"]) for m in metas)
    if not (cache / "complete.json").is_file():
        _save_json(cache / "complete.json", {"images": n, "skipped": len(skipped), "parts": len(parts)})
    return EncodeReport(cache, n, skipped, encoded_now, time.perf_counter() - t0)


def _as_is(sample):
    return sample


def _encode_part(encoder, items, cache: Path, j: int, prep, batch_size, device, workers, dtype, bar) -> None:
    loader = torch.utils.data.DataLoader(_Decoded(items, prep), batch_size=None, num_workers=workers,
                                         collate_fn=_as_is)
    tokens, pooled, rows, labels, lengths, grids, skipped = [], [], [], [], [], [], []
    pending: dict[tuple, list[tuple[int, torch.Tensor]]] = {}  # per input shape: native grids batch apart
    p = prep.patch_size

    def flush(shape):
        group = pending.pop(shape)
        x = torch.stack([t for _, t in group]).to(device)
        z = encoder(x).float().cpu()
        for (i, _), zi in zip(group, z):
            tokens.append(zi.numpy().astype(dtype))
            pooled.append(zi.mean(0).numpy())
            rows.append(items[i].name)
            labels.append(items[i].label)
            lengths.append(zi.shape[0])
            grids.append([x.shape[2] // p, x.shape[3] // p])

    for i, x, err in loader:
        bar.update(1)
        if err is not None:
            skipped.append({"name": items[i].name, "reason": err})
            continue
        pending.setdefault(tuple(x.shape), []).append((i, x))
        if len(pending[tuple(x.shape)]) == batch_size:
            flush(tuple(x.shape))
    for shape in sorted(pending):
        flush(shape)
    D = encoder.cfg.dim
    _save_npy(cache / f"part_{j:05d}.tokens.npy", np.concatenate(tokens) if tokens else np.zeros((0, D), dtype))
    _save_npy(cache / f"part_{j:05d}.pooled.npy",
              np.stack(pooled).astype(np.float32) if pooled else np.zeros((0, D), np.float32))
    _save_json(cache / f"part_{j:05d}.json", {"rows": rows, "labels": labels, "lengths": lengths,
                                             "grids": grids, "skipped": skipped})


# ------------------------------------------------------------------------------------------ reading

class Features:
    """The cached features of one data set: tokens for the attentive probe, pooled for the linear one.

    Tokens stay memory-mapped unless they fit in `in_memory_bytes`; `batch(idx)` pads images of
    different grids (native resolution) and returns the mask of real tokens."""

    def __init__(self, cache: str | os.PathLike, in_memory_bytes: int = 8 << 30):
        cache = Path(cache)
        if not (cache / "complete.json").is_file():
            raise ProbeDataError(f"{cache}: feature cache is incomplete; rerun the probe to finish encoding")
        meta = json.loads((cache / "meta.json").read_text())
        self.cache, self.meta, self.classes = cache, meta, meta["classes"]
        n_parts = json.loads((cache / "complete.json").read_text())["parts"]
        parts = [json.loads((cache / f"part_{j:05d}.json").read_text()) for j in range(n_parts)]
        mm = [np.load(cache / f"part_{j:05d}.tokens.npy", mmap_mode="r") for j in range(n_parts)]
        self.rows = [r for m in parts for r in m["rows"]]
        self.skipped = [s for m in parts for s in m["skipped"]]
        self.labels = np.asarray([lab for m in parts for lab in m["labels"]], dtype=np.int64)
        self.lengths = np.asarray([n for m in parts for n in m["lengths"]], dtype=np.int64)
        self.grids = [tuple(g) for m in parts for g in m["grids"]]
        self.pooled = np.concatenate([np.load(cache / f"part_{j:05d}.pooled.npy") for j in range(n_parts)]) \
            if n_parts else np.zeros((0, 0), np.float32)
        if len(self.rows) == 0:
            raise ProbeDataError(f"{meta['data']}: no image could be encoded ({len(self.skipped)} skipped, "
                                 f"e.g. {self.skipped[:2]})")
        self.dim = int(self.pooled.shape[1])
        total = sum(a.nbytes for a in mm)
        if total <= in_memory_bytes:  # one contiguous array: gathers are plain fancy indexing
            self._tok = [np.concatenate([np.asarray(a) for a in mm])]
            self._part = np.zeros(len(self.rows), dtype=np.int64)
            self._start = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        else:
            self._tok = mm
            self._part = np.concatenate([np.full(len(m["rows"]), j) for j, m in enumerate(parts)]).astype(np.int64)
            self._start = np.concatenate([np.concatenate([[0], np.cumsum(m["lengths"])[:-1]]).astype(np.int64)
                                          for m in parts if m["rows"]])
        self.uniform = len(set(self.lengths.tolist())) == 1
        if self.uniform and len(self._tok) == 1:  # fixed resolution: a (n, N, D) view
            self._dense = self._tok[0].reshape(len(self.rows), int(self.lengths[0]), self.dim)
        else:
            self._dense = None

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens of images `idx` as float32 (B, N, D), and (B, N) True for real tokens when they differ."""
        if self._dense is not None:
            return torch.from_numpy(self._dense[idx].astype(np.float32)), None
        lens = self.lengths[idx]
        n = int(lens.max())
        x = np.zeros((len(idx), n, self.dim), dtype=np.float32)
        for b, i in enumerate(idx):
            s = self._start[i]
            x[b, :lens[b]] = self._tok[self._part[i]][s:s + lens[b]]
        mask = None if (lens == n).all() else torch.from_numpy(np.arange(n)[None] < lens[:, None])
        return torch.from_numpy(x), mask

    def token_stats(self, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and variance over every token of every image (float64 sums)."""
        s = np.zeros(self.dim, np.float64)
        sq = np.zeros(self.dim, np.float64)
        count = 0
        for a in self._tok:
            for i in range(0, a.shape[0], chunk):
                c = np.asarray(a[i:i + chunk], dtype=np.float64)
                s += c.sum(0)
                sq += (c * c).sum(0)
                count += c.shape[0]
        mean = s / count
        return mean, np.maximum(sq / count - mean * mean, 0.0)
