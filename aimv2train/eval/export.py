"""`aimv2 export RUN --format hf|aim --output DIR`: a trained encoder, handed to the rest of the ecosystem.

    hf    DIR/config.json + model.safetensors      transformers `Aimv2VisionModel` (interop.save_hf)
          DIR/preprocessor_config.json             CLIPImageProcessor: shorter side -> R, centre crop, CLIP mean/std
          DIR/README.md                            the model card
    aim   DIR/model.safetensors                    ml-aim `AIMv2VisionEncoder` keys (interop.save_aim; our
                                                   encoder config rides in the safetensors metadata)
          DIR/README.md

RUN is a training run directory (RUN/checkpoints/step_*.pt; `--step N` picks one, default the newest),
its checkpoints/ directory, one checkpoint file, or anything `interop.load_encoder` reads (a
transformers folder, ml-aim weights): then export converts between formats and the card says less.

The card names the data (the run's manifest: samples, sources, caption sets), the steps, the
optimisation and, when given one (`--probe-results`, or RUN/probe.json), the probe results, marked as
belonging to these exact weights or not (the probe records the sha256 of the encoder it probed).

DIR is written whole or not at all: everything goes to a temp directory beside it that is renamed into
place; an existing non-empty DIR is replaced only with `overwrite=True`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from aimv2data.manifest.layout import read_manifest_json
from aimv2data.paper import EVAL_MAX_PATCHES

from ..model.aimv2 import LOSS_TERMS
from ..model.interop import save_aim, save_hf
from .probe import TABLE_A2
from ..train.rundir import read_json_or_none, run_config
from .weights import read_encoder, resolve_weights, say
from .probe_data import encoder_hash

class ExportError(ValueError):
    """An export that cannot be done (format, output, probe results); the message says what and what to do.
    Weights that cannot be used raise WeightsError (weights.py)."""


FORMATS = ("hf", "aim")
FORMAT_NAMES = {"hf": "transformers `Aimv2VisionModel` (config.json + model.safetensors)",
                "aim": "ml-aim `AIMv2VisionEncoder` keys (model.safetensors)"}


def run_info(ckpt: Path, run: Path | None) -> dict:
    """What the card says about training: from the checkpoint, RUN/run.json, RUN/summary.json and
    the manifest's _manifest.json (when still there)."""
    info: dict = {"checkpoint": str(ckpt)}
    if ckpt.is_file() and ckpt.suffix in (".pt", ".pth", ".ckpt"):
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - load_encoder has already read it or will say why it cannot
            state = {}
        if isinstance(state, dict):
            info["step"] = state.get("step")
            train = state.get("train") or {}
            info["train"] = train.get("config")
            info["hparams"] = train.get("hparams")
            info["stage"] = train.get("stage")
            info["world_size"] = train.get("world_size")
            tok = state.get("tokenizer")
            if isinstance(tok, torch.Tensor):
                info["tokenizer_bytes"] = int(tok.numel())
    if run is not None:
        cfg = run_config(run) or {}
        info["train"] = info.get("train") or cfg.get("train")
        info["hparams"] = info.get("hparams") or cfg.get("hparams")
        info["precision"], info["device"] = cfg.get("precision"), cfg.get("device")
        info["summary"] = read_json_or_none(run / "summary.json")
        info["run"] = str(run)
    manifest = (info.get("train") or {}).get("manifest")
    if manifest:
        meta = read_manifest_json(manifest)
        if meta:
            counts = meta.get("counts", {})
            info["data"] = {"manifest": manifest, "samples": counts.get("samples"),
                            "per_source": counts.get("per_source"), "captions": counts.get("captions"),
                            "caption_sets": sorted(meta.get("caption_sets") or {}), "inputs": meta.get("inputs"),
                            "schema_version": meta.get("schema_version")}
        else:
            info["data"] = {"manifest": manifest, "note": "the manifest is no longer at this path"}
    return info


