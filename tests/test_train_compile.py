"""`--compile` at native resolution: one static graph per grid the sampler can draw (auto on CUDA, where
torch 2.11's Inductor fails on the dynamic-shape step), or one dynamic graph (auto on CPU). Checked at the
dynamo level with a stand-in step (the aot_eager backend: the same guards and recompiles, no C++ build)."""
import functools
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from aimv2train.train.config import TrainConfig
from aimv2train.train.trainer import compile_step

# ten grids in three aspect buckets, as the sampler's `grids` holds them: {bucket: {area: (h, w)}}
GRIDS = {0: {128: (8, 16), 256: (11, 23), 512: (16, 32)},
         1: {128: (11, 11), 256: (16, 16), 512: (22, 23), 1024: (32, 32)},
         2: {128: (16, 8), 256: (23, 11), 512: (32, 16)}}


class Step(torch.nn.Module):
    def forward(self, images):
        return (images.float() ** 2).mean(dim=(1, 2, 3)).sum()


@pytest.fixture
def compiled(monkeypatch):
    """compile_step's result, built with the aot_eager backend, and the dynamo state restored after."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.reset()
    counters.clear()

    def make(device: str, dynamic: str):
        cfg = TrainConfig(manifest="m", tokenizer="t", out="o", native_res=True, compile=True, compile_dynamic=dynamic)
        return compile_step(Step(), cfg, SimpleNamespace(sampler=SimpleNamespace(grids=GRIDS)), torch.device(device))
    yield make
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = limit


def _run_every_grid(step) -> None:
    for by_area in GRIDS.values():
        for h, w in by_area.values():
            x = torch.randn(4096 // (h * w), 3, h * 14, w * 14)  # B = C / A >= 4, as the sampler draws
            torch.testing.assert_close(step(x), Step()(x))


def test_static_graphs_one_per_grid_beyond_dynamos_default_limit(compiled):
    # "false" on CPU is what "auto" does on CUDA; ten grids > dynamo's default limit of 8
    _run_every_grid(compiled("cpu", "false"))
    assert counters["stats"]["unique_graphs"] == 10
    assert torch._dynamo.config.cache_size_limit >= 11


def test_auto_on_cuda_chooses_static_graphs(compiled):
    # no CUDA is needed to build the wrapper; the choice is read from the compile call
    seen = {}
    real = torch.compile
    torch.compile = lambda m, **kw: seen.update(kw) or real(m, **kw)
    try:
        compiled("cuda", "auto")
    finally:
        torch.compile = real
    assert seen["dynamic"] is False


def test_dynamic_is_one_graph_for_every_grid(compiled):
    _run_every_grid(compiled("cpu", "auto"))
    assert counters["stats"]["unique_graphs"] == 1
