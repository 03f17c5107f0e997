"""Weights in and out of our Encoder: transformers `Aimv2VisionModel` folders, ml-aim state dicts and
our own checkpoints.

Our encoder keys and their counterparts (i = block index):

    ours                      transformers Aimv2VisionModel              ml-aim AIMv2VisionEncoder
    patch_embed.proj.*        embeddings.patch_embed.*                   preprocessor.patchifier.proj.*
    patch_embed.norm.weight   embeddings.rms_norm.weight                 preprocessor.patchifier.norm.weight
    pos_embed (1, N, D)       embeddings.position_embedding.weight (N,D) preprocessor.pos_embed (1, N, D)
    blocks.i.norm1.weight     encoder.layers.i.rms_norm1.weight          trunk.blocks.i.norm_1.weight
    blocks.i.attn.qkv.weight  encoder.layers.i.attention.{q,k,v}_proj    trunk.blocks.i.attn.qkv.weight
    blocks.i.attn.proj.weight encoder.layers.i.attention.out_proj.weight trunk.blocks.i.attn.proj.weight
    blocks.i.norm2.weight     encoder.layers.i.rms_norm2.weight          trunk.blocks.i.norm_2.weight
    blocks.i.mlp.fc1/fc3/fc2  encoder.layers.i.ffn.gate/up/down_proj     trunk.blocks.i.mlp.fc1/fc3/fc2
    norm.weight               rms_norm.weight                            trunk.post_trunk_norm.weight

Native-resolution models have no position table (2D sin-cos, transformers' `is_native`).

Our own checkpoint format (also what the trainer writes): a torch.save'd dict
    {"config": ModelConfig.to_dict() (at least {"encoder": {...}}), "model": state_dict, ...}
where the state dict holds either the full AIMv2 model (encoder.* keys are taken) or the encoder.
It must load with torch.load(weights_only=True): plain containers, numbers, strings and tensors.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aimv2data.atomic import atomic_write
from .config import EncoderConfig
from .encoder import Encoder

APPLE_HEAD_DIM = 128  # every released AIMv2 size; used when a bare state dict does not say

_SIMPLE = [  # (ours, transformers, ml-aim); {i} = block index; qkv is split/fused separately
    ("patch_embed.proj.weight", "embeddings.patch_embed.weight", "preprocessor.patchifier.proj.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embed.bias", "preprocessor.patchifier.proj.bias"),
    ("patch_embed.norm.weight", "embeddings.rms_norm.weight", "preprocessor.patchifier.norm.weight"),
    ("blocks.{i}.norm1.weight", "encoder.layers.{i}.rms_norm1.weight", "trunk.blocks.{i}.norm_1.weight"),
    ("blocks.{i}.attn.proj.weight", "encoder.layers.{i}.attention.out_proj.weight", "trunk.blocks.{i}.attn.proj.weight"),
    ("blocks.{i}.norm2.weight", "encoder.layers.{i}.rms_norm2.weight", "trunk.blocks.{i}.norm_2.weight"),
    ("blocks.{i}.mlp.fc1.weight", "encoder.layers.{i}.ffn.gate_proj.weight", "trunk.blocks.{i}.mlp.fc1.weight"),
    ("blocks.{i}.mlp.fc3.weight", "encoder.layers.{i}.ffn.up_proj.weight", "trunk.blocks.{i}.mlp.fc3.weight"),
    ("blocks.{i}.mlp.fc2.weight", "encoder.layers.{i}.ffn.down_proj.weight", "trunk.blocks.{i}.mlp.fc2.weight"),
    ("norm.weight", "rms_norm.weight", "trunk.post_trunk_norm.weight"),
]
_HF, _AIM = 1, 2


def _key_pairs(depth: int, style: int) -> list[tuple[str, str]]:
    pairs = []
    for row in _SIMPLE:
        if "{i}" in row[0]:
            pairs += [(row[0].format(i=i), row[style].format(i=i)) for i in range(depth)]
        else:
            pairs.append((row[0], row[style]))
    return pairs


# ---------------------------------------------------------------- state dict conversion (pure functions)

def to_hf_state_dict(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out = {theirs: sd[ours] for ours, theirs in _key_pairs(depth, _HF)}
    for i in range(depth):
        q, k, v = sd[f"blocks.{i}.attn.qkv.weight"].chunk(3, dim=0)
        for name, w in zip("qkv", (q, k, v)):
            out[f"encoder.layers.{i}.attention.{name}_proj.weight"] = w
    if "pos_embed" in sd:
        out["embeddings.position_embedding.weight"] = sd["pos_embed"][0]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out = {ours: sd[theirs] for ours, theirs in _key_pairs(depth, _HF)}
    for i in range(depth):
        p = f"encoder.layers.{i}.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([sd[p + "q_proj.weight"], sd[p + "k_proj.weight"],
                                                        sd[p + "v_proj.weight"]], dim=0)
    if "embeddings.position_embedding.weight" in sd:
        out["pos_embed"] = sd["embeddings.position_embedding.weight"][None]
    return out


def to_aim_state_dict(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out = {theirs: sd[ours] for ours, theirs in _key_pairs(depth, _AIM)}
    for i in range(depth):
        out[f"trunk.blocks.{i}.attn.qkv.weight"] = sd[f"blocks.{i}.attn.qkv.weight"]
    if "pos_embed" in sd:
        out["preprocessor.pos_embed"] = sd["pos_embed"]
    return {k: v.contiguous() for k, v in out.items()}


def from_aim_state_dict(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out = {ours: sd[theirs] for ours, theirs in _key_pairs(depth, _AIM)}
    for i in range(depth):
        out[f"blocks.{i}.attn.qkv.weight"] = sd[f"trunk.blocks.{i}.attn.qkv.weight"]
    if "preprocessor.pos_embed" in sd:
        out["pos_embed"] = sd["preprocessor.pos_embed"]
    return out


def _depth(sd: dict, pattern: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(ids) + 1 if ids else 0


def infer_encoder_config(sd: dict[str, torch.Tensor], heads: int | None = None) -> EncoderConfig:
    """EncoderConfig from the shapes of an encoder state dict in our key names. Weights do not store
    the head count: pass `heads`, else Apple's head dim 128 is assumed."""
    proj = sd["patch_embed.proj.weight"]
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    if heads is None:
        if dim % APPLE_HEAD_DIM:
            raise ValueError(f"cannot tell the number of attention heads of a {dim}-wide encoder from its "
                             f"weights; pass heads= (released AIMv2 models use head dim {APPLE_HEAD_DIM})")
        heads = dim // APPLE_HEAD_DIM
    img_size, pos = 224, "sincos"
    if "pos_embed" in sd:
        n = sd["pos_embed"].shape[1]
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"learned position table of {n} entries is not a square grid")
        img_size, pos = g * patch, "learned"
    return EncoderConfig(dim=dim, depth=_depth(sd, r"blocks\.(\d+)\."), heads=heads, patch_size=patch,
                         img_size=img_size, pos_embed=pos, mlp_hidden=sd["blocks.0.mlp.fc1.weight"].shape[0],
                         in_chans=in_chans)


