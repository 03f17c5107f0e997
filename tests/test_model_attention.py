"""Prefix attention on two kernels: the FlexAttention BlockMask (the default on CUDA) against the dense
SDPA mask (the reference), and the reference's gradients against plain softmax attention.

What CPU cannot test (docs/model.md): FlexAttention's backward (NotImplementedError on CPU) and the
fused GPU kernel itself; the forward here runs flex_attention's CPU implementation on the same BlockMask.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

from aimv2train.model.aimv2 import AIMv2
from aimv2train.model.config import model_config
from aimv2train.model.layers import Attention
from aimv2train.model.masks import (prefix_block_mask, prefix_causal_mask, prefix_mask_mod, resolve_attention,
                                    sample_prefix_lengths)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# a fixed 224 px grid (256 patches: two 128-blocks) and a native grid that is no multiple of the block size
GRIDS = [(16, 16), (7, 13)]


def mixed_prefixes(num_patches: int) -> torch.Tensor:
    """Prefix lengths across the range in one batch: 1, a block edge, mid-block, I-1."""
    return torch.tensor([1, min(128, num_patches - 1), num_patches // 2 + 3, num_patches - 1])


@pytest.mark.parametrize("grid", GRIDS)
def test_mask_mod_equals_the_dense_mask_at_every_query_and_key(grid):
    n = grid[0] * grid[1]
    m = mixed_prefixes(n)
    dense = prefix_causal_mask(m, n)  # (B, 1, I, I)
    b, q, kv = torch.meshgrid(torch.arange(len(m)), torch.arange(n), torch.arange(n), indexing="ij")
    direct = prefix_mask_mod(m)(b, torch.zeros_like(b), q, kv)  # every (b, q, kv) at once
    assert torch.equal(direct, dense[:, 0])
    # and as FlexAttention materialises it, and the BlockMask's own view of it
    assert torch.equal(create_mask(prefix_mask_mod(m), len(m), 1, n, n, device="cpu"), dense)
    bm = prefix_block_mask(m, n)
    assert isinstance(bm, BlockMask) and bm.shape == (len(m), 1, n, n)
    assert torch.equal(bm.to_dense().bool(), _block_view(dense, bm.BLOCK_SIZE))
    # the same tiles, full and partial, as FlexAttention's own create_block_mask finds by evaluating mask_mod
    ref = create_block_mask(prefix_mask_mod(m), len(m), None, n, n, device="cpu")
    for field in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(bm, field), getattr(ref, field)), field
    assert torch.equal(_tiles(bm, full=True), _tiles(ref, full=True))
    assert torch.equal(_tiles(bm, full=False), _tiles(ref, full=False))


def _tiles(bm: BlockMask, full: bool) -> torch.Tensor:
    """(B, H, nq, nk) bool: which key tiles each query tile visits (partial or full), order-free."""
    num, idx = (bm.full_kv_num_blocks, bm.full_kv_indices) if full else (bm.kv_num_blocks, bm.kv_indices)
    used = torch.arange(idx.shape[-1]) < num[..., None]
    out = torch.zeros(idx.shape, dtype=torch.bool)
    return out.scatter_(-1, idx.long(), used)


def _block_view(dense: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(B, 1, nq, nk): whether any element of each block may attend (what a BlockMask must visit)."""
    B, _, n, _ = dense.shape
    pq, pk = -n % block[0], -n % block[1]
    d = F.pad(dense, (0, pk, 0, pq))
    return d.unflatten(2, (-1, block[0])).unflatten(4, (-1, block[1])).any(dim=(3, 5))


@pytest.mark.parametrize("grid", GRIDS)
def test_flex_attention_forward_equals_sdpa_with_the_dense_mask(grid):
    n = grid[0] * grid[1]
    torch.manual_seed(0)
    attn = Attention(64, 2)
    x = torch.randn(4, n, 64)
    m = mixed_prefixes(n)
    with torch.no_grad():
        ref = attn(x, prefix_causal_mask(m, n))
        out = attn(x, prefix_block_mask(m, n))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grid,pos", [((16, 16), "learned"), ((7, 13), "sincos")])
