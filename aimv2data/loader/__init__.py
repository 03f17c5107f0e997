"""The batch loader: manifest -> sampler (what) -> reader (bytes by offset) -> decoder (how) -> Batch.

The names below are imported on first use (PEP 562), so the decoders and the crop geometry
(`aimv2data.loader.decode_pil`, `.decode_dali`, `.geometry`) can be imported without polars, which
only the manifest side needs (`aimv2 bench gpu` runs them on machines without it)."""
from importlib import import_module

_LAZY = {"Loader": ".loader", "LoaderConfig": ".loader", "ManifestError": ".samples", "SampleTable": ".samples"}

__all__ = ["Loader", "LoaderConfig", "ManifestError", "SampleTable"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
