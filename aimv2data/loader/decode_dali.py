"""The `dali` decoder: an NVIDIA DALI pipeline fed by `fn.external_source`.

Per step the loader feeds the encoded bytes (read through the manifest's offsets) and, per sample, the
decode window, the crop box inside it, the output size and the flip flag; batch size varies per step up
to `max_batch` (C/128 = 512 images at native resolution with C = 65536).

Only the crop is decoded (issue 22 point 4): `fn.decoders.image_slice` decodes the window `slice_window`
computes, the crop box plus the reach of the resize filter (2 source pixels per output pixel, at least 2,
plus PAD) in whole pixels, clamped to the image; libjpeg-turbo (CPU) and nvImageCodec (mixed) then skip
the IDCT and colour conversion outside it and stop after its last row. `fn.resize` with that box
(absolute, in the window's pixels) + antialiased cubic interpolation does resize-to-cover/crop or
RandomResizedCrop in one pass, then `fn.flip` mirrors. The window is in display pixels: DALI applies EXIF
orientation before slicing (adjust_orientation), the same tag the manifest's `orientation` column holds,
and each sample's display size comes from its header (PIL, parsed anyway for the screen below), so the
relative box means what it means in the `pil` decoder. The pixels equal those of the whole-image decode
+ ROI resize this replaced to within 1 grey level (tests/test_loader_decoders.py).

Images stay uint8 HWC, handed over as a channels-last (B, 3, H, W) view like the `pil` decoder's
(batch.empty_images); the model normalises them (docs/contracts.md).

With a CUDA device the decoder runs on "mixed" (nvJPEG) and the rest on the GPU; without one
(device_id=None) the whole pipeline runs on the CPU. Buffers are sized for the largest batch up front
(`hints`): nvJPEG's per-thread buffers and the hardware decoder's preallocation for the largest source
image the loader reports, and the resize / flip outputs for the most output pixels one step can hold
(C p^2 at native resolution, B R^2 at fixed), so a step of 512 small images does not reallocate.
On CUDA each run()'s output is copied out of DALI's buffer on the decoder's own stream (`DeviceCopy`) and
the copy is waited for (its event, not the device) before the images are handed over, so the next run()
never reuses a buffer whose copy is in flight and the trainer's stream never waits for DALI; the
decode-ahead thread (prefetch.py) is the one that waits. No GPU was lent to this work: the CPU pipeline
is tested, the mixed one's copy logic is tested with a stand-in for torch.cuda.

Bad samples: DALI 2.4's CPU decoder can crash the process (segfault, intermittently, in batches of
dozens) on bytes that are not an image, instead of raising. So every sample's header is first parsed
with PIL (`Image.open` reads headers only, ~tens of microseconds); what PIL cannot identify is reported
for replacement without reaching DALI. A DALI pipeline is also invalid after an operator error, so a
batch that still fails rebuilds it, finds the bad samples one by one, and reports them.
"""
from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
from PIL import Image

from ..batch import empty_images
from ..manifest.inspect_image import _orientation
from .geometry import Crop
from .validate import jpeg_problem

PAD = 2                       # window pixels beyond the resize filter's reach (as decode_turbo's)
TRANSPOSED = (5, 6, 7, 8)     # EXIF orientations that swap width and height
DEVICE_PADDING, HOST_PADDING = 16 << 20, 8 << 20   # DALI's defaults for nvJPEG's buffers: the least we ask for


def cuda_device() -> int | None:
    """"auto": this process's GPU (torchrun's LOCAL_RANK, else torch's current device), None without CUDA. The
    trainer passes its model's device explicitly (train.distributed.decoder_device)."""
    try:
        if not torch.cuda.is_available():
            return None
        local = os.environ.get("LOCAL_RANK")
        return int(local) if local is not None else torch.cuda.current_device()
    except Exception:
        return None


