"""`--compile` at native resolution: each transformer block compiled on its own, shapes dynamic, so the graphs
stay a bounded handful over any number of grids; `--compile-warmup` compiles them all before step 0 (the same
(grid, B) list on every rank), after which fresh grids, prefix lengths and BlockMasks compile nothing; the
figures land in run.json and the summary. Checked at the dynamo level with the aot_eager backend (the same
guards, graphs and recompiles as Inductor, no C++ build) on the tiny model."""
import functools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from aimv2data.buckets import DEFAULT
from aimv2data.loader.sampler import Sampler
from aimv2train.model.aimv2 import AIMv2
from aimv2train.model.config import model_config
from aimv2train.train.compiling import compile_counts, compile_step, counts_since, warmup_shapes, watch_compiles
from aimv2train.train.trainer import LossModule, TrainConfig, TrainError, train

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402

torch.set_num_threads(1)


class SmallSampler:
    """The sampler's grid table at small areas (CPU-sized steps): the default 33-bucket table's grids for a few
    buckets, B = C / A with C = 64, so B runs 4, 2, 1 (B = 1 gets its own graphs)."""
    native, c = True, 64

    def __init__(self, buckets=(0, 8, 16, 24, 32), areas=(16, 32, 64)):
        self.grids = {b: {a: DEFAULT.grid(b, a) for a in areas} for b in buckets}

    def grid_of(self, area, bucket):
        return self.grids[bucket][area]

    def batch(self, area, bucket):
        return self.c // area


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile with the aot_eager backend, dynamo's caches and limits restored after."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    limits = torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit
    torch._dynamo.reset()
    counters.clear()
    watch_compiles()
    yield
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit = limits


def tiny_model(attention="sdpa"):
    torch.manual_seed(0)
    model = AIMv2(model_config("tiny", pos_embed="sincos", depth=1))
    model.set_attention(attention)
    return model


