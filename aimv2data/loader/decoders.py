"""The loader's image decoders: one entry each in `DECODERS`, the one place their names are spelled. The
loader builds a decoder from its entry; `aimv2 train --image-decoder`, `aimv2 bench loader --image-decoder`
and `aimv2 preview --image-decoder` take their choices and help from here. Adding a decoder is one entry (and
its module, `decode_<name>.py`: a class with `name`, `decode_batch` and `close`, as `decode_pil.py`).

Each decoder owns its parallelism, so `workers` means what its decoder says: `pil` decodes in torch
DataLoader worker processes (each makes whole steps; 0 = in the loader's process), `dali` in DALI's own
threads inside the loader's process, which holds the GPU there (0 = 1 thread). Kept free of torch: the
train config, hence `aimv2 --help`, imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

PROCESSES = "processes"   # `workers` DataLoader processes, each making whole steps; 0: the loader's process
THREADS = "threads"       # `workers` threads of the decoder itself, in the loader's process


@dataclass(frozen=True)
class DecoderSpec:
    help: str                  # what it is, one line for --help
    parallelism: str           # PROCESSES or THREADS
    min_workers: int           # `workers` below this is raised to it (processes: 0 = in-process)
    gpu: bool                  # decodes on this rank's GPU where there is one (LoaderConfig.dali_device)
    build: Callable            # (StepMaker) -> the decoder, for the maker's config, tables and sampler

    def workers(self, asked: int) -> int:
        """The processes or threads this decoder runs with when `asked` for that many."""
        return max(self.min_workers, asked)

    def in_process(self, workers: int) -> bool:
        """Whether steps are made in the loader's own process (no DataLoader worker processes)."""
        return self.parallelism == THREADS or self.workers(workers) == 0


def _pil(maker):
    from .decode_pil import PilDecoder

    return PilDecoder(draft=maker.cfg.draft, reducing_gap=maker.cfg.reducing_gap)


def _dali(maker):
    from .decode_dali import DaliDecoder

    tables = [t for t in maker.tables.values() if t.n]    # buffers sized for the largest batch
    biggest = (max(int(t.width.max()) for t in tables), max(int(t.height.max()) for t in tables)) if tables else None
    return DaliDecoder(maker.sampler.max_batch, num_threads=DECODERS["dali"].workers(maker.cfg.workers),
                       device_id=maker.cfg.dali_device, max_output_pixels=maker.sampler.c * maker.p ** 2,
                       max_source=biggest)


DECODERS: dict[str, DecoderSpec] = {
    "pil": DecoderSpec("Pillow(-SIMD), each JPEG's crop window at a reduced scale", PROCESSES, 0, False, _pil),
    "dali": DecoderSpec("an NVIDIA DALI pipeline (nvJPEG on the GPU if there is one, else DALI's CPU decoder)",
                        THREADS, 1, True, _dali),
}


def decoder_spec(name: str) -> DecoderSpec:
    try:
        return DECODERS[name]
    except KeyError:
        raise ValueError(f"unknown decoder {name!r}: use {' or '.join(DECODERS)}") from None


def decoders_help() -> str:
    """'pil: ...; dali: ...' for an --image-decoder option."""
    return "; ".join(f"{name}: {spec.help}" for name, spec in DECODERS.items()) + "."


def workers_help() -> str:
    """What --workers means for each decoder."""
    zero = {PROCESSES: "0 = decode in this process", THREADS: "in this process"}
    return "; ".join(f"{name}: {spec.parallelism} ({zero[spec.parallelism]}" +
                     (f", at least {spec.min_workers})" if spec.min_workers else ")")
                     for name, spec in DECODERS.items()) + "."
