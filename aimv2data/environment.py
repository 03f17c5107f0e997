"""What the running environment can do: which PIL is live, DALI, CUDA, threads.

`pillow` and `pillow-simd` install into the same `PIL/` directory and the last one installed wins,
so the only honest answer to "am I on Pillow-SIMD?" is to ask which distribution owns the PIL
that was imported."""
from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import platform
import shutil
import signal
import subprocess
import threading


def pil_info() -> dict:
    import PIL
    import PIL.features as features
    from PIL import _imaging

    # Both distributions may be recorded as owners of PIL/ (one installed over the other); the live
    # one is the one whose version PIL reports.
    owners = md.packages_distributions().get("PIL", [])
    live = [o for o in owners if _version(o) == PIL.__version__] or owners
    simd = any(o.lower() == "pillow-simd" for o in live[:1])
    info = {
        "version": PIL.__version__,
        "distribution": live[0] if live else "unknown",
        "also_installed": [o for o in owners if o not in live[:1]],
        "simd": simd,
        "avx2": _binary_uses_avx2(_imaging.__file__),
        "codecs": {c: bool(features.check(c)) for c in ("jpg", "zlib", "webp", "libtiff", "littlecms2")},
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "path": os.path.dirname(PIL.__file__),
    }
    return info


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _binary_uses_avx2(path: str) -> bool | None:
    """True if the compiled PIL core contains 256-bit (ymm) instructions: Pillow-SIMD compiled with
    -mavx2 uses them in its resampling and colour-conversion kernels; a plain build does not."""
    objdump = shutil.which("objdump")
    if objdump is None:
        return None
    try:
        out = subprocess.run([objdump, "-d", "--no-show-raw-insn", path], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.count("%ymm") > 100


def cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


def dali_info() -> dict:
    try:
        import nvidia.dali as dali
        from nvidia.dali import backend
    except Exception as e:  # DALI is optional at run time: the pil decoder works without it
        return {"available": False, "error": f"{type(e).__name__}: {e}"}
    try:
        n_gpu = int(backend.GetCudaDeviceCount())
    except Exception:
        n_gpu = 0
    return {"available": True, "version": dali.__version__, "cuda_devices": n_gpu,
            "device": "gpu (nvJPEG, mixed)" if n_gpu else "cpu"}


def torch_info() -> dict:
    try:
        import torch
    except Exception as e:
        return {"available": False, "error": str(e)}
    cuda = torch.cuda.is_available()
    return {
        "available": True,
        "version": torch.__version__,
        "cuda": cuda,
        "cuda_version": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
    }


def jpeg_info() -> dict:
    """The `pil` loader's JPEG path: the crop window (`_jpegcrop`, built at install against the system
    libjpeg-turbo), else whole images through simplejpeg, else Pillow's draft (loader/decode_turbo.py)."""
    from .loader import decode_turbo

    path = ("crop window" if decode_turbo._jpegcrop else "whole image (simplejpeg)" if decode_turbo.simplejpeg
            else "Pillow draft")
    return {"path": path, "crop_window": decode_turbo._jpegcrop is not None, "simplejpeg": _version("simplejpeg")}


def versions(names=("img2dataset", "webdataset", "polars", "pyarrow", "numpy", "sentencepiece",
                    "click", "transformers", "nvidia-dali-cuda130")) -> dict:
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


def report() -> dict:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_avx2": cpu_has_avx2(),
        "pil": pil_info(),
        "jpeg": jpeg_info(),
        "dali": dali_info(),
        "torch": torch_info(),
        "packages": versions(),
    }


@contextlib.contextmanager
def keep_signal_handlers():
    """SIGTERM / SIGINT handlers as they were before the block. ray.init and wandb.init install their own;
    what a signal does to our commands (save, exit 130/143) stays ours. Main thread only (where they can be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in saved.items():
            if h is not None:
                signal.signal(s, h)