# ---------------------------------------------------------------- loading

def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _build(cfg: EncoderConfig, sd: dict[str, torch.Tensor], dropped: list[str], source: str) -> Encoder:
    if dropped:
        warnings.warn(f"{source}: ignoring {len(dropped)} tensors that are not part of the encoder "
                      f"(e.g. {', '.join(sorted(dropped)[:3])})", stacklevel=3)
    with torch.device("meta"):
        enc = Encoder(cfg)
    try:
        enc.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: weights do not fit the encoder config {cfg}:\n{e}") from None
    return enc.float().eval()


def _hf_config_to_ours(c: dict) -> EncoderConfig:
    if c.get("qkv_bias") or c.get("mlp_bias"):
        raise ValueError("Aimv2 configs with qkv_bias/mlp_bias are not supported: the AIMv2 encoder is bias-free")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {c['hidden_act']!r}: AIMv2 uses SwiGLU (silu)")
    size, patch = c.get("image_size", 224), c.get("patch_size", 14)
    for name, v in (("image_size", size), ("patch_size", patch)):
        if isinstance(v, (list, tuple)) and len(set(v)) != 1:
            raise ValueError(f"non-square {name} {v} is not supported")
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return EncoderConfig(dim=c.get("hidden_size", 1024), depth=c.get("num_hidden_layers", 24),
                         heads=c.get("num_attention_heads", 8), patch_size=patch, img_size=size,
                         pos_embed="sincos" if c.get("is_native", False) else "learned",
                         mlp_hidden=c.get("intermediate_size", 2816), eps=c.get("rms_norm_eps", 1e-5),
                         in_chans=c.get("num_channels", 3))


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


