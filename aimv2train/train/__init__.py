"""The training loop and what it needs: tokenizer, optimizer, schedule, presets, checkpoints,
distributed set-up, metrics and plots. The face is lazy (PEP 562), so importing a light module such
as `aimv2train.train.config` (the CLI does, for `aimv2 train --help`) does not import torch."""
import importlib

_FACE = {"Tokenizer": ".tokenizer", "train_tokenizer": ".tokenizer", "TrainConfig": ".config",
         "NonFiniteLoss": ".trainer", "TrainError": ".trainer", "train": ".trainer"}

__all__ = sorted(_FACE)


def __getattr__(name):
    if name in _FACE:
        return getattr(importlib.import_module(_FACE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
