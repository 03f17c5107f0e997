"""The embedded demo corpus: real photos that scikit-image ships, plus generated photo-like images,
with captions, written as the url lists a user starts from (a COYO-style parquet, a DataComp-style
pool parquet and a DFN uid index). Deterministic: the same seed gives the same bytes.

    images = corpus()                                     # list[DemoImage], cached
    paths = write_corpus("out/corpus")                    # images/ + corpus.json
    lists = write_url_lists("out/corpus", srv.base_url)   # coyo.parquet, dfn_pool.parquet, dfn_index.npy

What is in it (80 images): 20 scikit-image sample photos (only those bundled in the wheel, so no
network) and 60 generated scenes (gradient sky, soft texture, shapes, sensor noise) with aspect ratios
from 1:4 to 4:1 and long sides from 64 to 1600 px. Formats: baseline JPEG, progressive JPEG, PNG
(grey, RGB and RGBA) and WebP. Eight JPEGs carry an EXIF orientation (2..8): their pixels are stored
so that applying the orientation gives the intended picture. Every generated image has a pure red
block in the top-left corner of its *displayed* picture, so a consumer can check it applied EXIF
orientation right. The DFN index selects a known 2/3 of the pool (`DemoImage.in_dfn`).

Patterns (optional, `n_patterns`; the demo uses N_PATTERNS): small pictures of one of four textures
(horizontal, vertical or diagonal stripes, a checkerboard) in two random colours, with the short
alt-text that names them ("vertical stripes"). They are the part of the corpus a tiny CPU-trained trunk
can learn something general from, and `write_probe_set` draws a labelled set of the same family from
fresh seeds, so `aimv2 probe` can show that the trained trunk beats a random one (see docs/eval.md).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
from pathlib import Path

import numpy as np

from aimv2data.atomic import atomic_write, write_bytes_atomic

SEED = 0
N_GENERATED = 60
ASPECTS = [(1, 4), (1, 3), (1, 2), (2, 3), (3, 4), (1, 1), (4, 3), (3, 2), (16, 9), (2, 1), (3, 1), (4, 1)]
EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}
# PIL's transpose that undoes orientation o, i.e. stored = display.transpose(INVERSE[o]).
_INVERSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
            6: "ROTATE_90", 7: "TRANSVERSE", 8: "ROTATE_270"}


@dataclasses.dataclass(frozen=True)
class DemoImage:
    name: str              # file name under images/, also the url path
    data: bytes = dataclasses.field(repr=False)
    format: str            # jpeg | png | webp
    progressive: bool
    mode: str              # PIL mode of the stored image: RGB, L, RGBA
    width: int             # stored pixel size (what a decoder returns before EXIF orientation)
    height: int
    orientation: int       # EXIF orientation, 1 when absent
    caption: str
    kind: str              # "photo" (scikit-image) | "generated"
    id: int                # COYO-style int64 id
    uid: str               # DataComp-style 32-hex uid
    in_dfn: bool           # selected by the demo DFN index

    @property
    def display_size(self) -> tuple[int, int]:
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def meta(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "data"}
        return {**d, "sha256": self.sha256, "display_size": list(self.display_size), "bytes": len(self.data)}


# -- real photos -------------------------------------------------------------------------------
# (loader name in skimage.data, caption, format, progressive, EXIF orientation)
PHOTOS = [
    ("astronaut", "portrait of astronaut Eileen Collins in an orange flight suit in front of a flag", "jpeg", False, 1),
    ("camera", "black and white photo of a man standing behind a camera on a tripod", "png", False, 1),
    ("chelsea", "a tabby cat named Chelsea looking straight at the camera", "jpeg", True, 1),
    ("coffee", "a cup of coffee on a saucer seen from above", "webp", False, 1),
    ("coins", "ancient Greek coins from Pompeii on a dark background", "jpeg", False, 1),
    ("rocket", "a Falcon 9 rocket standing on the launch pad under a blue sky", "jpeg", False, 6),
    ("hubble_deep_field", "the Hubble deep field: hundreds of faint distant galaxies", "jpeg", False, 1),
    ("retina", "a fundus photograph of a human retina with blood vessels", "jpeg", False, 1),
    ("moon", "black and white close-up of the cratered surface of the moon", "jpeg", False, 1),
    ("clock", "a wall clock photographed with motion blur", "jpeg", False, 1),
    ("page", "a scanned page of printed text with uneven lighting", "png", False, 1),
    ("text", "photographed printed text on a sign", "png", False, 1),
    ("brick", "a close-up of a brick wall", "jpeg", False, 1),
    ("grass", "a close-up of green grass blades in black and white", "jpeg", True, 1),
    ("gravel", "grey gravel on the ground seen from above", "webp", False, 1),
    ("immunohistochemistry", "a stained tissue sample under a microscope", "jpeg", False, 1),
    ("cell", "a single cell under a phase contrast microscope", "jpeg", False, 1),
    ("colorwheel", "a colour wheel with the full hue circle", "png", False, 1),
    ("logo", "the scikit-image logo, a snake and a microscope, on a transparent background", "png", False, 1),
    ("stereo_motorcycle", "a red motorcycle parked in a workshop", "jpeg", False, 1),
]

# -- generated scenes --------------------------------------------------------------------------
_COLORS = {
    "red": (200, 40, 40), "orange": (235, 140, 40), "yellow": (235, 210, 60), "green": (60, 160, 70),
    "teal": (40, 150, 150), "blue": (50, 90, 200), "purple": (130, 60, 170), "pink": (230, 130, 170),
    "white": (240, 240, 235), "black": (25, 25, 30), "brown": (120, 80, 45), "grey": (128, 128, 128),
}
_SHAPES = ["circle", "square", "triangle", "ellipse", "stripe"]
# format mix of the generated images, cycled: 60% baseline JPEG, 10% progressive, 20% PNG, 10% WebP
_FORMATS = [("jpeg", False)] * 6 + [("jpeg", True), ("png", False), ("png", False), ("webp", False)]


def load_photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        img = img[0]
    return np.ascontiguousarray(img)


def _scene(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    """A photo-like RGB picture and a caption that says what is in it."""
    from PIL import Image, ImageDraw, ImageFilter

    names = list(_COLORS)
    c0, c1 = rng.choice(names, 2, replace=False)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = np.cos(angle) * xx / w + np.sin(angle) * yy / h
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = (1 - t)[..., None] * np.array(_COLORS[c0], np.float32) + t[..., None] * np.array(_COLORS[c1], np.float32)
    # soft low-frequency texture: a coarse random grid upsampled smoothly
    coarse = rng.normal(0, 18, (max(2, h // 48), max(2, w // 48), 3)).astype(np.float32)
    tex = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize((w, h), Image.BICUBIC)) for c in range(3)], -1)
    pil = Image.fromarray(np.clip(img + tex, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    parts = []
    s = min(w, h)
    for _ in range(int(rng.integers(1, 4))):
        shape, color = rng.choice(_SHAPES), rng.choice([n for n in names if n not in (c0, c1)])
        big = rng.random() < 0.5
        r = s * (rng.uniform(0.2, 0.35) if big else rng.uniform(0.08, 0.18))
        cx, cy = rng.uniform(r, max(r + 1, w - r)), rng.uniform(r, max(r + 1, h - r))
        fill = _COLORS[color]
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        elif shape == "ellipse":
            draw.ellipse([cx - 1.6 * r, cy - 0.7 * r, cx + 1.6 * r, cy + 0.7 * r], fill=fill)
        else:
            draw.rectangle([0, cy - r / 4, w, cy + r / 4], fill=fill)
        parts.append(f"a {'large' if big else 'small'} {color} {shape}")
    pil = pil.filter(ImageFilter.GaussianBlur(radius=max(0.6, s / 400)))
    out = np.asarray(pil).astype(np.float32) + rng.normal(0, 4, (h, w, 3))  # sensor noise
    out = np.clip(out, 0, 255).astype(np.uint8)
    m = max(4, s // 8)
    out[:m, :m] = (255, 0, 0)  # orientation marker: top-left of the displayed picture
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    article = "an" if c0[0] in "aeiou" else "a"
    return out, f"{listing} over {article} {c0} to {c1} gradient"


# -- patterns ----------------------------------------------------------------------------------
PATTERNS = {"horizontal": "horizontal stripes", "vertical": "vertical stripes", "diagonal": "diagonal stripes",
            "checker": "a checkerboard"}
N_PATTERNS = 320
PATTERN_SIZE = 56


def pattern_image(kind: str, rng: np.random.Generator, size: int = PATTERN_SIZE) -> np.ndarray:
    """A size x size texture of class `kind`: period 9-20 % of the side, random phase, two random
    colours far enough apart to see it, a little noise. The mean colour says nothing about the class:
    only the orientation structure does."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    period = size * rng.uniform(0.09, 0.2)
    phase = rng.uniform(0, period)
    if kind == "horizontal":
        m = ((yy + phase) % period) < period / 2
    elif kind == "vertical":
        m = ((xx + phase) % period) < period / 2
    elif kind == "diagonal":
        m = ((xx + yy + phase) % period) < period / 2
    elif kind == "checker":
        m = (((xx + phase) % period) < period / 2) ^ (((yy + phase) % period) < period / 2)
    else:
        raise ValueError(f"unknown pattern {kind!r}; one of {list(PATTERNS)}")
    fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while np.abs(fg - bg).sum() < 120:
        bg = rng.uniform(0, 255, 3)
    img = np.where(m[..., None], fg, bg) + rng.normal(0, 8, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str, progressive: bool, orientation: int) -> tuple[bytes, str, int, int]:
    from PIL import Image

    img = Image.fromarray(arr)
    if orientation != 1:
        img = img.transpose(getattr(Image.Transpose, _INVERSE[orientation]))
    buf = io.BytesIO()
    if fmt == "jpeg":
        kw = {"quality": 90, "progressive": progressive}
        if orientation != 1:
            exif = Image.Exif()
            exif[0x0112] = orientation
            kw["exif"] = exif.tobytes()
        img.convert("L" if img.mode == "L" else "RGB").save(buf, "JPEG", **kw)
    elif fmt == "png":
        img.save(buf, "PNG", compress_level=6)
    else:
        img.save(buf, "WEBP", quality=90, method=4)
    with Image.open(io.BytesIO(buf.getvalue())) as back:  # the mode as stored (WebP has no grey mode)
        return buf.getvalue(), back.mode, back.width, back.height