def load_hf(folder: str | os.PathLike) -> Encoder:
    """A transformers Aimv2VisionModel folder (config.json + model.safetensors, possibly sharded)."""
    folder = Path(folder)
    cfg_json = json.loads((folder / "config.json").read_text())
    # Apple's original hub folders (trust_remote_code): model_type "aimv2" with the encoder's fields at the
    # top level and ml-aim key names (preprocessor.patchifier.*, trunk.blocks.*) in the safetensors.
    remote_code = cfg_json.get("model_type") == "aimv2" and "vision_config" not in cfg_json
    if cfg_json.get("model_type") == "aimv2" and not remote_code:  # a full Aimv2Model (LiT): its vision tower
        cfg_json, prefix = cfg_json["vision_config"], "vision_model."
    else:
        prefix = ""
    if not remote_code and cfg_json.get("model_type", "aimv2_vision_model") != "aimv2_vision_model":
        raise ValueError(f"{folder}/config.json: model_type {cfg_json.get('model_type')!r} is not an AIMv2 model")
    if cfg_json.get("use_bias"):
        raise ValueError(f"{folder}/config.json: use_bias=true is not supported: the AIMv2 encoder is bias-free")
    cfg = _hf_config_to_ours(cfg_json)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(load_file(str(folder / shard)))
    elif (folder / "model.safetensors").exists():
        sd = load_file(str(folder / "model.safetensors"))
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors(.index.json); save the model with "
                                f"safe_serialization=True (pytorch_model.bin is not read)")
    sd = _strip(sd, prefix) if prefix else sd
    if remote_code or "preprocessor.patchifier.proj.weight" in sd:
        return _from_state_dict(sd, dataclasses.asdict(cfg), None, str(folder))
    try:
        ours = from_hf_state_dict(sd, cfg.depth)
    except KeyError as e:
        raise ValueError(f"{folder}: tensor {e} is missing for the {cfg.depth}-layer model of config.json") from None
    used = {t for _, t in _key_pairs(cfg.depth, _HF)} | {"embeddings.position_embedding.weight"} | {
        f"encoder.layers.{i}.attention.{n}_proj.weight" for i in range(cfg.depth) for n in "qkv"}
    return _build(cfg, ours, [k for k in sd if k not in used], str(folder))


def _config_from_checkpoint(ckpt: dict) -> dict | None:
    for key in ("config", "model_config"):
        c = ckpt.get(key)
        if isinstance(c, dict):
            if isinstance(c.get("encoder"), dict):
                return c["encoder"]
            if isinstance(c.get("model"), dict) and isinstance(c["model"].get("encoder"), dict):
                return c["model"]["encoder"]
    return None


def _from_state_dict(sd: dict[str, torch.Tensor], enc_cfg: dict | None, heads: int | None,
                     source: str) -> Encoder:
    """Detect the key style of a state dict and build the encoder."""
    try:
        return _convert_and_build(sd, enc_cfg, heads, source)
    except KeyError as e:
        raise ValueError(f"{source}: tensor {e} is missing; the file is not a complete AIMv2 encoder") from None


def _convert_and_build(sd, enc_cfg, heads, source) -> Encoder:
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if all(k.startswith(prefix) for k in sd):
            sd = _strip(sd, prefix)
    sd = {k.replace("._orig_mod.", "."): v for k, v in sd.items()}
    keys = set(sd)
    if "encoder.patch_embed.proj.weight" in keys:  # our full AIMv2 model (trainer checkpoint)
        enc_sd, dropped = _strip(sd, "encoder."), []
    elif "patch_embed.proj.weight" in keys:  # our encoder
        enc_sd, dropped = sd, []
    else:
        for prefix in ("", "image_encoder.", "vision_model."):
            if prefix + "preprocessor.patchifier.proj.weight" in keys:  # ml-aim (plain or LiT)
                aim = _strip(sd, prefix)
                depth = _depth(aim, r"trunk\.blocks\.(\d+)\.")
                enc_sd = from_aim_state_dict(aim, depth)
                used = {t for _, t in _key_pairs(depth, _AIM)} | {"preprocessor.pos_embed"} | {
                    f"trunk.blocks.{i}.attn.qkv.weight" for i in range(depth)}
                dropped = [k for k in aim if k not in used]
                break
            if prefix + "embeddings.patch_embed.weight" in keys:  # transformers keys without config.json
                hf = _strip(sd, prefix)
                enc_sd = from_hf_state_dict(hf, _depth(hf, r"encoder\.layers\.(\d+)\."))
                dropped = [k for k in hf if k.startswith("head.")]
                break
        else:
            raise ValueError(f"{source}: unrecognised weights (first keys: {sorted(keys)[:4]}); expected an "
                             f"AIMv2 checkpoint in our, ml-aim or transformers key names")
    cfg = EncoderConfig(**enc_cfg) if enc_cfg else infer_encoder_config(enc_sd, heads)
    if enc_cfg and heads is not None and heads != cfg.heads:
        raise ValueError(f"{source}: the checkpoint says {cfg.heads} heads, heads={heads} was passed")
    return _build(cfg, enc_sd, dropped, source)