def find_probe_results(run: Path | None, given: str | os.PathLike | None) -> tuple[dict | None, str | None]:
    if given is not None:
        doc = read_json_or_none(Path(given))
        if doc is None:
            raise ExportError(f"--probe-results {given}: not a readable JSON file (write one with `aimv2 probe "
                              f"... --output FILE`)")
        return doc, str(given)
    if run is not None:
        for name in ("probe.json", "probe_results.json"):
            doc = read_json_or_none(run / name)
            if doc is not None:
                return doc, str(run / name)
    return None, None


def _fmt_lr(x) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


def model_card(name: str, encoder, fmt: str, info: dict, probe: dict | None, probe_path: str | None, sha: str,
               files: dict[str, str]) -> str:
    """The export's README.md: its sections in order, each written by one function below."""
    lines = (_card_header(name, encoder, fmt, sha) + _training_section(info) + _data_section(info)
             + _probe_section(probe, probe_path, sha) + preprocessing_section(encoder.cfg, fmt) + _use_section(fmt)
             + _files_section(files))
    return "\n".join(lines) + "\n"


def _card_header(name: str, encoder, fmt: str, sha: str) -> list[str]:
    """The hub's YAML front matter, the title and the architecture table."""
    c = encoder.cfg
    n_params = sum(p.numel() for p in encoder.parameters())
    native = c.pos_embed == "sincos"
    res = "native resolution (2D sin-cos positions)" if native else f"{c.img_size} px ({c.grid[0]}x{c.grid[1]} patches)"
    lines = ["---", "library_name: transformers" if fmt == "hf" else "library_name: ml-aim",
             "pipeline_tag: image-feature-extraction", "tags:", "- aimv2", "- vision", "- image-feature-extraction"]
    lines += ["- native-resolution"] if native else []
    lines += ["---", "", f"# {name}: an AIMv2 vision encoder trained with aimv2", ""]
    lines += ["| | |", "|---|---|",
              f"| architecture | AIMv2 encoder: width {c.dim}, {c.depth} blocks, {c.heads} heads, patch {c.patch_size}, "
              f"SwiGLU {c.mlp_hidden}, RMSNorm (eps {c.eps:g}), no class token |",
              f"| input | {res}; CLIP mean/std normalisation |",
              f"| parameters | {n_params:,} ({n_params / 1e6:.2f}M) |",
              f"| format | {FORMAT_NAMES[fmt]} |",
              f"| encoder sha256 | `{sha}` (weights and config; what `aimv2 probe` records) |", ""]
    return lines


def _training_section(info: dict) -> list[str]:
    train = info.get("train") or {}
    summary = info.get("summary") or {}
    lines = ["## Training", ""]
    if info.get("step") is None and not train:
        return lines + [f"Converted from `{info['checkpoint']}`; no training run information was found with it.", ""]
    steps = train.get("steps")
    status = summary.get("status")
    lines.append(f"- checkpoint: `{info['checkpoint']}`, after **{info.get('step')} optimiser steps**"
                 + (f" of {steps}" if steps else "") + (f" (run status: {status})" if status else ""))
    if train:
        stage = info.get("stage") or train.get("stage") or ("native" if train.get("native_res") else "pretrain")
        geom = (f"native resolution, {train.get('batch_patches')} patches per rank per step"
                if train.get("native_res") else f"{train.get('resolution')} px, {train.get('batch_size')} images "
                f"per rank per step")
        lines.append(f"- model preset `{train.get('model')}`, stage `{stage}`, {geom}, "
                     f"{info.get('world_size') or 1} rank(s), seed {train.get('seed')}")
        if train.get("init"):
            lines.append(f"- initialised from `{train['init']}`")
    hp = info.get("hparams") or {}
    if hp:
        lines.append(f"- fully decoupled AdamW, peak lr {_fmt_lr(hp.get('peak_lr'))}, min lr "
                     f"{_fmt_lr(hp.get('min_lr'))}, warmup {hp.get('warmup')} steps, cosine; weight decay "
                     f"{_fmt_lr(hp.get('weight_decay'))}, betas {tuple(hp.get('betas') or ())}, clip "
                     f"{_fmt_lr(hp.get('clip'))} ({hp.get('source')})")
    if "loss_end" in summary:
        terms = ", ".join(f"{short} {summary[k + '_end']:.4f}" for k, (short, _) in LOSS_TERMS.items()
                          if k + "_end" in summary)
        lines.append(f"- loss {summary['loss_start']:.4f} -> {summary['loss_end']:.4f} ({terms}; "
                     f"mean of the first / last 10 steps)")
    return lines + [""]


