"""The network: prefix-attention ViT encoder, causal multimodal decoder, pixel + text objective, FLOPs,
inference preprocessing and weight interop (transformers `Aimv2VisionModel`, apple/ml-aim). The face is
lazy (PEP 562), so a light module such as `aimv2train.model.config` imports without torch."""
import importlib

_FACE = {"AIMv2": ".aimv2", "count_params": ".aimv2", "DecoderConfig": ".config", "EncoderConfig": ".config",
         "ModelConfig": ".config", "model_config": ".config", "preset_name": ".config", "Encoder": ".encoder",
         "load_encoder": ".interop", "save_aim": ".interop", "save_encoder": ".interop", "save_hf": ".interop",
         "MultimodalDecoder": ".mm_decoder"}

__all__ = sorted(_FACE)


def __getattr__(name):
    if name in _FACE:
        return getattr(importlib.import_module(_FACE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