@functools.lru_cache(maxsize=4)
def corpus(seed: int = SEED) -> tuple[DemoImage, ...]:
    """All demo images, in a fixed order. About 2 s on one core; cached per process."""
    rng = np.random.default_rng(seed)
    out: list[DemoImage] = []

    def add(name, arr, caption, fmt, progressive, orientation, kind):
        i = len(out)
        data, mode, w, h = _encode(arr, fmt, progressive, orientation)
        uid = hashlib.sha256(f"aimv2-demo-{seed}-{i}".encode()).hexdigest()[:32]
        out.append(DemoImage(name=f"{name}.{EXT[fmt]}", data=data, format=fmt, progressive=progressive, mode=mode,
                             width=w, height=h, orientation=orientation, caption=caption, kind=kind,
                             id=1_000_000 + i, uid=uid, in_dfn=i % 3 != 2))

    for name, caption, fmt, progressive, orientation in PHOTOS:
        add(f"photo_{name}", load_photo(name), caption, fmt, progressive, orientation, "photo")

    exif_cycle = iter([2, 3, 4, 5, 6, 7, 8])
    for i in range(N_GENERATED):
        a, b = ASPECTS[i % len(ASPECTS)]
        fmt, progressive = _FORMATS[i % len(_FORMATS)]
        # long side log-uniform in [64, 1600]; PNGs (large with noise) capped at 800
        long_side = int(round(np.exp(rng.uniform(np.log(64), np.log(1600 if fmt != "png" else 800)))))
        w, h = (long_side, max(16, round(long_side * b / a))) if a >= b else (max(16, round(long_side * a / b)), long_side)
        orientation = next(exif_cycle, 1) if (fmt == "jpeg" and not progressive and i % 4 == 1) else 1
        arr, caption = _scene(rng, w, h)
        add(f"gen_{i:03d}", arr, "a photo-like picture of " + caption, fmt, progressive, orientation, "generated")
    return tuple(out)