def _data_section(info: dict) -> list[str]:
    lines = ["## Data", ""]
    data = info.get("data")
    if data and data.get("samples") is not None:
        src = ", ".join(f"{k}: {v:,}" for k, v in (data.get("per_source") or {}).items())
        lines.append(f"- manifest `{data['manifest']}` (schema {data.get('schema_version')}): "
                     f"**{data['samples']:,} image-text samples** ({src}); {data.get('captions') or 0:,} with alt-text")
        if data.get("caption_sets"):
            lines.append(f"- synthetic caption sets: {', '.join(data['caption_sets'])}")
        if data.get("inputs"):
            shown = data["inputs"][:3]
            more = f" and {len(data['inputs']) - 3} more" if len(data["inputs"]) > 3 else ""
            names = ", ".join(f"`{s}`" for s in shown)
            lines.append(f"- from {len(data['inputs'])} webdataset shard(s): {names}{more}")
    elif data:
        lines.append(f"- manifest `{data['manifest']}` ({data.get('note')})")
    else:
        lines.append("- not recorded with these weights")
    if info.get("tokenizer_bytes"):
        train = info.get("train") or {}
        lines.append(f"- captions tokenized with the run's sentencepiece model `{train.get('tokenizer')}` "
                     f"(stored in the checkpoint)")
    return lines + [""]


def _probe_section(probe: dict | None, probe_path: str | None, sha: str) -> list[str]:
    lines = ["## Evaluation: frozen-trunk probes", ""]
    if not probe:
        return lines + ["No probe results were given. Measure with `aimv2 probe --checkpoint RUN --train DATA --val DATA "
                        "--output RUN/probe.json`, then export again.", ""]
    same = probe.get("encoder", {}).get("sha256") == sha
    pre = probe.get("preprocess", {})
    lines.append(f"From `{probe_path}`"
                 + ("" if same else " -- **these results are for different weights** (another checkpoint "
                                    "or step) than the ones exported here"))
    lines.append("")
    lines += ["| probe | train | val | classes | top-1 (best) | best lr / wd | chance |",
              "|---|---|---|---|---|---|---|"]
    for kind in ("attentive", "linear"):
        r = probe.get(kind)
        if not r or not r.get("best"):
            continue
        b = r["best"]
        lines.append(f"| {kind} | `{probe['train']['path']}` ({probe['train']['images']}) | "
                     f"`{probe['val']['path']}` ({probe['val']['images']}) | {len(probe.get('classes', []))} | "
                     f"**{b['top1']:.2f}%** | {_fmt_lr(b['lr'])} / {_fmt_lr(b['wd'])} | "
                     f"{probe.get('chance_top1', 0):.2f}% |")
    cfg = probe.get("config", {})
    full = (list(cfg.get("lrs", [])) == list(TABLE_A2["lrs"])
            and list(cfg.get("wds", [])) == list(TABLE_A2["wds"]))
    mode = (f"{pre.get('resolution')} px" if pre.get("mode") == "fixed"
            else f"native, <= {pre.get('max_patches')} patches")
    lines += ["", f"Frozen trunk, features at {mode}, {cfg.get('epochs')} epochs, batch {cfg.get('batch_size')}, "
                  f"AdamW (0.9, 0.999), cosine, clip {cfg.get('clip')}; lr grid {cfg.get('lrs')} x wd grid "
                  f"{cfg.get('wds')} ({'Table A2' if full else 'shortened from Table A2'}); no augmentation "
                  f"(cached features)."]
    return lines + [""]