def _pick_checkpoint_file(folder: Path) -> Path:
    """The one weights file of a folder that is not a transformers folder (e.g. an ml-aim download).
    Which checkpoint of a training run to read is not decided here: aimv2train.eval.load_weights (and
    `aimv2 export/probe/embed`) resolve a run to its newest checkpoint (train/checkpoint.py)."""
    files = sorted(p for p in folder.iterdir()  # hidden files are saves in progress
                   if p.suffix in (".pt", ".pth", ".ckpt", ".safetensors") and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{folder}: no config.json (transformers folder) and no .pt/.pth/.safetensors "
                                f"checkpoint in it")
    if len(files) > 1:
        raise ValueError(f"{folder} holds {len(files)} weights files ({files[0].name}, ...): pass one of them, or "
                         f"a training run to aimv2train.eval.load_weights (`aimv2 export/probe/embed` take runs)")
    return files[0]


def load_encoder(path: str | os.PathLike, heads: int | None = None) -> Encoder:
    """Our Encoder (fp32, eval mode) from any of:
    - a transformers Aimv2VisionModel (or Aimv2Model) folder: config.json + model.safetensors;
    - an ml-aim state dict (.pth / .safetensors, `preprocessor.patchifier.proj.*`, `trunk.blocks.*`);
    - our checkpoint (see module docstring), or a folder holding exactly one weights file.
    A training run directory is resolved to its newest checkpoint by aimv2train.eval.load_weights.
    `heads` is only needed for bare state dicts whose width is not a multiple of 128."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if (path / "config.json").exists():
            return load_hf(path)
        path = _pick_checkpoint_file(path)
    if path.suffix == ".safetensors":
        sd, meta = _read_safetensors(path)
        enc_cfg = json.loads(meta["aimv2.encoder_config"]) if "aimv2.encoder_config" in meta else None
        return _from_state_dict(sd, enc_cfg, heads, str(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - pickles with arbitrary objects are refused on purpose
        raise ValueError(f"{path}: cannot read it with torch.load(weights_only=True) ({e}). Checkpoints must "
                         f"hold only tensors and plain Python values") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict, got {type(ckpt).__name__}")
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(ckpt.get(key), dict):
            return _from_state_dict(ckpt[key], _config_from_checkpoint(ckpt), heads, str(path))
    return _from_state_dict(ckpt, None, heads, str(path))


# ---------------------------------------------------------------- saving (atomic: temp file + os.replace)

def _cpu_state(encoder: Encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}


def hf_config(cfg: EncoderConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json of the transformers Aimv2VisionModel with this encoder's architecture."""
    return {
        "architectures": ["Aimv2VisionModel"],
        "model_type": "aimv2_vision_model",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads,
        "num_channels": cfg.in_chans,
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "rms_norm_eps": cfg.eps,
        "qkv_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_head": False,  # pre-training has no pooling head; features are last_hidden_state
        "is_native": cfg.pos_embed == "sincos",
        "dtype": str(dtype).removeprefix("torch."),
    }


def save_hf(encoder: Encoder, folder: str | os.PathLike) -> Path:
    """A folder transformers.Aimv2VisionModel.from_pretrained loads as is (config.json + model.safetensors)."""
    folder = Path(folder)
    sd = to_hf_state_dict(_cpu_state(encoder), encoder.cfg.depth)
    dtype = next(iter(sd.values())).dtype
    atomic_write(folder / "model.safetensors", lambda t: save_file(sd, t, metadata={"format": "pt"}))
    text = json.dumps(hf_config(encoder.cfg, dtype), indent=2) + "\n"
    atomic_write(folder / "config.json", lambda t: Path(t).write_text(text))
    return folder


def save_aim(encoder: Encoder, path: str | os.PathLike) -> Path:
    """ml-aim keyed safetensors (AIMv2VisionEncoder with no head); our config rides in the metadata."""
    path = Path(path)
    sd = to_aim_state_dict(_cpu_state(encoder), encoder.cfg.depth)
    meta = {"format": "pt", "aimv2.encoder_config": json.dumps(asdict(encoder.cfg))}
    atomic_write(path, lambda t: save_file(sd, t, metadata=meta))
    return path


def save_encoder(encoder: Encoder, path: str | os.PathLike) -> Path:
    """Our checkpoint format with the encoder only: {"config": {"encoder": ...}, "model": {"encoder.*"}}."""
    path = Path(path)
    payload = {"config": {"encoder": asdict(encoder.cfg)},
               "model": {f"encoder.{k}": v for k, v in _cpu_state(encoder).items()}}
    atomic_write(path, lambda t: torch.save(payload, t))
    return path