@functools.lru_cache(maxsize=4)
def patterns(n: int = N_PATTERNS, seed: int = SEED) -> tuple[DemoImage, ...]:
    """`n` pattern images (classes cycled), stored as baseline JPEG at quality 95 without chroma
    subsampling (so fetch keeps their bytes and the colour edges survive), ids after the corpus'."""
    from PIL import Image

    rng = np.random.default_rng([seed, 7])
    kinds = list(PATTERNS)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        buf = io.BytesIO()
        Image.fromarray(pattern_image(kind, rng)).save(buf, "JPEG", quality=95, subsampling=0)
        uid = hashlib.sha256(f"aimv2-demo-pattern-{seed}-{i}".encode()).hexdigest()[:32]
        out.append(DemoImage(name=f"pattern_{i:03d}.jpg", data=buf.getvalue(), format="jpeg", progressive=False,
                             mode="RGB", width=PATTERN_SIZE, height=PATTERN_SIZE, orientation=1,
                             caption=PATTERNS[kind], kind="pattern", id=3_000_000 + i, uid=uid, in_dfn=i % 3 != 2))
    return tuple(out)


def all_images(seed: int = SEED, n_patterns: int = 0) -> tuple[DemoImage, ...]:
    """The corpus plus `n_patterns` pattern images."""
    return corpus(seed) + (patterns(n_patterns, seed) if n_patterns else ())


