"""The loader: an iterable of `Batch`es over a manifest, one epoch per `iter()`, resumable mid-epoch.

    loader = Loader("MANIFEST", native_res=True, batch_patches=2**16, decoder="pil", workers=8)
    for batch in loader:                      # batch.images (B, 3, h*p, w*p), batch.patches, ...
        ...
    ckpt["loader"] = loader.state_dict()      # {epoch, step, ...}: the next batch to produce
    loader.load_state_dict(ckpt["loader"])    # the same batches, pixel for pixel, as without the stop

Steps are produced by `StepMaker.make(epoch, step)`, a pure function of its arguments and the
manifest. `pil`: torch DataLoader worker processes over an IterableDataset of steps; worker k makes
steps k, k+W, k+2W, ... and the DataLoader's round-robin hands them back in step order (checked).
`dali`: the pipeline runs in this process with `workers` DALI threads (it owns the GPU when there is one).
Distributed: rank and world size come from the arguments, torch.distributed or RANK/WORLD_SIZE; every
rank makes the same steps, each with its own slice of the rows.
"""
from __future__ import annotations

import dataclasses
import os
import signal
from dataclasses import dataclass

import numpy as np
import torch

from ..batch import Batch
from .captions import CONTEXT, CaptionChooser, resolve_pad_id, tokenize
from .geometry import Crop, cover, random_resized_crop
from .reader import ShardReader
from .sampler import CROP, FixedSampler, NativeSampler, StepSpec, rng, unit
from .samples import SampleTable


@dataclass
class LoaderConfig:
    native_res: bool = False
    batch_patches: int = 2**16          # C, patches per rank per step (native resolution)
    batch_rule: str = "area"            # native: B = C / A ("area") or C // (h*w) ("grid")
    resolution: int = 224               # R (fixed resolution)
    batch_size: int = 256               # B per rank (fixed resolution)
    decoder: str = "pil"                # pil | dali
    workers: int = 0                    # pil: worker processes (0 = in this process); dali: threads
    seed: int = 0
    rank: int | None = None
    world_size: int | None = None
    scale: tuple[float, float] = (0.4, 1.0)           # RandomResizedCrop (paper Table A1)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5                  # fixed resolution
    native_hflip: float = 0.0           # native resolution: no augmentation by default
    caption_mix: dict | None = None     # P(alt | source); None = paper Table 2
    tokenizer: object = None            # callable text -> ids, or None for captions only
    pad_id: int | None = None
    context: int = CONTEXT
    draft: bool = True                  # pil: JPEG reduced-scale decoding
    reducing_gap: float = 1.0           # pil: min source px per output px left after a draft
    prefetch_factor: int = 2
    pin_memory: bool = False
    max_replacements: int = 16          # per slot, before the step fails
    dali_device: int | None | str = "auto"


def dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class StepMaker:
    """(epoch, step) -> Batch: reads, decodes, replaces bad samples, chooses captions."""

    def __init__(self, table: SampleTable, sampler, cfg: LoaderConfig):
        self.table, self.sampler, self.cfg = table, sampler, cfg
        self.p = table.patch_size
        self.reader = ShardReader(table.shards)
        self.captions = CaptionChooser(cfg.caption_mix, cfg.seed)
        self.pad_id = resolve_pad_id(cfg.tokenizer, cfg.pad_id) if cfg.tokenizer is not None else None
        self._decoder = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_decoder"] = None      # built lazily in the process that uses it
        return state

    @property
    def decoder(self):
        if self._decoder is None:
            if self.cfg.decoder == "pil":
                from .decode_pil import PilDecoder

                self._decoder = PilDecoder(draft=self.cfg.draft, reducing_gap=self.cfg.reducing_gap)
            elif self.cfg.decoder == "dali":
                from .decode_dali import DaliDecoder

                self._decoder = DaliDecoder(self.sampler.max_batch, num_threads=max(1, self.cfg.workers),
                                            device_id=self.cfg.dali_device)
            else:
                raise ValueError(f"unknown decoder {self.cfg.decoder!r}: use pil or dali")
        return self._decoder

    def crop(self, spec: StepSpec, row: int) -> Crop:
        t, cfg = self.table, self.cfg
        w, h = int(t.width[row]), int(t.height[row])
        if cfg.native_res:
            gh, gw = spec.grid
            flip = cfg.native_hflip > 0 and unit(cfg.seed, spec.epoch, row, CROP) < cfg.native_hflip
            return cover(w, h, gw * self.p, gh * self.p, flip)
        return random_resized_crop(w, h, cfg.resolution, rng(cfg.seed, spec.epoch, row, CROP),
                                   cfg.scale, cfg.ratio, cfg.hflip)

    def _read(self, row: int) -> bytes:
        t = self.table
        return self.reader.read(int(t.shard_idx[row]), int(t.offset[row]), int(t.size[row]))

    def _decode(self, spec: StepSpec, rows: list[int]) -> tuple[torch.Tensor, dict[int, str], list[Crop]]:
        datas, crops, failed = [], [], {}
        for i, r in enumerate(rows):
            try:
                datas.append(self._read(r))
            except OSError as e:
                failed[i] = f"read: {e}"
                datas.append(b"")
            crops.append(self.crop(spec, r))
        orient = None if self.table.orientation is None else [int(self.table.orientation[r]) for r in rows]
        ok = [i for i in range(len(rows)) if i not in failed]
        if len(ok) == len(rows):
            return (*self.decoder.decode_batch(datas, crops, orient), crops)
        w, h = crops[0].out
        images = torch.zeros((len(rows), 3, h, w))
        if ok:
            sub, bad = self.decoder.decode_batch([datas[i] for i in ok], [crops[i] for i in ok],
                                                 None if orient is None else [orient[i] for i in ok])
            images = images.to(sub.device)
            images[ok] = sub
            failed.update({ok[j]: reason for j, reason in bad.items()})
        return images, failed, crops

    def make(self, epoch: int, step: int) -> Batch:
        spec = self.sampler.spec(epoch, step)
        rows = [int(r) for r in spec.rows]
        images, failed, crops = self._decode(spec, rows)
        replaced = []
        attempt = 0
        while failed:
            attempt += 1
            if attempt > self.cfg.max_replacements:
                keys = [self.table.key(rows[i]) for i in failed]
                raise RuntimeError(f"epoch {epoch} step {step}: {len(failed)} samples still fail to decode after "
                                   f"{self.cfg.max_replacements} replacements each (last: {keys[:3]}: "
                                   f"{next(iter(failed.values()))}); the bucket looks corrupt: rebuild the "
                                   "manifest (`aimv2 shard`) or check the shards")
            slots = sorted(failed)
            for i in slots:
                replaced.append((self.table.key(rows[i]), failed[i]))
                rows[i] = self.sampler.replacement(spec, i, attempt)
            sub, bad, new_crops = self._decode(spec, [rows[i] for i in slots])
            images[slots] = sub.to(images.device)
            for j, i in enumerate(slots):
                crops[i] = new_crops[j]
            failed = {slots[j]: reason for j, reason in bad.items()}

        texts, sources, keys = [], [], []
        for r in rows:
            t = self.table.texts(r)
            syn = {c: t[c] for c in self.table.syn_columns}
            text, _ = self.captions.choose(epoch, r, t.get("source"), t.get("caption"), syn)
            texts.append(text)
            sources.append(t.get("source") or "")
            keys.append(t["key"])
        tokens = None
        if self.cfg.tokenizer is not None:
            tokens = tokenize(texts, self.cfg.tokenizer, self.pad_id, self.cfg.context)
        padding = float(np.mean([c.padding() for c in crops]))
        return Batch(images=images, grid=tuple(spec.grid), patch_size=self.p, captions=texts, keys=keys,
                     sources=sources, tokens=tokens, epoch=epoch, step=step, area=spec.area,
                     replaced=replaced, padding=padding)


class _Steps(torch.utils.data.IterableDataset):
    """Steps [start, stop) of one epoch; worker k of W makes steps start+k, start+k+W, ..."""

    def __init__(self, maker: StepMaker, epoch: int, start: int, stop: int):
        self.maker, self.epoch, self.start, self.stop = maker, epoch, start, stop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, w = (info.id, info.num_workers) if info is not None else (0, 1)
        for s in range(self.start + k, self.stop, w):
            yield self.maker.make(self.epoch, s)


def _worker_init(_):
    torch.set_num_threads(1)   # one core per worker: decoding is the work, not torch ops
    ignore_stop_signals()


