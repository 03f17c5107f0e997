"""The loader: an iterable of `Batch`es over a manifest, one segment per `iter()`, resumable mid-segment.

    loader = Loader("MANIFEST", native_res=True, batch_patches=2**16, decoder="pil", workers=8)
    for batch in loader:                      # batch.images uint8 (B, 3, h*p, w*p), batch.patches, ...
        ...
    ckpt["loader"] = loader.state_dict()      # {segment, offset, t, ...}: the next batch to produce
    loader.load_state_dict(ckpt["loader"])    # the same batches, pixel for pixel, as without the stop

Each rank reads only its share of the manifest (shares.py: chunks, or row ranges of them, dealt to ranks per
source and epoch); steps come in *segments* (no source changes epoch on this rank within one; one segment per
`iter()`: `Loader.segment`, with `Loader.offset` the next step in it), and `StepMaker.make(i)` makes step i of
the current segment, a pure function of the segment's snapshot and the share. The share the next segment needs
is read in a thread while this one trains (`read_ahead`). Each decoder owns its parallelism (decoders.py).
`processes` (`pil`): a pool of worker processes that lives as long as the loader (pool.py), the DataLoader
handing steps back in step order (checked); `close()` stops it. `threads` (`dali`): the pipeline runs in this
process with `workers` threads of its own (it owns the GPU when there is one), driven by one background thread
that decodes `prefetch_factor` steps ahead (`dali_ahead=False`: synchronous).
Distributed: rank and world size come from the arguments, torch.distributed or RANK/WORLD_SIZE; every
rank makes the same steps, each with its own slice of the rows.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch

from .. import paper
from ..batch import UNREACHABLE, Batch, empty_images, replaced_kind
from .captions import CONTEXT, CaptionChooser, check_caption_mix, resolve_pad_id, tokenize
from .decoders import THREADS, decoder_spec
from .geometry import Crop, cover, random_resized_crop
from .pool import StepPool
from .prefetch import Background
from .reader import ShardReader, TarChangedError
from .sampler import ALL, CROP, Sampler, Snapshot, StepSpec, resolve_mix, rng, unit
from .samples import Manifest, SampleTable
from .shares import deal_spans

STATE_VERSION = 2   # 2: rank-local shares and source streams (issue 13); 1 (no "version"): whole-manifest loader
_TOKENS = itertools.count(1)   # names each share table a loader reads (its workers are told which they hold)


@dataclass
class LoaderConfig:
    native_res: bool = False
    batch_patches: int = 2**16          # C, patches per rank per step (native resolution)
    batch_rule: str = "area"            # native: B = C / A ("area") or C // (h*w) ("grid")
    resolution: int = 224               # R (fixed resolution)
    batch_size: int = 256               # B per rank (fixed resolution)
    decoder: str = "pil"                # a name in decoders.DECODERS
    workers: int = 0                    # the decoder's parallelism (decoders.py): pil processes, dali threads
    seed: int = 0
    rank: int | None = None
    world_size: int | None = None
    scale: tuple[float, float] = paper.RRC_SCALE    # RandomResizedCrop (paper Table A1)
    ratio: tuple[float, float] = paper.RRC_RATIO
    hflip: float = paper.HFLIP          # fixed resolution
    native_hflip: float = 0.0           # native resolution: no augmentation by default
    caption_mix: str | dict | None = None   # "coyo:alt=0.5,coyo:recap=0.5" (captions.py); None = Table 2
    mix: str | dict | None = None       # P(source): "dfn=0.6,coyo=0.06"; None = Table 2; "rows" = one stream
    tokenizer: object = None            # callable text -> ids, or None for captions only
    pad_id: int | None = None
    context: int = CONTEXT
    draft: bool = True                  # pil: JPEG reduced-scale decoding
    reducing_gap: float = 1.0           # pil: min source px per output px left after a draft
    prefetch_factor: int = 2            # pil: batches per worker in flight; dali: steps decoded ahead
    persistent_workers: bool = True     # pil: one worker pool for the loader's life (False: new workers a segment)
    read_ahead: bool = True             # read the next segment's share in a thread while this segment trains
    pin_memory: bool = False
    max_replacements: int = 16          # per slot, before the step fails
    dali_device: int | None | str = "auto"
    dali_ahead: bool = True             # dali: decode the next steps in a thread while this one is used
    read_inflight: int = 32             # shards at URLs: ranged reads in flight per batch
    read_retries: int = 4               # shards at URLs: retries (with back-off) of a failed read
    cache_dir: str | None = None        # shards at URLs: keep fetched samples on local disk here ...
    cache_gb: float = 0.0               # ... up to this many GB (oldest evicted first)
    notices: bool = True                # rank 0 prints the mix notices (False: a second loader of one run, val)


def dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class StepMaker:
    """Step i of the current segment -> Batch: reads, decodes, replaces bad samples, chooses captions."""

    def __init__(self, sampler: Sampler, cfg: LoaderConfig, patch_size: int):
        self.sampler, self.cfg = sampler, cfg
        self.p = patch_size
        self.tables: dict[str, SampleTable] = {}       # stream -> this rank's share for its current epoch
        self.groups: dict[str, dict[int, np.ndarray]] = {}   # stream -> bucket -> rows (fixed: {0: all})
        self.readers: dict[str, ShardReader] = {}
        self.tokens: dict[str, int] = {}               # stream -> which table it holds (pool.py)
        self.snap, self.plan = Snapshot(), np.zeros((0, 5), np.int64)
        self.names = sorted(sampler.weights)
        self.captions = CaptionChooser(cfg.caption_mix, cfg.seed)
        self.pad_id = resolve_pad_id(cfg.tokenizer, cfg.pad_id) if cfg.tokenizer is not None else None
        self._decoder = None

    def set_table(self, stream: str, table: SampleTable, token: int | None = None) -> int:
        self.tables[stream] = table
        self.tokens[stream] = next(_TOKENS) if token is None else token
        self.groups[stream] = table.members if self.cfg.native_res else {0: table.order}
        cfg = self.cfg
        if stream in self.readers:
            self.readers[stream].close()
        self.readers[stream] = ShardReader(table.shards, inflight=cfg.read_inflight, retries=cfg.read_retries,
                                           cache_dir=cfg.cache_dir, cache_bytes=int(cfg.cache_gb * 1e9))
        return self.tokens[stream]

    def spec(self, i: int) -> StepSpec:
        if not 0 <= i < len(self.plan):
            raise IndexError(f"step {i} outside segment {self.snap.segment} ({len(self.plan)} steps)")
        area, si, bucket, start, b = (int(v) for v in self.plan[i])
        s = self.names[si]
        epoch = self.snap.epochs.get(s, 0)
        order = self.sampler.order(s, epoch, bucket, self.groups[s][bucket])
        # start + b > len(order) only where the whole bucket is smaller than one batch: it cycles (plan())
        rows = order[start:start + b] if start + b <= len(order) else order[(start + np.arange(b)) % len(order)]
        return StepSpec(epoch, self.snap.t + i, area, bucket if self.cfg.native_res else -1,
                        self.sampler.grid_of(area, bucket), rows, s)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_decoder"] = None      # built lazily in the process that uses it
        return state

    @property
    def decoder(self):
        if self._decoder is None:
            self._decoder = decoder_spec(self.cfg.decoder).build(self)
        return self._decoder

    def crop(self, spec: StepSpec, row: int) -> Crop:
        t, cfg = self.tables[spec.source], self.cfg
        w, h = int(t.width[row]), int(t.height[row])
        uid = t.uid(row)
        if cfg.native_res:
            gh, gw = spec.grid
            flip = cfg.native_hflip > 0 and unit(cfg.seed, spec.source_epoch, uid, CROP) < cfg.native_hflip
            return cover(w, h, gw * self.p, gh * self.p, flip)
        return random_resized_crop(w, h, cfg.resolution, rng(cfg.seed, spec.source_epoch, uid, CROP),
                                   cfg.scale, cfg.ratio, cfg.hflip)

    def _decode(self, spec: StepSpec, rows: list[int]) -> tuple[torch.Tensor, dict[int, str], list[Crop]]:
        table = self.tables[spec.source]
        datas, crops, failed = [], [], {}
        t = table
        # one call for the whole batch: reads from object storage are all in flight together; the key lets the
        # reader check each member's tar header (a tar replaced since the build raises TarChangedError)
        got = self.readers[spec.source].read_many([(int(t.shard_idx[r]), int(t.offset[r]), int(t.size[r]), t.key(r))
                                                   for r in rows])
        for i, r in enumerate(rows):
            if isinstance(got[i], BaseException):
                failed[i] = f"{UNREACHABLE if getattr(got[i], 'unreachable', False) else 'read: '}{got[i]}"
                datas.append(b"")
            else:
                datas.append(got[i])
            crops.append(self.crop(spec, r))
        orient = None if table.orientation is None else [int(table.orientation[r]) for r in rows]
        ok = [i for i in range(len(rows)) if i not in failed]
        if len(ok) == len(rows):
            return (*self.decoder.decode_batch(datas, crops, orient), crops)
        w, h = crops[0].out
        images = empty_images(len(rows), h, w)
        if ok:
            sub, bad = self.decoder.decode_batch([datas[i] for i in ok], [crops[i] for i in ok],
                                                 None if orient is None else [orient[i] for i in ok])
            images = images.to(sub.device)
            images[ok] = sub
            failed.update({ok[j]: reason for j, reason in bad.items()})
        return images, failed, crops

    def make(self, i: int) -> Batch:
        spec = self.spec(i)
        table = self.tables[spec.source]
        epoch, step = spec.source_epoch, spec.global_step
        rows = [int(r) for r in spec.rows]
        images, failed, crops = self._decode(spec, rows)
        replaced = []
        attempt = 0
        while failed:
            attempt += 1
            if attempt > self.cfg.max_replacements:
                keys = [table.key(rows[i]) for i in failed]
                if all(replaced_kind(why) == "unreachable" for why in failed.values()):
                    raise RuntimeError(f"step {step}: the store did not answer for {len(failed)} samples after "
                                       f"{self.cfg.max_replacements} replacements each ({next(iter(failed.values()))}"
                                       "); check the store's endpoint and the network, then resume")
                raise RuntimeError(f"step {step}: {len(failed)} samples still fail to decode after "
                                   f"{self.cfg.max_replacements} replacements each (last: {keys[:3]}: "
                                   f"{next(iter(failed.values()))}); the bucket looks corrupt: rebuild the "
                                   "manifest (`aimv2 shard`) or check the shards")
            slots = sorted(failed)
            members = self.groups[spec.source][spec.bucket if self.cfg.native_res else 0]
            for i in slots:
                replaced.append((table.key(rows[i]), failed[i]))
                rows[i] = self.sampler.replacement(spec, members, i, attempt)
            sub, bad, new_crops = self._decode(spec, [rows[i] for i in slots])
            images[slots] = sub.to(images.device)
            for j, i in enumerate(slots):
                crops[i] = new_crops[j]
            failed = {slots[j]: reason for j, reason in bad.items()}

        texts, sources, keys, kinds = [], [], [], []
        for r in rows:
            t = table.texts(r)
            syn = {c: t[c] for c in table.syn_columns}
            text, kind = self.captions.choose(epoch, table.uid(r), t.get("source"), t.get("caption"), syn)
            texts.append(text)
            kinds.append(kind)
            sources.append(t.get("source") or "")
            keys.append(t["key"])
        tokens = None
        if self.cfg.tokenizer is not None:
            tokens = tokenize(texts, self.cfg.tokenizer, self.pad_id, self.cfg.context)
        padding = float(np.mean([c.padding() for c in crops]))
        return Batch(images=images, grid=tuple(spec.grid), patch_size=self.p, captions=texts, keys=keys,
                     sources=sources, tokens=tokens, source_epoch=epoch, global_step=step, area=spec.area,
                     replaced=replaced, padding=padding, caption_sets=kinds)


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


def _offset_of(state: dict) -> int:
    """The saved step within the segment: "offset" since the renames of issue 23, "step" before."""
    return int(state["offset"] if "offset" in state else state["step"])


def _share_of(table: SampleTable) -> dict:
    """What a share holds, for the state and the read log: its chunks, rows, and spans where it has
    parts of chunks (a source with fewer chunks than ranks)."""
    out = {"chunks": table.chunks.tolist(), "rows": table.n}
    sp = table.spans
    if len(sp) != len(table.chunks) or (sp[:, 1] != 0).any() or (sp[:, 2] != table.manifest.chunk_rows[sp[:, 0]]).any():
        out["spans"] = table.spans.tolist()
    return out


class Loader:
    def __init__(self, manifest, **kwargs):
        cfg = kwargs.pop("config", None) or LoaderConfig()
        unknown = [k for k in kwargs if not hasattr(cfg, k)]
        if unknown:
            raise TypeError(f"Loader: unknown options {unknown}; see LoaderConfig")
        cfg = dataclasses.replace(cfg, **kwargs)
        decoder_spec(cfg.decoder)   # an unknown name fails here, not in the first step
        self.cfg = cfg
        self.rank, self.world_size = dist_info(cfg.rank, cfg.world_size)
        self.manifest = m = manifest if isinstance(manifest, Manifest) else Manifest(manifest)
        self.weights, notes = resolve_mix(cfg.mix, m.sources)
        if notes and self.rank == 0 and cfg.notices:
            print("aimv2 loader: " + "; ".join(notes), file=sys.stderr)
        p = m.patch_size
        if cfg.native_res:
            self.sampler = Sampler(self.weights, native=True, batch_patches=cfg.batch_patches,
                                   grids={b: bk.grids for b, bk in m.buckets.items()}, batch_rule=cfg.batch_rule,
                                   seed=cfg.seed, rank=self.rank, world_size=self.world_size)
        else:
            if cfg.resolution % p:
                raise ValueError(f"--resolution {cfg.resolution} is not a multiple of the patch size {p}")
            _ = m.buckets   # the bucket table is part of the contract in both modes (read, checked)
            self.sampler = Sampler(self.weights, native=False, fixed_grid=(cfg.resolution // p,) * 2,
                                   batch_size=cfg.batch_size, seed=cfg.seed, rank=self.rank,
                                   world_size=self.world_size)
        self._chunks = {s: (np.arange(len(m.chunk_rows)) if s == ALL else m.chunks_of(s)) for s in self.weights}
        self._keys = np.array([m.chunk_key(i) for i in range(len(m.chunk_rows))], dtype=np.int64)
        self.maker = StepMaker(self.sampler, cfg, p)
        syn_columns = sorted({c for cols in m.columns for c in cols if c.startswith("syn_")})
        caption_notes = check_caption_mix(self.maker.captions, m.sources, syn_columns)
        if caption_notes and self.rank == 0 and cfg.notices:
            print("aimv2 loader: " + "; ".join(caption_notes), file=sys.stderr)
        self._warned_small = False
        self._ahead = None                # the live decode-ahead generator (dali)
        self._next = None                 # the next segment's share, being read in a thread (prefetch.Background)
        self._pool = StepPool(self.maker, m, workers=cfg.workers, prefetch_factor=cfg.prefetch_factor,
                              pin_memory=cfg.pin_memory, worker_init_fn=_worker_init,
                              persistent=cfg.persistent_workers) if not decoder_spec(cfg.decoder).in_process(cfg.workers) \
            else None   # worker processes (decoders.py): the same test as _batches'

        self.stats = {"batches": 0, "images": 0, "patches": 0, "replaced": 0, "replaced_unreachable": 0,
                      "replaced_damaged": 0, "replaced_keys": [], "sources": {}, "rows_read": 0, "reads": [],
                      "captions": {}}
        self._start(Snapshot(epochs={s: 0 for s in self.weights}), 0)

    # ---------------------------------------------------------------------------------- shares, segments
    def _name(self, stream: str) -> str:
        return "all" if stream == ALL else self.manifest.sources.get(stream, stream)

    def share(self, stream: str, epoch: int) -> np.ndarray:
        """This rank's share of `stream` in `epoch` as spans (chunk id, start, stop): whole chunks, or row
        ranges of them where the stream has fewer chunks than ranks (shares.py; every rank deals alike)."""
        ch = self._chunks[stream]
        spans = deal_spans(self._keys[ch], self.manifest.chunk_rows[ch], self.cfg.seed, self.sampler.ids[stream],
                           epoch, self.world_size)[self.rank]
        spans[:, 0] = ch[spans[:, 0]]
        return spans

    def _load(self, stream: str, epoch: int, have: np.ndarray | None):
        """(spans, table, packed) of this rank's share of `stream` in `epoch`; no table where the spans are
        `have`, the share held already (one rank, or a deal that repeats). Also run by the read-ahead thread."""
        spans = self.share(stream, epoch)
        if have is not None and np.array_equal(have, spans):
            return spans, None, None
        table = SampleTable(self.manifest, spans, None if stream == ALL else stream)
        return (spans, *self._pool.share(table)) if self._pool is not None else (spans, table, None)

    def _read_share(self, stream: str) -> None:
        epoch = self.maker.snap.epochs.get(stream, 0)
        old = self.maker.tables.get(stream)
        have = None if old is None else old.spans
        ahead = self._next if self._next is not None and self._next.key == (stream, epoch) else None
        if ahead is not None:
            self._next = None
            spans, table, packed = ahead.result()
            if table is None and not (have is not None and np.array_equal(have, spans)):
                ahead = None                        # "the same share" as one held before a rewind: read it
        if ahead is None:
            spans, table, packed = self._load(stream, epoch, have)
        if table is None:
            return
        if self._pool is not None:
            self._pool.remember(self.maker.set_table(stream, table), packed)
        else:
            self.maker.set_table(stream, table)
        self.stats["rows_read"] += table.n
        self.stats["reads"] = (self.stats["reads"] + [{"source": self._name(stream), "epoch": epoch,
                                                         "ahead": ahead is not None, **_share_of(table)}])[-64:]

    def _read_ahead(self) -> None:
        """Start reading the share the next segment needs (its rolling stream's next epoch) while this one
        trains. Not before the workers exist: they fork, and a fork should not copy a read in progress."""
        if not self.cfg.read_ahead or (self._pool is not None and self._pool.persistent and not self._pool.started):
            return
        key = (self._roll, self.maker.snap.epochs.get(self._roll, 0) + 1)
        if self._next is None or self._next.key != key:
            have = self.maker.tables[self._roll].spans
            self._next = Background(key, lambda: self._load(*key, have))

    def _start(self, snap: Snapshot, offset: int, reread=None) -> None:
        """Make `snap` the current segment (reading the shares that changed) and plan it."""
        old = self.maker.snap.epochs
        self.maker.snap = snap
        for s in self.weights:
            if s not in self.maker.tables or (reread is None and old.get(s) != snap.epochs.get(s)) or \
                    (reread is not None and s in reread):
                self._read_share(s)
        counts = {s: {b: len(r) for b, r in self.maker.groups[s].items()} for s in self.weights}
        plan, roll = self.sampler.plan(snap, counts)
        small = [s for s in self.weights if self.maker.tables[s].n and
                 max(len(r) for r in self.maker.groups[s].values()) < self.sampler.max_batch]
        if small and self.rank == 0 and not self._warned_small:
            self._warned_small = True
            print(f"aimv2 loader: rank {self.rank}'s share of {', '.join(self._name(s) for s in small)} has fewer "
                  f"rows in every aspect bucket than the largest batch ({self.sampler.max_batch}); such batches "
                  "repeat rows (a tiny manifest: add data or lower --batch-patches / --batch-size)", file=sys.stderr)
        if len(plan) == 0:
            t = self.maker.tables[roll]
            area = self.sampler.area(snap.t)
            biggest = max((len(r) for r in self.maker.groups[roll].values()), default=0)
            raise ValueError(f"{self.manifest.root}: rank {self.rank}'s share of source {self._name(roll)!r} "
                             f"({t.n} rows, at most {biggest} in one aspect bucket) cannot fill one batch of "
                             f"{self.sampler.nominal(area)} images at area {area}; "
                             "lower --batch-patches / --batch-size, use fewer ranks, or leave the source out of --mix")
        self.maker.plan, self._roll, self._offset = plan, roll, offset
        self._read_ahead()

    def _next_segment(self) -> None:
        self._start(self.sampler.advance(self.maker.snap, self.maker.plan, len(self.maker.plan), self._roll), 0)

    @property
    def segment(self) -> int:
        """The current segment (one per `iter()`; no source stream changes epoch within one)."""
        return self.maker.snap.segment

    @property
    def offset(self) -> int:
        """The next step within the current segment (its global step: the segment's first step + offset)."""
        return self._offset

    @property
    def table(self) -> SampleTable:
        return next(iter(self.maker.tables.values()))

    @property
    def patch_size(self) -> int:
        return self.manifest.patch_size

    @property
    def budget(self) -> int:
        """C: patches per rank per step."""
        return self.sampler.c

    def __len__(self) -> int:
        """Steps in the current segment."""
        return len(self.maker.plan)

    def _batches(self, start: int, stop: int):
        cfg, spec = self.cfg, decoder_spec(self.cfg.decoder)
        if spec.in_process(cfg.workers):
            steps = (self.maker.make(s) for s in range(start, stop))
            if spec.parallelism == THREADS and cfg.dali_ahead:   # issue 15: decode overlapped with compute
                from .prefetch import ahead

                if self._ahead is not None:   # one decoding thread per loader: stop an abandoned one
                    self._ahead.close()
                steps = self._ahead = ahead(steps, max(1, cfg.prefetch_factor))
            yield from steps
            return
        batches = self._pool.batches(start, stop)
        self._read_ahead()
        try:
            yield from batches
        except Exception as e:
            self._pool.close()   # a worker's error breaks the DataLoader: its workers must not outlive it
            if isinstance(e, TarChangedError):   # torch re-raises it with the worker's traceback in the message
                raise TarChangedError(str(e).strip().splitlines()[-1].split("TarChangedError: ", 1)[-1]) from None
            raise

    def __iter__(self):
        start, stop = self._offset, len(self.maker.plan)
        t0 = self.maker.snap.t
        expect = t0 + start
        for batch in self._batches(start, stop):
            if batch.global_step != expect:   # the order contract with the DataLoader's round-robin
                raise RuntimeError(f"loader produced step {batch.global_step}, expected {expect}")
            expect += 1
            self._offset = batch.global_step - t0 + 1
            self._count(batch)
            yield batch
        if self._offset >= stop:
            self._next_segment()

    def worker_pids(self) -> list[int]:
        """The pid of each decoding worker process (none before the first batch, or without workers)."""
        return self._pool.pids() if self._pool is not None else []

    def close(self) -> None:
        """Stop the worker processes and the decode-ahead thread. A loader that is not closed stops them when
        it is collected or the process exits (torch's workers are daemonic and watch their parent)."""
        if self._pool is not None:
            self._pool.close()
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
        self._next = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count(self, batch: Batch) -> None:
        s = self.stats
        s["batches"] += 1
        s["images"] += len(batch)
        s["patches"] += len(batch) * batch.grid[0] * batch.grid[1]
        s["replaced"] += len(batch.replaced)
        for kind, n in batch.replaced_counts().items():
            s[f"replaced_{kind}"] += n
        s["replaced_keys"] = (s["replaced_keys"] + [list(r) for r in batch.replaced])[-100:]
        for src in batch.sources:
            s["sources"][src] = s["sources"].get(src, 0) + 1
        for src, kind in zip(batch.sources, batch.caption_sets):   # source -> caption set -> captions drawn
            per = s["captions"].setdefault(src, {})
            per[kind] = per.get(kind, 0) + 1

    def source_epochs(self) -> dict[str, int]:
        """Source name -> the epoch its stream is in."""
        return {self._name(k): v for k, v in self.maker.snap.epochs.items()}

    def share_info(self) -> dict:
        """Per source: this rank's current epoch, chunks (ids into the manifest's row groups) and rows."""
        return {self._name(s): {"epoch": self.maker.snap.epochs.get(s, 0), **_share_of(t)}
                for s, t in self.maker.tables.items()}

    # ------------------------------------------------------------------------------------------ state
    def _served_now(self) -> dict:
        return self.sampler.advance(self.maker.snap, self.maker.plan, self._offset, None).served

    def state_dict(self) -> dict:
        cfg = self.cfg
        return {"version": STATE_VERSION, "segment": self.segment, "offset": self._offset,
                "t": self.maker.snap.t + self._offset, "served": self._served_now(),
                "snapshot": self.maker.snap.to_dict(), "mix": dict(self.weights),
                "seed": cfg.seed, "native_res": cfg.native_res,
                "batch_patches": cfg.batch_patches, "batch_rule": cfg.batch_rule, "resolution": cfg.resolution,
                "batch_size": cfg.batch_size,
                "rank": self.rank, "world_size": self.world_size, "manifest": self.manifest.fingerprint,
                "source_epochs": self.source_epochs(), "share": self.share_info(),
                "stats": {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                          for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. Same world size: exactly (pixel for pixel). Another world size: every
        source stream starts its next epoch at the saved global step (the rest of each current epoch is
        skipped; nothing repeats within an epoch; areas and the source sequence continue unchanged)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version', 1)} was saved by an older loader "
                             f"(this one reads version {STATE_VERSION}: per-rank shares and source streams); it "
                             "cannot be continued exactly: finish the run with the aimv2 version that wrote it, "
                             "or start a new run from its weights (--init)")
        cfg = self.cfg
        mine = {"seed": cfg.seed, "native_res": cfg.native_res, "manifest": self.manifest.fingerprint,
                "mix": {k: round(v, 12) for k, v in self.weights.items()}}
        mine.update({"batch_patches": cfg.batch_patches, "batch_rule": cfg.batch_rule} if cfg.native_res else
                    {"resolution": cfg.resolution, "batch_size": cfg.batch_size})
        if int(state["world_size"]) != self.world_size:  # each source starts its next epoch: the per-rank batch
            for k in ("batch_patches", "batch_size"):      # may change with the ranks (--keep-global-batch)
                mine.pop(k, None)
        saved = dict(state, mix={k: round(float(v), 12) for k, v in state.get("mix", {}).items()})
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise ValueError("loader state does not match this loader (saved, now): "
                             + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
                             + "; resume with the same manifest, seed, mix and batch settings")
        snap = Snapshot.from_dict(state["snapshot"])
        if int(state["world_size"]) == self.world_size:
            if int(state["rank"]) != self.rank:
                raise ValueError(f"loader state of rank {state['rank']} given to rank {self.rank}: each rank "
                                 "resumes its own state at the same world size")
            self._start(snap, _offset_of(state), reread=set(self.weights))
        else:
            nxt = Snapshot(snap.segment + 1, int(state["t"]), {k: int(v) for k, v in state["served"].items()},
                           {s: e + 1 for s, e in snap.epochs.items()}, {})
            if self.rank == 0:
                print(f"aimv2 loader: state saved at world size {state['world_size']}, resuming at "
                      f"{self.world_size}: every source starts its next epoch ("
                      + ", ".join(f"{self._name(s)} {e} -> {e + 1}" for s, e in sorted(snap.epochs.items()))
                      + "); the rest of each current epoch is skipped, nothing repeats within an epoch",
                      file=sys.stderr)
            self._start(nxt, 0, reread=set(self.weights))
        if "stats" in state:
            st = state["stats"]
            self.stats = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                          for k, v in st.items()}
            self.stats.setdefault("sources", {})
            self.stats["rows_read"] = self.stats.get("rows_read", 0)
            self.stats.setdefault("reads", [])
            self.stats["captions"] = {src: dict(v) for src, v in self.stats.get("captions", {}).items()}
