"""The `decode` part: DALI "mixed" (nvJPEG) decode + crop + resize images/s at fixed 224 and native resolution on
generated 1-3 MP baseline JPEGs, and the `pil` decoder on all host cores (threads) on the same files; DALI
skipped with a line saying so when it is not importable (bringing it: docs/gpucheck.md)."""
from __future__ import annotations

import io
import math
import time

import torch

from ..train.distributed import affinity_cpus
from ..train.metrics import _sync
from .common import Sizes, importable, reason


def make_jpegs(n: int, seed: int = 0, mp_range=(1.0, 3.0), dry_run: bool = False) -> list[tuple[bytes, int, int]]:
    """n baseline (non-progressive) JPEGs of 1-3 MP with photo-like content: smooth colour fields plus
    fine noise, so the entropy decoder has real work (a flat image decodes unrealistically fast)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mp = rng.uniform(0.02, 0.05) if dry_run else rng.uniform(*mp_range)
        aspect = rng.uniform(0.6, 1.7)
        w = int(math.sqrt(mp * 1e6 * aspect))
        h = int(mp * 1e6 / w)
        small = rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(base + rng.integers(-24, 25, (h, w, 3), dtype=np.int16), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90, progressive=False)
        out.append((buf.getvalue(), w, h))
    return out


def part_decode(device: torch.device, sizes: Sizes, dry_run: bool, ctx: dict, **_) -> dict:
    """DALI mixed vs pil (all host cores) on the same generated files, fixed 224 RandomResizedCrop and
    native resolution (resize to cover + centre crop)."""
    import numpy as np

    from aimv2data.loader.geometry import cover, random_resized_crop

    files = make_jpegs(sizes.jpegs, dry_run=dry_run)
    rng = np.random.default_rng(0)
    res = sizes.resolution if dry_run else 224
    modes = {"fixed": [random_resized_crop(w, h, res, rng) for _, w, h in files],
             "native": [cover(w, h, *sizes.native_decode) for _, w, h in files]}
    datas = [d for d, _, _ in files]
    out = {"files": len(files), "megapixels_mean": sum(w * h for _, w, h in files) / len(files) / 1e6,
           "bytes_mean": sum(len(d) for d in datas) / len(datas), "fixed_out": [res, res],
           "native_out": list(sizes.native_decode)}
    out["pil"] = {m: _pil_rate(datas, crops) for m, crops in modes.items()}
    why = importable("nvidia.dali")
    if why is not None:
        out["dali"] = {"status": "skipped", "reason": f"DALI is not importable ({why}); bring the wheels as "
                       "docs/gpucheck.md says (scripts/gpu_check.sh)"}
    elif device.type != "cuda" and not dry_run:
        out["dali"] = {"status": "skipped", "reason": "no CUDA device: DALI 'mixed' decoding needs a GPU"}
    else:  # a dry run exercises the same calls on DALI's CPU pipeline
        try:
            out["dali"] = {"status": "ok", "backend": "mixed" if device.type == "cuda" else "cpu",
                           **{m: _dali_rate(datas, crops, device) for m, crops in modes.items()}}
        except Exception as e:  # e.g. a driver too old for the carried wheel: pil's figures still stand
            out["dali"] = {"status": "error", "reason": reason(e)}
    ctx["dali"] = out["dali"]["status"]   # the trainer part decodes with DALI only where it worked here
    return out


def _pil_rate(datas, crops, batch: int = 32) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from aimv2data.loader.decode_pil import PilDecoder

    dec = PilDecoder()
    workers = affinity_cpus()
    chunks = [(datas[i:i + batch], crops[i:i + batch]) for i in range(0, len(datas), batch)]
    # Pillow releases the GIL while it decodes and resizes, so threads use every core
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda c: dec.decode(c[0][0], c[1][0]), chunks[:1]))  # warm-up
        t0 = time.perf_counter()
        failed = sum(len(f) for _, f in pool.map(lambda c: dec.decode_batch(*c), chunks))
        dt = time.perf_counter() - t0
    return {"images_per_s": len(datas) / dt, "threads": workers, "failed": failed}


def _dali_rate(datas, crops, device, batch: int = 32, reps: int = 3) -> dict:
    from aimv2data.loader.decode_dali import DaliDecoder

    dec = DaliDecoder(max_batch=batch, num_threads=4, device_id=(device.index or 0) if device.type == "cuda" else None)
    chunks = [(datas[i:i + batch], crops[i:i + batch]) for i in range(0, len(datas), batch)]
    dec.decode_batch(*chunks[0])  # warm-up: nvJPEG handles, pinned buffers
    _sync(device)
    t0 = time.perf_counter()
    failed = 0
    for _ in range(reps):
        for c in chunks:
            _, f = dec.decode_batch(*c)
            failed += len(f)
    _sync(device)
    dt = time.perf_counter() - t0
    dec.close()
    return {"images_per_s": reps * len(datas) / dt, "batch": batch, "failed": failed}