def slice_window(crop: Crop, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], tuple, tuple]:
    """The decode window for `crop` on an image of display `size` (w, h): ((x0, y0), (x1, y1)) in whole
    pixels, clamped to the image, and the crop box inside it as resize's roi_start / roi_end ((y, x),
    absolute in the window's pixels). The window holds the box plus the reach of the antialiased cubic
    filter (2 source pixels per output pixel when shrinking, 2 when enlarging) plus PAD, so the resized
    crop equals that of the whole image."""
    w, h = size
    rx0, ry0, rx1, ry1 = crop.relative()
    x0, y0, x1, y1 = rx0 * w, ry0 * h, rx1 * w, ry1 * h
    reach_x = 2 * max(1.0, (x1 - x0) / crop.out[0]) + PAD
    reach_y = 2 * max(1.0, (y1 - y0) / crop.out[1]) + PAD
    sx0, sy0 = max(0, math.floor(x0 - reach_x)), max(0, math.floor(y0 - reach_y))
    sx1, sy1 = min(w, math.ceil(x1 + reach_x)), min(h, math.ceil(y1 + reach_y))
    return (sx0, sy0), (sx1, sy1), (y0 - sy0, x0 - sx0), (y1 - sy0, x1 - sx0)


class DeviceCopy:
    """Copies a pipeline output (a DALI TensorListGPU) into a torch tensor on the decoder's own CUDA stream,
    then waits for that copy's event (not the device): the next run() may reuse DALI's buffer, and the
    tensor is complete when handed over. It is recorded on the consumer's stream (the trainer's: the
    default stream), so the caching allocator does not give its memory to the next copy while the
    consumer's kernels still read it. `cuda` and `feed` are torch.cuda and DALI's feed_ndarray (tests
    give stand-ins: no GPU here)."""

    def __init__(self, device: torch.device, cuda=None, feed=None):
        if cuda is None:
            cuda = torch.cuda
        if feed is None:
            from nvidia.dali.plugin.pytorch import feed_ndarray as feed
        self.cuda, self.feed, self.device = cuda, feed, device
        self.stream = cuda.Stream(self.device)
        self.consumer = cuda.default_stream(self.device)

    def __call__(self, t) -> torch.Tensor:
        with self.cuda.stream(self.stream):
            res = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
            self.feed(t, res, cuda_stream=self.stream)
            done = self.stream.record_event()
        done.synchronize()
        res.record_stream(self.consumer)
        return res


