"""What is done with trained weights: embeddings, the frozen-trunk probe (Table A2) and export."""
from .embed import embed_images, write_embeddings
from .export import ExportError, export
from .probe import ProbeConfig, ProbeJob, run_probe, write_results

__all__ = ["ExportError", "ProbeConfig", "ProbeJob", "embed_images", "export", "run_probe",
           "write_embeddings", "write_results"]
