"""The `dali` decoder: an NVIDIA DALI pipeline fed by `fn.external_source`.

Per step the loader feeds the encoded bytes (read through the manifest's offsets) and, per sample, the
crop box (relative ROI), the output size and the flip flag; batch size varies per step up to
`max_batch`. `fn.decoders.image` applies EXIF orientation (adjust_orientation, DALI's default), so the
relative box means the same display-space box as in the `pil` decoder. `fn.resize` with a relative
ROI + antialiased cubic interpolation does resize-to-cover/crop or RandomResizedCrop in one pass,
then `fn.flip` mirrors. Images stay uint8 HWC, handed over as a channels-last (B, 3, H, W) view like the
`pil` decoder's (batch.empty_images); the model normalises them (docs/contracts.md).

With a CUDA device the decoder runs on "mixed" (nvJPEG) and the rest on the GPU, and images come
back as CUDA tensors; without one (device_id=None) the whole pipeline runs on the CPU.

Bad samples: DALI 2.4's CPU decoder can crash the process (segfault, intermittently, in batches of
dozens) on bytes that are not an image, instead of raising. So every sample's header is first parsed
with PIL (`Image.open` reads headers only, ~tens of microseconds); what PIL cannot identify is reported
for replacement without reaching DALI. A DALI pipeline is also invalid after an operator error, so a
batch that still fails rebuilds it, finds the bad samples one by one, and reports them.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from ..batch import empty_images
from .geometry import Crop
from .validate import jpeg_problem


def cuda_device() -> int | None:
    try:
        return 0 if torch.cuda.is_available() else None
    except Exception:
        return None


class DaliDecoder:
    name = "dali"

    def __init__(self, max_batch: int, num_threads: int = 1, device_id: int | None | str = "auto"):
        self.max_batch = max(1, int(max_batch))
        self.num_threads = max(1, int(num_threads))
        self.device_id = cuda_device() if device_id == "auto" else device_id
        self.device = "cpu" if self.device_id is None else "mixed"
        self._build()

    def _build(self) -> None:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        pipe = Pipeline(batch_size=self.max_batch, num_threads=self.num_threads, device_id=self.device_id,
                        prefetch_queue_depth=1)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            img = fn.decoders.image(encoded, device=self.device, output_type=types.RGB, adjust_orientation=True)
            img = fn.resize(img, roi_start=roi_start, roi_end=roi_end, roi_relative=True, size=size,
                            interp_type=types.INTERP_CUBIC, antialias=True)
            img = fn.flip(img, horizontal=mirror)
            pipe.set_outputs(img)
        pipe.build()
        self.pipe = pipe

    def _run(self, datas: list[bytes], crops: list[Crop]) -> torch.Tensor:
        rel = [c.relative() for c in crops]                      # x0, y0, x1, y1
        self.pipe.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        self.pipe.feed_input("roi_start", [np.array([r[1], r[0]], np.float32) for r in rel])   # (y, x)
        self.pipe.feed_input("roi_end", [np.array([r[3], r[2]], np.float32) for r in rel])
        self.pipe.feed_input("size", [np.array([c.out[1], c.out[0]], np.float32) for c in crops])  # (H, W)
        self.pipe.feed_input("mirror", [np.array(int(c.flip), np.int32) for c in crops])
        (out,) = self.pipe.run()
        t = out.as_tensor()                                       # uint8 (B, H, W, 3)
        if self.device_id is None:
            return torch.from_numpy(np.array(t)).permute(0, 3, 1, 2)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        res = torch.empty(t.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
        feed_ndarray(t, res, cuda_stream=torch.cuda.current_stream(self.device_id))
        return res.permute(0, 3, 1, 2)

    def decode_batch(self, datas: list[bytes], crops: list[Crop],
                     orientations: list[int] | None = None) -> tuple[torch.Tensor, dict[int, str]]:
        """-> (uint8 (B, 3, H, W), channels-last memory, {slot: reason} for samples that failed). DALI reads the
        EXIF orientation itself (`orientations` is accepted for interface parity and not used)."""
        if len(datas) > self.max_batch:
            raise ValueError(f"batch of {len(datas)} exceeds the DALI pipeline's max batch {self.max_batch}")
        screened = {i: r for i, d in enumerate(datas) if (r := _screen(d)) is not None}
        if screened:
            ok = [i for i in range(len(datas)) if i not in screened]
            w, h = crops[0].out
            images = empty_images(len(datas), h, w, self._device_str())
            if ok:
                sub, bad = self.decode_batch([datas[i] for i in ok], [crops[i] for i in ok])
                images[ok] = sub
                screened.update({ok[j]: r for j, r in bad.items()})
            return images, screened
        try:
            return self._run(datas, crops), {}
        except RuntimeError as first:
            self._build()
            failed = {}
            for i, (d, c) in enumerate(zip(datas, crops)):
                try:
                    self._run([d], [c])
                except RuntimeError as e:
                    failed[i] = "DALI: " + _first_line(e)
                    self._build()
            if not failed:   # not a per-sample problem: surface the pipeline's own error
                raise first
            good = [i for i in range(len(datas)) if i not in failed]
            w, h = crops[0].out
            images = empty_images(len(datas), h, w, self._device_str())
            if good:
                images[good] = self._run([datas[i] for i in good], [crops[i] for i in good])
            return images, failed

    def _device_str(self) -> str:
        return "cpu" if self.device_id is None else f"cuda:{self.device_id}"

    def close(self) -> None:
        self.pipe = None


def _screen(data: bytes) -> str | None:
    """None if PIL can parse the image's headers and a JPEG passes the damage rule the pil decoder also
    applies (validate.py), else why not."""
    if (damaged := jpeg_problem(data)) is not None:
        return damaged
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.size  # noqa: B018 - reading the size parses the header: that is the check
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _first_line(e: Exception) -> str:
    """The operator's own message from a DALI pipeline error (the part after 'encountered:')."""
    text = str(e)
    tail = text.split("encountered:", 1)[-1]
    lines = [ln.strip() for ln in tail.splitlines()
             if ln.strip() and not ln.startswith("Current pipeline") and "Critical error" not in ln]
    return (lines[0] if lines else type(e).__name__)[:200]