def step(loss_module, grid, B, g):
    h, w = grid
    images = torch.randint(0, 256, (B, h * 14, w * 14, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    tokens = torch.randint(3, 512, (B, 12), generator=g)
    prefix = torch.randint(1, h * w, (B,), generator=g)  # fresh prefix lengths every step
    out = loss_module(images, None, tokens, prefix)
    out["loss"].backward()
    return out["loss"].detach()


def test_block_graphs_stay_bounded_over_many_sequence_lengths(aot_eager):
    model = tiny_model()
    model.set_grad_checkpointing(True)  # recomputation wraps the compiled block (the large configs turn it on)
    eager = LossModule(tiny_model(), 0)
    shapes = warmup_shapes(SmallSampler(buckets=range(0, 33, 3)))
    assert len({g for g, _ in shapes}) >= 25  # many distinct grids and token counts
    step_fn = compile_step(LossModule(model, 0), model, native=True, choice="auto", shapes=shapes)
    assert list(model.state_dict()) == list(eager.model.state_dict())  # checkpoints keep their keys
    graphs = []
    for i, (grid, B) in enumerate(shapes):
        loss = step(step_fn, grid, B, torch.Generator().manual_seed(i))
        graphs.append(compile_counts()["graphs"])
        if i < 3:  # the compiled blocks compute what the eager ones do
            torch.testing.assert_close(loss, step(eager, grid, B, torch.Generator().manual_seed(i)))
    # encoder and decoder block, each once for B >= 2 and once for B = 1, not one per grid: after the first
    # batch of one image the other grids compile nothing
    first_b1 = next(i for i, (_, B) in enumerate(shapes) if B == 1)
    assert graphs[-1] <= 4 and graphs[first_b1] == graphs[-1] and len(shapes) - first_b1 > 5


def test_nothing_compiles_after_warmup_over_fresh_grids_and_prefixes(aot_eager):
    sampler = SmallSampler()
    model = tiny_model()
    every = warmup_shapes(sampler)
    step_fn = compile_step(LossModule(model, 0), model, native=True, choice="true", shapes=every)
    warm = warmup_shapes(sampler, one_per_area=True)
    assert len(warm) == 3 < len(every)  # dynamic blocks: one grid per area is enough
    g = torch.Generator().manual_seed(0)
    for grid, B in warm:
        step(step_fn, grid, B, g)
    before = compile_counts()
    for grid, B in every + every[::-1]:  # every grid, twice, with new prefix lengths each time
        step(step_fn, grid, B, g)
    assert counts_since(before) == {"graphs": 0, "recompiles": 0, "seconds": 0}


def test_fresh_block_masks_do_not_recompile(aot_eager):
    """FlexAttention's BlockMask (new prefix lengths, tiles and batch every step) is a graph input. Forward only:
    FlexAttention has no backward on the CPU."""
    model = tiny_model("flex")
    model.compile_blocks(dynamic=True)
    g = torch.Generator().manual_seed(0)

    def forward(grid, B):
        h, w = grid
        prefix = torch.randint(1, h * w, (B,), generator=g)
        with torch.no_grad():
            return model.encoder(torch.randn(B, 3, h * 14, w * 14, generator=g), model.prefix_mask(prefix, h * w))

    for grid, B in [((8, 16), 3), ((8, 16), 1), ((16, 16), 3), ((16, 16), 1)]:  # one tile / several, B = 1 / more
        forward(grid, B)
    before = compile_counts()
    for grid, B in [((9, 14), 2), ((11, 11), 4), ((12, 21), 2), ((23, 11), 1), ((22, 23), 3), ((16, 32), 2)]:
        forward(grid, B)
    assert counts_since(before)["graphs"] == 0


def test_warmup_list_is_the_same_on_every_rank_and_covers_every_draw():
    grids = {b: {a: DEFAULT.grid(b, a) for a in (128, 256, 512, 1024, 2048, 4096)} for b in range(33)}
    shuffled = {b: dict(reversed(list(grids[b].items()))) for b in reversed(list(grids))}
    ranks = [Sampler({"dfn": 0.6, "coyo": 0.06}, native=True, batch_patches=65536, grids=g, rank=r, world_size=4)
             for r, g in enumerate([grids, shuffled, grids, shuffled])]
    lists = [warmup_shapes(s) for s in ranks]
    assert all(x == lists[0] for x in lists)
    drawable = {(s.grid_of(a, b), s.batch(a, b)) for s in ranks[:1] for b in grids for a in grids[b]}
    assert set(lists[0]) == drawable and len(lists[0]) == len(drawable)
    batches = [B for _, B in lists[0]]
    assert batches == sorted(batches, reverse=True)  # ordered by area: B = C / A falls
    per_area = [warmup_shapes(s, one_per_area=True) for s in ranks]
    assert all(x == per_area[0] for x in per_area) and [B for _, B in per_area[0]] == [512, 256, 128, 64, 32, 16]
    fixed = Sampler({"dfn": 1.0}, native=False, fixed_grid=(16, 16), batch_size=256)
    assert warmup_shapes(fixed) == [((16, 16), 256)]


def test_static_blocks_raise_dynamos_limits_to_the_shapes():
    model = SimpleNamespace(compile_blocks=lambda **kw: seen.update(kw))
    seen = {}
    shapes = warmup_shapes(SmallSampler(buckets=range(33)))
    limits = torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit
    try:
        compile_step(torch.nn.Identity(), model, native=True, choice="false", shapes=shapes)
        assert seen == {"dynamic": False}
        assert torch._dynamo.config.recompile_limit >= 4 * len(shapes)
        assert torch._dynamo.config.accumulated_recompile_limit >= 4 * len(shapes)
    finally:
        torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit = limits


def test_warmup_needs_compile(tmp_path):
    with pytest.raises(TrainError, match="add --compile"):
        train(TrainConfig(manifest="m", tokenizer="t", out=str(tmp_path), compile_warmup=True))


@pytest.mark.slow
def test_native_run_records_its_compiles_and_compiles_nothing_after_warmup(aot_eager, tmp_path):
    """A compiled native run with --compile-warmup: the compile figures in run.json and the summary, and no graph
    or recompile once training started (1-2 minutes on 2 busy cores: C = 4096 is the smallest budget)."""
    data = _train_fixtures.build(tmp_path / "data")
    out = tmp_path / "run"
    s = train(_train_fixtures.tiny_config(*data, out, native_res=True, resolution=None, batch_patches=4096,
                                          stage="pretrain", steps=3, compile=True, compile_warmup=True))
    c = s["compile"]
    assert c["scope"] == "blocks" and c["dynamic"] is True and c["warmup_shapes"] == 6
    assert 1 <= c["graphs"] <= 8 and c["seconds"] > 0 and c["recompiles"] >= 0
    assert c["graphs_after_warmup"] == 0 and c["recompiles_after_warmup"] == 0
    recorded = json.loads((out / "run.json").read_text())["compile"]
    assert recorded["graphs"] == c["graphs"] and recorded["warmup_seconds"] == c["warmup_seconds"]
    assert json.loads((out / "summary.json").read_text())["compile"] == c
