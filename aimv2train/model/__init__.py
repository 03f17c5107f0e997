"""The network: prefix-attention ViT encoder, causal multimodal decoder, pixel + text objective, FLOPs,
inference preprocessing and weight interop (transformers `Aimv2VisionModel`, apple/ml-aim)."""
from .aimv2 import AIMv2, count_params
from .config import DecoderConfig, EncoderConfig, ModelConfig, model_config, preset_name
from .encoder import Encoder
from .interop import load_encoder, save_aim, save_encoder, save_hf
from .mm_decoder import MultimodalDecoder

__all__ = ["AIMv2", "DecoderConfig", "Encoder", "EncoderConfig", "ModelConfig", "MultimodalDecoder",
           "count_params", "load_encoder", "model_config", "preset_name", "save_aim", "save_encoder", "save_hf"]