def ignore_stop_signals() -> None:
    """SIGTERM/SIGINT sent to the whole process group (Slurm preemption, scancel, Ctrl-C) must reach only
    the main process, which finishes its step and saves; a worker that died of it would make the
    DataLoader raise in the middle of that step. torch's worker SIGTERM handler is replaced; workers
    still end when the main process closes their queues or exits (torch's parent watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Loader:
    def __init__(self, manifest, **kwargs):
        cfg = kwargs.pop("config", None) or LoaderConfig()
        unknown = [k for k in kwargs if not hasattr(cfg, k)]
        if unknown:
            raise TypeError(f"Loader: unknown options {unknown}; see LoaderConfig")
        cfg = dataclasses.replace(cfg, **kwargs)
        if cfg.decoder not in ("pil", "dali"):
            raise ValueError(f"unknown decoder {cfg.decoder!r}: use pil or dali")
        self.cfg = cfg
        self.rank, self.world_size = dist_info(cfg.rank, cfg.world_size)
        self.table = SampleTable(manifest)
        t = self.table
        if cfg.native_res:
            grids = {b: t.buckets[b].grids for b in t.members}
            self.sampler = NativeSampler(t.members, grids, cfg.batch_patches, cfg.seed, self.rank, self.world_size,
                                         cfg.batch_rule)
            if self.sampler.steps(0) == 0:
                need = cfg.batch_patches // 4096 * self.world_size
                raise ValueError(f"{manifest}: no bucket holds a single native-resolution batch (the largest has "
                                 f"{max(len(m) for m in t.members.values())} samples; even A = 4096 needs C/4096 x "
                                 f"world = {need}); lower --batch-patches or use a larger manifest")
        else:
            self.sampler = FixedSampler(t.n, t.bucket, t.members, cfg.resolution, t.patch_size, cfg.batch_size,
                                        cfg.seed, self.rank, self.world_size)
        self.maker = StepMaker(t, self.sampler, cfg)
        self.epoch, self.step = 0, 0
        self.stats = {"batches": 0, "images": 0, "patches": 0, "replaced": 0, "replaced_keys": []}

    @property
    def patch_size(self) -> int:
        return self.table.patch_size

    @property
    def budget(self) -> int:
        """C: patches per rank per step."""
        return self.sampler.c

    def __len__(self) -> int:
        """Steps in the current epoch."""
        return self.sampler.steps(self.epoch)

    def _batches(self, epoch: int, start: int, stop: int):
        cfg = self.cfg
        if cfg.decoder == "dali" or cfg.workers == 0:
            for s in range(start, stop):
                yield self.maker.make(epoch, s)
            return
        dl = torch.utils.data.DataLoader(
            _Steps(self.maker, epoch, start, stop), batch_size=None, num_workers=cfg.workers,
            prefetch_factor=cfg.prefetch_factor, pin_memory=cfg.pin_memory, worker_init_fn=_worker_init,
            persistent_workers=False)
        yield from dl

    def __iter__(self):
        epoch, start = self.epoch, self.step
        stop = self.sampler.steps(epoch)
        expect = start
        for batch in self._batches(epoch, start, stop):
            if batch.step != expect:   # the order contract with the DataLoader's round-robin
                raise RuntimeError(f"loader produced step {batch.step}, expected {expect}")
            expect += 1
            self.step = batch.step + 1
            self._count(batch)
            yield batch
        if self.step >= stop:
            self.epoch, self.step = epoch + 1, 0

    def _count(self, batch: Batch) -> None:
        s = self.stats
        s["batches"] += 1
        s["images"] += len(batch)
        s["patches"] += len(batch) * batch.grid[0] * batch.grid[1]
        s["replaced"] += len(batch.replaced)
        s["replaced_keys"] = (s["replaced_keys"] + [list(r) for r in batch.replaced])[-100:]

    def state_dict(self) -> dict:
        cfg = self.cfg
        return {"epoch": self.epoch, "step": self.step, "seed": cfg.seed, "native_res": cfg.native_res,
                "batch_patches": cfg.batch_patches, "batch_rule": cfg.batch_rule, "resolution": cfg.resolution,
                "batch_size": cfg.batch_size,
                "rank": self.rank, "world_size": self.world_size, "manifest": self.table.fingerprint,
                "stats": {k: (list(v) if isinstance(v, list) else v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        cfg = self.cfg
        mine = {"seed": cfg.seed, "native_res": cfg.native_res, "world_size": self.world_size,
                "manifest": self.table.fingerprint}
        mine.update({"batch_patches": cfg.batch_patches, "batch_rule": cfg.batch_rule} if cfg.native_res else
                    {"resolution": cfg.resolution, "batch_size": cfg.batch_size})
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError("loader state does not match this loader (saved, now): "
                             + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
                             + "; resume with the same manifest, seed, batch settings and world size")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        if "stats" in state:
            self.stats = {k: (list(v) if isinstance(v, list) else v) for k, v in state["stats"].items()}