def write_probe_set(root: str | Path, n_train: int = 20, n_val: int = 25, seed: int = SEED) -> tuple[Path, Path]:
    """A labelled image-folder set of the pattern family, from seeds the corpus never uses:
    root/train/<class>/*.png and root/val/<class>/*.png. Idempotent (same bytes, files left alone)."""
    from PIL import Image

    root = Path(root)
    for split, n, sub in (("train", n_train, 1), ("val", n_val, 2)):
        rng = np.random.default_rng([seed, 1000 + sub])
        for kind in PATTERNS:
            d = root / split / kind
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(pattern_image(kind, rng)).save(buf, "PNG")
                p = d / f"{i:04d}.png"
                if not (p.is_file() and p.read_bytes() == buf.getvalue()):
                    _atomic_write(p, buf.getvalue())
    return root / "train", root / "val"


# -- writing -----------------------------------------------------------------------------------
_atomic_write = write_bytes_atomic


def write_corpus(out_dir: str | Path, seed: int = SEED, n_patterns: int = 0) -> Path:
    """Write images/ and corpus.json (the per-image facts tests check against). Idempotent: files
    whose bytes already match are left alone (same mtimes). Returns corpus.json's path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images = all_images(seed, n_patterns)
    for im in images:
        p = out / "images" / im.name
        if not (p.is_file() and p.read_bytes() == im.data):
            _atomic_write(p, im.data)
    manifest = json.dumps({"seed": seed, "images": [im.meta() for im in images]}, indent=1).encode()
    p = out / "corpus.json"
    if not (p.is_file() and p.read_bytes() == manifest):
        _atomic_write(p, manifest)  # written last: its presence means the corpus is complete
    return p


def hostile_rows() -> list[tuple[str, str]]:
    """(url path, expected failure reason) for the hostile entries of the demo COYO list. The slow
    route is left out so the demo never waits on a timeout."""
    from aimv2data.serve import HOSTILE

    return [(p, r) for p, r in HOSTILE.items() if p != "/hostile/slow.jpg"]


def write_url_lists(out_dir: str | Path, base_url: str, seed: int = SEED, hostile: bool = True,
                    n_patterns: int = 0) -> dict[str, Path]:
    """Write coyo.parquet (COYO-700M columns), dfn_pool.parquet (DataComp pool columns) and
    dfn_index.npy (sorted u8,u8 uid halves of the in_dfn images) pointing at `base_url`."""
    import polars as pl

    from aimv2data.fetch import uid_pairs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = all_images(seed, n_patterns)
    base = base_url.rstrip("/")
    coyo = {
        "id": [im.id for im in images], "url": [f"{base}/{im.name}" for im in images],
        "text": [im.caption for im in images], "width": [im.width for im in images],
        "height": [im.height for im in images],
        "clip_similarity_vitb32": [0.30 + (im.id % 7) / 100 for im in images],
    }
    if hostile:
        for j, (path, reason) in enumerate(hostile_rows()):
            coyo["id"].append(2_000_000 + j)
            coyo["url"].append(base + path)
            coyo["text"].append(f"hostile entry: {reason}")
            coyo["width"].append(None)
            coyo["height"].append(None)
            coyo["clip_similarity_vitb32"].append(0.0)
    pool = pl.DataFrame({
        "uid": [im.uid for im in images], "url": [f"{base}/{im.name}" for im in images],
        "text": [im.caption for im in images], "original_width": [im.width for im in images],
        "original_height": [im.height for im in images],
        "clip_b32_similarity_score": [0.25 + (im.id % 5) / 100 for im in images],
        "clip_l14_similarity_score": [0.22 + (im.id % 3) / 100 for im in images],
        "face_bboxes": [[] for _ in images],
        "sha256": [im.sha256 for im in images],
    }, schema_overrides={"face_bboxes": pl.List(pl.List(pl.Float64))})
    paths = {"coyo": out / "coyo.parquet", "dfn_pool": out / "dfn_pool.parquet", "dfn_index": out / "dfn_index.npy"}
    for key, df in (("coyo", pl.DataFrame(coyo, schema_overrides={"width": pl.Int64, "height": pl.Int64})),
                    ("dfn_pool", pool)):
        buf = io.BytesIO()
        df.write_parquet(buf)
        _atomic_write(paths[key], buf.getvalue())
    index = np.sort(uid_pairs([im.uid for im in images if im.in_dfn]))
    buf = io.BytesIO()
    np.save(buf, index)
    _atomic_write(paths["dfn_index"], buf.getvalue())
    return paths


# -- synthetic captions ------------------------------------------------------------------------
def synthetic_captions(seed: int = SEED, n_patterns: int = 0) -> list[dict]:
    """A synthetic caption set for the corpus, keyed by the sha256 of each original image, as public
    re-caption sets are (e.g. Recap-DataComp-1B's `re_caption`): two longer, descriptive captions per
    image, in the style of a captioner's output rather than alt-text."""
    rows = []
    for im in all_images(seed, n_patterns):
        w, h = im.display_size
        shape = "square" if abs(w - h) <= 0.05 * max(w, h) else ("wide" if w > h else "tall")
        if im.kind == "pattern":  # a captioner says little more than the alt-text about a plain texture
            rows.append({"sha256": im.sha256, "re_caption": [f"{im.caption} in two colours", im.caption]})
            continue
        if im.kind == "generated":
            body = im.caption.removeprefix("a photo-like picture of ")
            things, _, background = body.partition(" over ")
            first = (f"A {shape} synthetic picture showing {things}, set against {background}; "
                     f"a red square marks its top-left corner.")
        else:
            first = f"A {shape} photograph: {im.caption}."
        second = f"{im.caption[0].upper()}{im.caption[1:]}, {w} by {h} pixels."
        rows.append({"sha256": im.sha256, "re_caption": [first, second]})
    return rows


def write_synthetic_captions(out_dir: str | Path, seed: int = SEED, n_patterns: int = 0) -> Path:
    """Write the synthetic caption set as `synthetic_captions.parquet` (columns sha256, re_caption)."""
    import polars as pl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "synthetic_captions.parquet"
    atomic_write(path, pl.DataFrame(synthetic_captions(seed, n_patterns)).write_parquet)
    return path
