"""What is done with trained weights: embeddings, the frozen-trunk probe (Table A2) and export."""
from .embed import embed_images, write_embeddings
from .export import ExportError, export
from .probe import ProbeConfig, ProbeJob, run_probe, write_results
from .weights import WeightsError, load_weights

__all__ = ["ExportError", "ProbeConfig", "ProbeJob", "WeightsError", "embed_images", "export", "load_weights",
           "run_probe", "write_embeddings", "write_results"]
