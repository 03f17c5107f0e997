"""Runs the check's parts in order and holds its plain command line (argparse: `python -m aimv2train.gpucheck`).

A part that fails or cannot run is recorded with its reason and the rest go on; the JSON is rewritten after
every part, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from . import BUDGET_S, METAVARS, OLD, OPTIONS, PARTS, SHORT, parse_parts
from .common import DRY_SIZES, GPU_SIZES, Budget, reason
from .decode import part_decode
from .env import part_env, part_peak
from .parity import part_parity
from .report import table
from .steps import part_steps
from .trainer import part_trainer

PART_FUNCS = {"env": part_env, "peak": part_peak, "steps": part_steps, "parity": part_parity,
              "decode": part_decode, "trainer": part_trainer}
NEEDS_GPU = ("steps", "parity", "trainer")   # AIMv2-L at real sizes; --dry-run runs them tiny on CPU


def run(out: str | os.PathLike, *, dry_run: bool = False, device: str | None = None,
        parts: tuple[str, ...] = PARTS, budget_s: float = BUDGET_S, workdir: str | os.PathLike | None = None,
        rows: tuple[str, ...] = (), native_dynamic: str = "auto", data: str | None = None) -> dict:
    """Run the check; every part ends "ok", "skipped" (with a reason) or "error" (with a reason)."""
    from aimv2data.atomic import write_json_atomic

    dev = _device(device, dry_run)
    out = Path(out)
    work = Path(workdir) if workdir else out.parent / (out.stem + "_work")
    budget = Budget(budget_s)
    result = {"command": " ".join(sys.argv), "dry_run": dry_run, "device": str(dev),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": budget_s, "parts": {}}
    ctx: dict = {}
    t_all = time.perf_counter()
    for name in PARTS:
        rec = _part(name, parts, dev, dry_run, ctx=ctx, budget=budget, workdir=work, rows_wanted=rows,
                    native_dynamic=native_dynamic, data_dir=data)
        result["parts"][name] = rec
        result["seconds"] = round(time.perf_counter() - t_all, 2)
        write_json_atomic(result, out, indent=1, default=str)
        if name in parts:
            print(f"[{name}] {rec['status']} in {rec['seconds']:.1f} s" + (f": {rec['reason']}" if "reason" in rec
                                                                           else ""), flush=True)
    print(table(result))
    return result


def _device(device: str | None, dry_run: bool) -> torch.device:
    dev = torch.device(device or ("cpu" if dry_run or not torch.cuda.is_available() else "cuda"))
    return torch.device("cuda", 0) if dev.type == "cuda" and dev.index is None else dev


def _part(name: str, parts: tuple[str, ...], dev: torch.device, dry_run: bool, **kwargs) -> dict:
    if name not in parts:
        return {"status": "skipped", "reason": "not asked for (--parts)"}
    if name in NEEDS_GPU and dev.type != "cuda" and not dry_run:
        return {"status": "skipped", "reason": "no CUDA device: AIMv2-L steps, CUDA/CPU parity and the L trainer runs "
                "need a GPU (--dry-run runs them at tiny sizes on CPU)"}
    print(f"[{name}] ...", flush=True)
    t0 = time.perf_counter()
    try:
        body = PART_FUNCS[name](device=dev, sizes=DRY_SIZES if dry_run else GPU_SIZES, dry_run=dry_run, **kwargs)
        rec = {"status": body.pop("status", "ok"), **body}
    except Exception as e:
        rec = {"status": "error", "reason": reason(e)}
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def prepare_payload(folder: str, max_mb: float) -> dict:
    """--prepare: the trainer part's payload, printed in one line."""
    from .payload import prepare

    info = prepare(folder, max_mb=max_mb)
    print(f"wrote {folder}: {info['images']} photos ({info['megapixels_mean']:.2f} MP mean, "
          f"{info['bytes'] / 1e6:.1f} MB with manifest and tokenizer) in {info['seconds']:.0f} s; carry it and "
          f"pass --data {folder} on the GPU machine (docs/gpucheck.md)")
    return info


def execute(*, output: str, dry_run: bool, device: str | None, parts: tuple[str, ...], budget: float, data: str | None,
            prepare: str | None, max_mb: float, workdir: str | None, rows: str, native_dynamic: str) -> int:
    """What both command lines do with their parsed options; the exit status."""
    if prepare:
        prepare_payload(prepare, max_mb)
        return 0
    result = run(output, dry_run=dry_run, device=device, parts=parts, budget_s=budget, workdir=workdir,
                 rows=tuple(r.strip() for r in rows.split(",") if r.strip()), native_dynamic=native_dynamic,
                 data=data)
    print(f"wrote {output}")
    return 1 if any(r.get("status") == "error" for r in result["parts"].values()) else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aimv2train.gpucheck",
                                 description="The one prepared GPU check (docs/gpucheck.md); the same as "
                                 "`aimv2 bench gpu`, without click.")
    for flag, default, kind, text in OPTIONS:
        names = [*filter(None, [SHORT.get(flag)]), flag, *OLD.get(flag, ())]
        if kind == "flag":
            ap.add_argument(*names, action="store_true", help=text)
        elif isinstance(kind, tuple):
            ap.add_argument(*names, choices=kind, default=default, help=text)
        else:
            ap.add_argument(*names, type=kind, default=default, metavar=METAVARS.get(flag), help=text)
    a = ap.parse_args(argv)
    try:
        parts = parse_parts(a.parts)
    except ValueError as e:
        ap.error(str(e))
    opts = {k: v for k, v in vars(a).items() if k != "parts"}
    return execute(parts=parts, **opts)
