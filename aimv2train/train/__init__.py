"""The training loop and what it needs: tokenizer, optimizer, schedule, presets, checkpoints,
distributed set-up, metrics and plots."""
from .tokenizer import Tokenizer, train_tokenizer
from .trainer import NonFiniteLoss, TrainConfig, TrainError, train

__all__ = ["NonFiniteLoss", "Tokenizer", "TrainConfig", "TrainError", "train", "train_tokenizer"]