class DaliDecoder:
    name = "dali"

    def __init__(self, max_batch: int, num_threads: int = 1, device_id: int | None | str = "auto",
                 max_output_pixels: int = 0, max_source: tuple[int, int] | None = None):
        """`max_output_pixels`: the most output pixels one batch holds (C p^2 or B R^2; 0: unknown);
        `max_source`: the largest source (width, height) the batches draw from (None: unknown). Both
        only size buffers up front (`hints`)."""
        self.max_batch = max(1, int(max_batch))
        self.num_threads = max(1, int(num_threads))
        self.device_id = cuda_device() if device_id == "auto" else device_id
        self.device = "cpu" if self.device_id is None else "mixed"
        self.max_output_pixels, self.max_source = int(max_output_pixels), max_source
        self._copy = None if self.device_id is None else DeviceCopy(torch.device("cuda", self.device_id))
        self._build()

    def hints(self) -> tuple[dict, dict]:
        """(the decoder's, the resize and flip outputs') buffer-size arguments for the largest batch."""
        dec, out = {}, {}
        if self.device == "mixed" and self.max_source:
            w, h = (int(v) for v in self.max_source)
            pad = 3 * w * h                               # one RGB image of the largest source, per thread
            dec = {"preallocate_width_hint": w, "preallocate_height_hint": h,
                   "device_memory_padding": max(DEVICE_PADDING, pad), "host_memory_padding": max(HOST_PADDING, pad)}
        if self.max_output_pixels:                        # DALI reserves batch_size x the per-sample hint
            out = {"bytes_per_sample_hint": -(-3 * self.max_output_pixels // self.max_batch)}
        return dec, out

    def _build(self) -> None:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        dec_hints, out_hints = self.hints()
        pipe = Pipeline(batch_size=self.max_batch, num_threads=self.num_threads, device_id=self.device_id,
                        prefetch_queue_depth=1)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            start = fn.external_source(name="start", dtype=types.INT32, ndim=1)       # (x, y)
            end = fn.external_source(name="end", dtype=types.INT32, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)   # (y, x)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            img = fn.decoders.image_slice(encoded, start=start, end=end, device=self.device, output_type=types.RGB,
                                          adjust_orientation=True, **dec_hints)
            img = fn.resize(img, roi_start=roi_start, roi_end=roi_end, roi_relative=False, size=size,
                            interp_type=types.INTERP_CUBIC, antialias=True, **out_hints)
            img = fn.flip(img, horizontal=mirror, **out_hints)
            pipe.set_outputs(img)
        pipe.build()
        self.pipe = pipe

    def _run(self, datas: list[bytes], crops: list[Crop], sizes: list[tuple[int, int]]) -> torch.Tensor:
        wins = [slice_window(c, s) for c, s in zip(crops, sizes)]
        self.pipe.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        self.pipe.feed_input("start", [np.array(w[0], np.int32) for w in wins])
        self.pipe.feed_input("end", [np.array(w[1], np.int32) for w in wins])
        self.pipe.feed_input("roi_start", [np.array(w[2], np.float32) for w in wins])
        self.pipe.feed_input("roi_end", [np.array(w[3], np.float32) for w in wins])
        self.pipe.feed_input("size", [np.array([c.out[1], c.out[0]], np.float32) for c in crops])  # (H, W)
        self.pipe.feed_input("mirror", [np.array(int(c.flip), np.int32) for c in crops])
        (out,) = self.pipe.run()
        t = out.as_tensor()                                       # uint8 (B, H, W, 3)
        if self._copy is None:
            return torch.from_numpy(np.array(t)).permute(0, 3, 1, 2)
        return self._copy(t).permute(0, 3, 1, 2)

    def decode_batch(self, datas: list[bytes], crops: list[Crop],
                     orientations: list[int] | None = None) -> tuple[torch.Tensor, dict[int, str]]:
        """-> (uint8 (B, 3, H, W), channels-last memory, {slot: reason} for samples that failed).
        `orientations`: the manifest's EXIF orientations (None: read from each file), for the display
        size the decode window is cut from; DALI applies the orientation itself."""
        if len(datas) > self.max_batch:
            raise ValueError(f"batch of {len(datas)} exceeds the DALI pipeline's max batch {self.max_batch}")
        probed = [_probe(d, None if orientations is None else orientations[i]) for i, d in enumerate(datas)]
        return self._decode(list(datas), crops, [s for s, _ in probed],
                            {i: r for i, (_, r) in enumerate(probed) if r is not None})

    def _decode(self, datas, crops, sizes, screened: dict[int, str]) -> tuple[torch.Tensor, dict[int, str]]:
        if screened:
            ok = [i for i in range(len(datas)) if i not in screened]
            w, h = crops[0].out
            images = empty_images(len(datas), h, w, self._device_str())
            if ok:
                sub, bad = self._decode([datas[i] for i in ok], [crops[i] for i in ok], [sizes[i] for i in ok], {})
                images[ok] = sub
                screened.update({ok[j]: r for j, r in bad.items()})
            return images, screened
        try:
            return self._run(datas, crops, sizes), {}
        except RuntimeError as first:
            self._build()
            failed = {}
            for i, (d, c, s) in enumerate(zip(datas, crops, sizes)):
                try:
                    self._run([d], [c], [s])
                except RuntimeError as e:
                    failed[i] = "DALI: " + _first_line(e)
                    self._build()
            if not failed:   # not a per-sample problem: surface the pipeline's own error
                raise first
            good = [i for i in range(len(datas)) if i not in failed]
            w, h = crops[0].out
            images = empty_images(len(datas), h, w, self._device_str())
            if good:
                images[good] = self._run([datas[i] for i in good], [crops[i] for i in good], [sizes[i] for i in good])
            return images, failed

    def _device_str(self) -> str:
        return "cpu" if self.device_id is None else f"cuda:{self.device_id}"

    def close(self) -> None:
        self.pipe = None


def _probe(data: bytes, orientation: int | None) -> tuple[tuple[int, int] | None, str | None]:
    """(display size (w, h), None) if PIL can parse the image's headers and a JPEG passes the damage rule
    the pil decoder also applies (validate.py), else (None, why not). `orientation` None: the EXIF tag
    as the manifest reads it (the one DALI applies)."""
    if (damaged := jpeg_problem(data)) is not None:
        return None, damaged
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size        # parsing the header is the check
            if orientation is None:
                orientation = _orientation(im)[0]
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    return ((h, w) if orientation in TRANSPOSED else (w, h)), None


def _first_line(e: Exception) -> str:
    """The operator's own message from a DALI pipeline error (the part after 'encountered:')."""
    text = str(e)
    tail = text.split("encountered:", 1)[-1]
    lines = [ln.strip() for ln in tail.splitlines()
             if ln.strip() and not ln.startswith("Current pipeline") and "Critical error" not in ln]
    return (lines[0] if lines else type(e).__name__)[:200]
