"""The batch loader: manifest -> sampler (what) -> reader (bytes by offset) -> decoder (how) -> Batch."""
from .loader import Loader, LoaderConfig
from .samples import ManifestError, SampleTable

__all__ = ["Loader", "LoaderConfig", "ManifestError", "SampleTable"]
