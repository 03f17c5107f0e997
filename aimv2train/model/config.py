"""Model sizes as data.

Encoder widths and depths are quoted from the paper's Table 1 ("AIMv2 family of models"); the head
count follows Apple's released checkpoints (head dim 128 for every size, e.g. L = 1024 / 8 heads,
the `num_attention_heads` default of transformers' `Aimv2VisionConfig`). The multimodal decoder is
12 blocks x 1024 for every encoder size (Table 1: d_dec, L_dec). The loss weight alpha = 0.4 is
Table 9c ("criteria weights").
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from aimv2data.paper import PATCH_SIZE, TEXT_LEN


# the encoder's prefix-attention kernels (masks.resolve_attention): FlexAttention, dense-mask SDPA, or flex on CUDA
ATTENTION_KINDS = ("auto", "flex", "sdpa")


def swiglu_hidden(dim: int, multiple_of: int = 256) -> int:
    """SwiGLU hidden width: int(2/3 * 4 * dim) rounded up to a multiple of 256.

    This reproduces the released widths: B 768 -> 2048, L 1024 -> 2816, H 1536 -> 4096,
    1B 2048 -> 5632, 3B 3072 -> 8192.
    """
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass
class EncoderConfig:
    dim: int = 1024
    depth: int = 24
    heads: int = 8
    patch_size: int = PATCH_SIZE
    img_size: int = 224  # the grid the learned position table is built for (img_size // patch_size)^2
    pos_embed: str = "learned"  # "learned" (fixed resolution) | "sincos" (native resolution)
    mlp_hidden: int = 0  # 0: swiglu_hidden(dim)
    eps: float = 1e-5  # RMSNorm eps of the released models
    in_chans: int = 3

    def __post_init__(self):
        if self.mlp_hidden == 0:
            self.mlp_hidden = swiglu_hidden(self.dim)
        if self.pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.pos_embed == "sincos" and self.dim % 4:
            raise ValueError(f"2D sin-cos position embedding needs dim % 4 == 0, got dim {self.dim}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid(self) -> tuple[int, int]:
        g = self.img_size // self.patch_size
        return (g, g)


@dataclass
class DecoderConfig:
    dim: int = 1024
    depth: int = 12
    heads: int = 8
    vocab_size: int = 32000  # SigLIP's sentencepiece vocabulary (paper appendix B); pass the tokenizer's
    max_text_len: int = TEXT_LEN  # captions are truncated to 77 tokens (aimv2data/paper.py)
    mlp_hidden: int = 0
    eps: float = 1e-5

    def __post_init__(self):
        if self.mlp_hidden == 0:
            self.mlp_hidden = swiglu_hidden(self.dim)
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    alpha: float = 0.4  # L = L_text + alpha * L_img (Table 9c)
    norm_pix_eps: float = 1e-6  # per-patch target normalisation (MAE norm_pix_loss)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(
            encoder=EncoderConfig(**d["encoder"]),
            decoder=DecoderConfig(**d.get("decoder", {})),
            alpha=d.get("alpha", 0.4),
            norm_pix_eps=d.get("norm_pix_eps", 1e-6),
        )


# Table 1: d_enc, L_enc; #params as printed (the paper truncates to one decimal: H is 0.68B -> "0.6B").
ENCODER_PRESETS: dict[str, EncoderConfig] = {
    "tiny": EncoderConfig(dim=64, depth=2, heads=2),  # tests only; head dim 32
    "B": EncoderConfig(dim=768, depth=12, heads=6),  # released aimv2-base (not in Table 1)
    "L": EncoderConfig(dim=1024, depth=24, heads=8),
    "H": EncoderConfig(dim=1536, depth=24, heads=12),
    "1B": EncoderConfig(dim=2048, depth=24, heads=16),
    "3B": EncoderConfig(dim=3072, depth=24, heads=24),
}
PAPER_ENCODER_PARAMS_B = {"L": 0.3, "H": 0.6, "1B": 1.2, "3B": 2.7}  # Table 1, billions
DECODER_PRESETS: dict[str, DecoderConfig] = {
    "tiny": DecoderConfig(dim=64, depth=2, heads=2, vocab_size=512),
    "paper": DecoderConfig(),  # 12 x 1024 for every encoder size (Table 1)
}
_ALIASES = {"tiny": "tiny", "b": "B", "base": "B", "l": "L", "large": "L", "h": "H", "huge": "H",
            "1b": "1B", "3b": "3B"}


def preset_name(name: str) -> str:
    key = _ALIASES.get(name.lower())
    if key is None:
        raise ValueError(f"unknown model size {name!r}; choose one of {list(ENCODER_PRESETS)}")
    return key


def model_config(size: str, *, vocab_size: int | None = None, pos_embed: str = "learned",
                 img_size: int = 224, **encoder_overrides) -> ModelConfig:
    """The AIMv2 model for a size name ("tiny", "B", "L", "H", "1B", "3B"; aliases base/large/huge).

    `pos_embed="sincos"` gives the native-resolution variant. The tiny size gets a tiny decoder too.
    """
    key = preset_name(size)
    if "dim" in encoder_overrides:
        encoder_overrides.setdefault("mlp_hidden", 0)  # recompute the SwiGLU width for the new dim
    enc = replace(ENCODER_PRESETS[key], pos_embed=pos_embed, img_size=img_size, **encoder_overrides)
    dec = DECODER_PRESETS["tiny" if key == "tiny" else "paper"]
    dec = replace(dec, vocab_size=vocab_size) if vocab_size is not None else replace(dec)
    return ModelConfig(encoder=enc, decoder=dec)
