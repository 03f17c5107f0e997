"""`--compile`: what is compiled, the shapes `--compile-warmup` runs, and the compile figures a run records.

Fixed resolution has one shape: the whole loss module is one graph. Native resolution draws a grid and
B = C / A every step (6 areas x up to 33 aspect buckets): there each transformer block is compiled on its
own with the sequence and batch dimensions dynamic (`AIMv2.compile_blocks`), so the graphs are a bounded
handful (encoder and decoder block; B = 1 and one-tile FlexAttention masks specialise), not one per grid
as a whole-model static compile made (198 grids at ~60 s each for L on an H100). Prefix lengths and
BlockMasks are graph inputs: new ones every step do not recompile.
"""
from __future__ import annotations

import threading
import time

import torch
from torch import nn

# Graphs of Block.forward a dynamic run may need: {grad, no-grad (validation)} x {encoder, decoder} x
# {B >= 2, B = 1} x {one 128-token tile, more} for the encoder's mask; dynamo's default limit (8) is less.
DYNAMIC_GRAPH_LIMIT = 16


def compile_dynamic(choice: str) -> bool:
    """`--compile-dynamic` true / false / auto -> whether the blocks' shapes are dynamic (auto: true)."""
    return choice != "false"


def compile_step(loss_module: nn.Module, model, native: bool, choice: str, shapes: list) -> nn.Module:
    """The step function `--compile` makes: at fixed resolution the loss module torch.compile'd (one shape,
    one graph); at native resolution `model`'s blocks compiled in place and the loss module itself. `shapes`:
    the (grid, B) list the sampler can draw (warmup_shapes); static blocks need a graph per shape and block
    kind, so dynamo's recompile limits are raised to that, or later shapes would run eagerly."""
    if not native:
        return torch.compile(loss_module)
    dynamic = compile_dynamic(choice)
    limit = DYNAMIC_GRAPH_LIMIT if dynamic else 8 * len(shapes) + DYNAMIC_GRAPH_LIMIT
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, limit)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, limit)
    model.compile_blocks(dynamic=dynamic)
    return loss_module


def warmup_shapes(sampler, one_per_area: bool = False) -> list[tuple[tuple[int, int], int]]:
    """Every (grid, B) `sampler` can draw, ordered by area, then bucket: a function of the manifest's bucket
    table and C alone, so every rank gets the same list in the same order. `one_per_area`: the first grid of
    each (area, B) only, enough for dynamic blocks, whose graphs depend on B and on whether the area's grids
    fit one FlexAttention tile, not on the grid (tests/test_train_compile.py checks that every other grid then
    compiles nothing)."""
    if not sampler.native:
        return [(tuple(sampler.grid), sampler.b)]
    shapes: dict = {}
    for area, bucket in sorted((a, b) for b, by_area in sampler.grids.items() for a in by_area):
        grid, batch = tuple(sampler.grid_of(area, bucket)), sampler.batch(area, bucket)
        shapes.setdefault((area, batch) if one_per_area else (grid, batch), (grid, batch))
    return list(shapes.values())


# ------------------------------------------------------------------------- what was compiled, and for how long

_lock = threading.Lock()
_totals = {"recompiles": 0, "seconds": 0.0}
_started: list[float] = []


def _on_start(args) -> None:
    from torch._dynamo.callback import CallbackTrigger
    from torch._guards import CompileId

    with _lock:
        _started.append(time.perf_counter())
        if args.callback_trigger == CallbackTrigger.DYNAMO:
            cid = CompileId.from_string(args.compile_id.split("_")[0])  # "frame/compile[_attempt]"
            _totals["recompiles"] += bool(cid is not None and (cid.frame_compile_id or 0) > 0)


def _on_end(args) -> None:
    with _lock:
        if _started:
            _totals["seconds"] += time.perf_counter() - _started.pop()


def watch_compiles() -> None:
    """Time every compile of this process (dynamo's compile callbacks; lazy backward compiles included) and count
    recompiles (a second or later graph of one function: what TORCH_LOGS=recompiles prints). Idempotent."""
    from torch._dynamo.callback import callback_handler

    if _on_start not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(_on_start)
        callback_handler.register_end_callback(_on_end)


def compile_counts() -> dict:
    """This process's compile figures so far: graphs (dynamo's unique graphs), recompiles, seconds."""
    from torch._dynamo.utils import counters

    with _lock:
        return {"graphs": int(counters["stats"]["unique_graphs"]), "recompiles": _totals["recompiles"],
                "seconds": _totals["seconds"]}


def counts_since(before: dict) -> dict:
    now = compile_counts()
    return {k: (round(now[k] - before[k], 2) if k == "seconds" else now[k] - before[k]) for k in now}