def _use_section(fmt: str) -> list[str]:
    lines = ["## Use", ""]
    if fmt == "hf":
        lines += ["```python", "from transformers import Aimv2VisionModel", "",
                  'model = Aimv2VisionModel.from_pretrained("PATH/TO/THIS/FOLDER").eval()',
                  "tokens = model(pixel_values=pixels).last_hidden_state   # (B, h*w, D), no class token",
                  "features = tokens.mean(1)                               # what `aimv2 embed` writes", "```", ""]
    else:
        lines += ["```python", "from safetensors.torch import load_file", "",
                  'state = load_file("model.safetensors")   # ml-aim AIMv2VisionEncoder keys (no head)',
                  "```", ""]
    lines += ["```", "aimv2 embed IMAGES --checkpoint PATH/TO/THIS/FOLDER -o features.npy",
              "aimv2 train -m MANIFEST -t tok.model --init PATH/TO/THIS/FOLDER ...   # continue training", "```", ""]
    return lines


def _files_section(files: dict[str, str]) -> list[str]:
    return ["## Files", "", "| file | sha256 |", "|---|---|"] + [f"| {f} | `{h}` |" for f, h in files.items()]


def preprocessing_section(c, fmt: str) -> list[str]:
    """How to turn an image into pixel_values so that features match `aimv2 embed` (and training)."""
    p = c.patch_size
    lines = ["## Preprocessing", ""]
    if c.pos_embed == "sincos":
        lines += [f"Native resolution: choose a patch grid (h, w) keeping the image's aspect ratio with h*w <= A "
                  f"(the patch budget; `aimv2 embed --max-patches A`, default {EVAL_MAX_PATCHES}), then resize the "
                  f"whole image **directly, bicubic, to (h*{p}, w*{p}) pixels (width w*{p}, height h*{p}) without cropping**, "
                  "and normalise with the CLIP mean/std. A resize-then-crop differs by about 1e-2 in the features. "
                  "transformers has no image processor for this, so none is shipped: "
                  "`aimv2train.model.preprocess.native_resolution` does it."]
    else:
        lines += [f"Shorter side to {c.img_size} px (bicubic), centre crop {c.img_size} x {c.img_size}, CLIP "
                  "mean/std normalisation" + (": what the shipped `preprocessor_config.json` (CLIPImageProcessor) "
                                              "does." if fmt == "hf" else ".")]
    lines += ["", "**EXIF orientation**: `aimv2 embed` and training display images as their EXIF orientation tag "
                  "says; transformers' image processors do not (a rotated photo differs by up to 0.7 per feature). "
                  "Apply `PIL.ImageOps.exif_transpose(image)` before the processor.", ""]
    return lines


def preprocessor_config(cfg) -> dict:
    """CLIPImageProcessor settings of the released AIMv2 folders: shorter side to R (bicubic), centre crop."""
    from aimv2data.batch import MEAN, STD

    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": cfg.img_size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": cfg.img_size, "width": cfg.img_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD),
            "do_convert_rgb": True}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export(run: str | os.PathLike, fmt: str, output: str | os.PathLike, *, step: int | None = None,
           probe_results: str | os.PathLike | None = None, overwrite: bool = False, heads: int | None = None) -> dict:
    """Write the export; returns a summary dict (output, files, step, sha256, probe source)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}, got {fmt!r}")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another --output or pass --overwrite")
    ckpt, run_dir = resolve_weights(run, step, notify=say)
    encoder = read_encoder(ckpt, heads)
    info = run_info(ckpt, run_dir)
    probe, probe_path = find_probe_results(run_dir, probe_results)
    sha = encoder_hash(encoder)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        if fmt == "hf":
            save_hf(encoder, tmp)
            if encoder.cfg.pos_embed == "learned":  # a native-resolution model has no single input size
                text = json.dumps(preprocessor_config(encoder.cfg), indent=2) + "\n"
                (tmp / "preprocessor_config.json").write_text(text)
        else:
            save_aim(encoder, tmp / "model.safetensors")
        files = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file() and not f.name.startswith(".")}
        (tmp / "README.md").write_text(model_card(out.name, encoder, fmt, info, probe, probe_path, sha, files))
        os.chmod(tmp, 0o755)  # mkdtemp (and the atomic writers' temp files) are private; an export is not
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"output": str(out), "format": fmt, "checkpoint": str(ckpt), "step": info.get("step"),
            "encoder": asdict(encoder.cfg), "sha256": sha, "files": sorted(files) + ["README.md"],
            "probe_results": probe_path, "probe_matches": bool(probe) and probe.get("encoder", {}).get("sha256") == sha}