def test_model_forward_flex_equals_sdpa_reference(grid, pos):
    """The whole model (encoder under the prefix mask, causal decoder, heads) at a fixed and a native grid."""
    torch.manual_seed(0)
    model = AIMv2(model_config("tiny", vocab_size=64, pos_embed=pos)).eval()
    h, w = grid
    images = torch.randn(4, 3, 14 * h, 14 * w)
    tokens = torch.randint(0, 64, (4, 9))
    m = mixed_prefixes(h * w)
    outs = {}
    for kind in ("sdpa", "flex"):
        model.set_attention(kind)
        with torch.no_grad():
            outs[kind] = model(images, tokens, m)
            loss, _ = model.training_loss(images, None, tokens, pad_id=0, prefix_len=m)
        outs[kind] += (loss,)
    for a, b in zip(outs["flex"], outs["sdpa"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _math_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(d) masked) v, written out: the reference for the reference."""
    s = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    return s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("grid", GRIDS)
def test_sdpa_reference_gradients_equal_plain_softmax_attention(grid):
    n = grid[0] * grid[1]
    m = mixed_prefixes(n)
    torch.manual_seed(0)
    q, k, v = (torch.randn(len(m), 2, n, 32, dtype=torch.float64, requires_grad=True) for _ in range(3))
    dense = prefix_causal_mask(m, n)
    go = torch.randn(len(m), 2, n, 32, dtype=torch.float64)
    grads = []
    for fn in (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), lambda: _math_attention(q, k, v, dense)):
        out = fn()
        grads.append((out, *torch.autograd.grad(out, (q, k, v), go)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=0)


def test_attention_choice_defaults_and_validation():
    assert resolve_attention("auto", "cpu") == "sdpa"
    assert resolve_attention("auto", "cuda") == "flex"
    assert resolve_attention("sdpa", "cuda") == "sdpa"
    model = AIMv2(model_config("tiny", vocab_size=64))
    m = sample_prefix_lengths(2, 256, torch.Generator().manual_seed(0))
    assert isinstance(model.prefix_mask(m, 256), torch.Tensor)  # auto on CPU: the dense reference
    model.set_attention("flex")
    assert isinstance(model.prefix_mask(m, 256), BlockMask)
    with pytest.raises(ValueError, match="attention must be one of"):
        model.set_attention("flash")


@pytest.mark.slow
def test_compiled_model_forward_with_flex_equals_reference():
    """torch.compile of the model with the BlockMask built eagerly outside the graph (prefix_block_mask is
    compiler-disabled), as the trainer's --compile runs it."""
    torch.manual_seed(0)
    model = AIMv2(model_config("tiny", vocab_size=64)).eval()
    images, tokens, m = torch.randn(4, 3, 224, 224), torch.randint(0, 64, (4, 9)), mixed_prefixes(256)
    model.set_attention("sdpa")
    with torch.no_grad():
        ref = model(images, tokens, m)
    model.set_attention("flex")
    # static shapes, fresh dynamo state: after other tests compiled this model at other sizes, dynamo would
    # mark dims dynamic, and inductor's CPU flex template fails to compile symbolic split sizes (torch 2.13)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, dynamic=False)(images, tokens, m)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [2, 91, 128, 129, 256, 400])
def test_block_mask_tiles_match_create_block_mask_for_random_prefixes(n):
    """Tile edges: fewer patches than one tile, exactly one tile, one past it, a partial last tile."""
    m = sample_prefix_lengths(8, n, torch.Generator().manual_seed(n))
    bm = prefix_block_mask(m, n)
    ref = create_block_mask(prefix_mask_mod(m), len(m), None, n, n, device="cpu")
    assert torch.equal(bm.kv_num_blocks, ref.kv_num_blocks) and torch.equal(bm.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert torch.equal(_tiles(bm, full=True), _tiles(ref, full=True))
    assert torch.equal(_tiles(bm, full=False), _tiles(ref, full=False))
