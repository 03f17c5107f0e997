"""The loader end to end on a generated manifest: shapes, budget, no duplicates, bad-sample replacement,
captions/tokens, determinism across worker counts, exact mid-epoch resume, distributed slicing."""
import json

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from _loader_fixtures import build_manifest
from aimv2data.batch import denormalize, patchify
from aimv2data.loader import Loader, ManifestError
from aimv2data.loader.decode_pil import PilDecoder
from aimv2data.loader.geometry import cover

torch.set_num_threads(1)
P = 4                          # tiny patches keep native-resolution batches small and fast
CORRUPT = (5, 77, 301)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return build_manifest(tmp_path_factory.mktemp("loader"), n=480, seed=1, shards=3, patch_size=P,
                          aspects=[0.25, 0.5, 0.8, 1.0, 1.5, 2.0, 4.0], exif_every=9, corrupt=CORRUPT)


def _rows(manifest):
    return pl.read_parquet(manifest / "samples" / "part-0.parquet")


def _same(a, b):
    assert a.keys == b.keys and a.grid == b.grid and a.global_step == b.global_step and a.source_epoch == b.source_epoch
    assert a.captions == b.captions and a.replaced == b.replaced
    assert torch.equal(a.images, b.images)


def test_native_epoch_dense_constant_budget_no_duplicates(manifest):
    loader = Loader(manifest, mix="rows", native_res=True, batch_patches=4096, seed=0)
    table = json.loads((manifest / "_manifest.json").read_text())["buckets"]
    grids = {(a, tuple(b["grids"][str(a)])) for b in table for a in (128, 256, 512, 1024, 2048, 4096)}
    n_steps = len(loader)
    keys, used, replaced = [], 0, []
    corrupt_keys = set(_rows(manifest)[list(CORRUPT)]["key"])
    by_bucket = dict(_rows(manifest).select("key", "bucket").iter_rows())
    bucket_keys = {}
    for k, b in by_bucket.items():
        bucket_keys.setdefault(b, set()).add(k)
    for batch in loader:
        h, w = batch.grid
        b = len(batch)
        assert batch.images.shape == (b, 3, h * P, w * P) and batch.images.dtype == torch.uint8
        assert b * batch.area == 4096 and h * w <= batch.area
        assert (batch.area, (h, w)) in grids
        assert batch.padding == 0.0
        keys += batch.keys
        used += b * h * w
        replaced += batch.replaced
    assert loader.segment == 1 and loader.offset == 0
    # every sample at most once an epoch; a replacement (a random row of the same bucket) may repeat one
    assert len(keys) - len(set(keys)) <= len(replaced) and replaced
    assert not corrupt_keys & set(keys)                            # bad samples never reach a batch
    assert {k for k, _ in replaced} <= corrupt_keys and loader.stats["replaced"] == len(replaced)
    # the stream's epoch ends when no bucket holds B = C/A rows at the step's area: fewer than
    # C/128 = 32 rows of a bucket are left over (they wait for the next epoch)
    counts = _rows(manifest).group_by("bucket").len()
    served = {}
    for k in set(keys) - corrupt_keys:
        b = by_bucket[k]
        served[b] = served.get(b, 0) + 1
    for b, n in counts.iter_rows():
        assert 0 <= n - served.get(b, 0) - len(corrupt_keys & bucket_keys[b]) < 32
    assert used / (n_steps * 4096) >= 0.95                         # budget use


@pytest.mark.parametrize("native", [True, False])
def test_batches_do_not_depend_on_the_order_of_manifest_rows(tmp_path, manifest, native):
    """A fetch writes a shard's samples in download-completion order, so two fetches of one url list give
    manifests with the same rows in another order (and other files): same seed, same batches."""
    import shutil

    other = tmp_path / "manifest"
    shutil.copytree(manifest, other)
    rows = _rows(manifest).sample(fraction=1.0, shuffle=True, seed=3)
    (other / "samples" / "part-0.parquet").unlink()
    rows[:100].write_parquet(other / "samples" / "part-9.parquet")   # split across files, reversed
    rows[100:].write_parquet(other / "samples" / "part-1.parquet")
    (tmp_path / "tars").symlink_to(manifest.parent / "tars")          # the rows name ../tars/NNNNN.tar
    kw = dict(native_res=True, batch_patches=4096) if native else dict(resolution=32, batch_size=16)
    a, b = Loader(manifest, mix="rows", seed=5, **kw), Loader(other, mix="rows", seed=5, **kw)
    for _, x, y in zip(range(6), a, b):
        _same(x, y)


def test_batch_pixels_come_from_the_named_sample_and_patches_are_raster_order(manifest):
    loader = Loader(manifest, mix="rows", native_res=True, batch_patches=4096, seed=4)
    batch = next(iter(loader))
    rows = _rows(manifest)
    key = batch.keys[0]
    r = rows.filter(pl.col("key") == key).row(0, named=True)
    data = (manifest / r["shard"]).resolve().read_bytes()[r["offset"]:r["offset"] + r["size"]]
    h, w = batch.grid
    ref = PilDecoder().decode(data, cover(r["width"], r["height"], w * P, h * P))
    got = batch.images[0].permute(1, 2, 0).numpy()
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    # patches: raster order over the grid, each patch (row, col, channel)
    x = batch.images
    pt = batch.patches
    assert pt.shape == (len(batch), h * w, P * P * 3)
    assert torch.equal(pt[:, 0], x[:, :, :P, :P].permute(0, 2, 3, 1).reshape(len(batch), -1))
    assert torch.equal(pt[:, w], x[:, :, P:2 * P, :P].permute(0, 2, 3, 1).reshape(len(batch), -1))
    assert torch.equal(pt[:, 1], x[:, :, :P, P:2 * P].permute(0, 2, 3, 1).reshape(len(batch), -1))
    assert torch.equal(patchify(x, P), pt)


def test_fixed_resolution_epoch(manifest):
    loader = Loader(manifest, mix="rows", resolution=32, batch_size=20, seed=0)
    assert len(loader) == 480 // 20
    keys = []
    for batch in loader:
        assert batch.images.shape == (20, 3, 32, 32) and batch.grid == (8, 8)
        keys += batch.keys
    assert len(keys) == 480 and loader.stats["replaced"] == len(CORRUPT)    # every row is scheduled once
    assert len(set(keys)) >= 480 - 2 * len(CORRUPT)


def test_worker_processes_give_the_same_batches_in_step_order(manifest):
    a = list(Loader(manifest, mix="rows", native_res=True, batch_patches=4096, seed=2, workers=0))
    b = list(Loader(manifest, mix="rows", native_res=True, batch_patches=4096, seed=2, workers=2))
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
        _same(x, y)


@pytest.mark.parametrize("native,workers", [(True, 0), (False, 2)])
def test_resume_mid_epoch_is_exact(manifest, native, workers):
    kw = dict(native_res=True, batch_patches=4096) if native else dict(resolution=32, batch_size=16)
    full = Loader(manifest, mix="rows", seed=9, workers=workers, **kw)
    epoch0 = list(full)
    epoch1 = list(full)                                        # second epoch: a new permutation
    assert [b.keys for b in epoch0] != [b.keys for b in epoch1]
    stop = len(epoch0) - 3

    first = Loader(manifest, mix="rows", seed=9, workers=workers, **kw)
    for i, _batch in enumerate(first):
        if i == stop - 1:
            break
    state = json.loads(json.dumps(first.state_dict()))        # a checkpoint survives JSON
    assert (state["segment"], state["offset"]) == (0, stop)

    resumed = Loader(manifest, mix="rows", seed=9, workers=workers, **kw)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    expected = epoch0[stop:] + epoch1
    assert len(rest) == len(expected)
    for x, y in zip(rest, expected):
        _same(x, y)
    assert resumed.stats["batches"] == len(epoch0) + len(epoch1)


def test_a_state_saved_before_the_renames_resumes_alike(manifest):
    """Issue 23 point 4: the state's "epoch"/"step" (segment, offset in it) are "segment"/"offset" now;
    checkpoints written before keep resuming at the same batch."""
    kw = dict(mix="rows", native_res=True, batch_patches=4096, seed=5)
    first = Loader(manifest, **kw)
    for i, _batch in enumerate(first):
        if i == 2:
            break
    state = first.state_dict()
    assert "epoch" not in state and "step" not in state
    old = {("epoch" if k == "segment" else "step" if k == "offset" else k): v for k, v in state.items()}
    now, before = Loader(manifest, **kw), Loader(manifest, **kw)
    now.load_state_dict(state)
    before.load_state_dict(old)
    assert before.offset == now.offset == 3
    x, y = next(iter(now)), next(iter(before))
    _same(x, y)
    assert x.global_step == 3


def test_resume_refuses_a_different_configuration(manifest):
    state = Loader(manifest, mix="rows", native_res=True, batch_patches=4096, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        Loader(manifest, mix="rows", native_res=True, batch_patches=4096, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_patches"):
        Loader(manifest, mix="rows", native_res=True, batch_patches=8192, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="mix"):
        Loader(manifest, mix="dfn=1,coyo=1", native_res=True, batch_patches=4096, seed=1).load_state_dict(state)
    old = {k: v for k, v in state.items() if k not in ("version", "snapshot", "t", "served", "mix")}
    fresh = Loader(manifest, mix="rows", native_res=True, batch_patches=4096, seed=1)
    with pytest.raises(ValueError, match="saved by an older loader.*--init"):
        fresh.load_state_dict(old)
    assert (fresh.segment, fresh.offset) == (0, 0)                   # nothing changed


def test_ranks_share_the_area_and_read_disjoint_shares(tmp_path):
    m = build_manifest(tmp_path, n=480, seed=1, shards=3, patch_size=P, aspects=[1.0], parts=8,
                       by_source=True)
    ranks = [Loader(m, native_res=True, batch_patches=4096, seed=3, rank=r, world_size=2) for r in (0, 1)]
    shares = [r.share_info() for r in ranks]
    for src in ("dfn", "coyo", "hqitp"):
        a, b = shares[0][src], shares[1][src]
        assert not set(a["chunks"]) & set(b["chunks"])          # a chunk is read by one rank
        assert a["rows"] + b["rows"] == 160 and min(a["rows"], b["rows"]) >= 40
    assert ranks[0].stats["rows_read"] + ranks[1].stats["rows_read"] == 480
    keys = []
    for _, x, y in zip(range(12), ranks[0], ranks[1]):
        assert x.area == y.area and x.global_step == y.global_step              # one area per step for all ranks
        assert len(x) * x.area == len(y) * y.area == 4096        # constant patches per batch
        assert len({s for s in x.sources}) == 1 and set(x.sources) == set(y.sources)   # one source a step
        keys += x.keys + y.keys
    assert len(keys) == len(set(keys))                          # disjoint shares


def test_captions_follow_the_mix_and_tokens_are_padded(manifest):
    rows = _rows(manifest).to_dicts()
    by_key = {r["key"]: r for r in rows}

    def tok(text):
        return [ord(c) for c in text] * 10                      # long: must be cut at 77

    loader = Loader(manifest, mix="rows", resolution=32, batch_size=40, tokenizer=tok, pad_id=-1,
                    caption_mix={"dfn": 0.0, "coyo": 1.0, "hqitp": 1.0})
    n_syn = 0
    for batch in loader:
        assert batch.tokens.shape == (40, 77) and batch.tokens.dtype == torch.int64
        for key, src, cap, t in zip(batch.keys, batch.sources, batch.captions, batch.tokens):
            r = by_key[key]
            assert src == r["source"]
            if src == "dfn":                                  # P(alt) = 0: synthetic when there is one
                assert cap in r["syn_demo"]
                n_syn += 1
            elif r["caption"]:
                assert cap == r["caption"]
            elif r["syn_demo"]:                               # no alt-text: falls back to synthetic
                assert cap in r["syn_demo"]
            else:
                assert cap == ""
            ids = tok(cap)[:77]
            assert t[:len(ids)].tolist() == ids and (t[len(ids):] == -1).all()
    assert n_syn > 100


def test_default_mix_is_table2(manifest):
    from aimv2data.loader.captions import table2_mix

    mix = table2_mix()
    assert mix["dfn"] == 0.5 and mix["coyo"] == 1.0 and mix["hqitp"] == pytest.approx(28 / 31)
    loader = Loader(manifest, mix="rows", resolution=32, batch_size=40, seed=0)
    rows = {r["key"]: r for r in _rows(manifest).to_dicts()}
    alt = syn = 0
    for _epoch in range(3):
        for batch in loader:
            for k, cap in zip(batch.keys, batch.captions):
                r = rows[k]
                if r["source"] == "dfn" and r["caption"]:
                    alt += cap == r["caption"]
                    syn += cap in r["syn_demo"]
    assert 0.4 < alt / (alt + syn) < 0.6


def test_manifest_errors_say_what_is_wrong(tmp_path, manifest):
    with pytest.raises(ManifestError, match="_manifest.json not found"):
        Loader(tmp_path)
    bad = tmp_path / "m"
    (bad / "samples").mkdir(parents=True)
    (bad / "_manifest.json").write_text((manifest / "_manifest.json").read_text())
    _rows(manifest).drop("offset").write_parquet(bad / "samples" / "part-0.parquet")
    with pytest.raises(ManifestError, match=r"missing columns \['offset'\]"):
        Loader(bad)
    meta = json.loads((manifest / "_manifest.json").read_text())
    del meta["buckets"]
    (bad / "_manifest.json").write_text(json.dumps(meta))
    _rows(manifest).write_parquet(bad / "samples" / "part-0.parquet")
    with pytest.raises(ManifestError, match="no `buckets` table"):
        Loader(bad, native_res=True, batch_patches=4096)


def test_a_bucket_of_only_bad_samples_fails_loudly(tmp_path):
    m = build_manifest(tmp_path, n=40, aspects=[1.0], patch_size=P, corrupt=tuple(range(40)))
    loader = Loader(m, resolution=16, batch_size=4, max_replacements=3)
    with pytest.raises(RuntimeError, match="still fail to decode after 3 replacements"):
        next(iter(loader))


def test_missing_shard_is_replaced_and_named(tmp_path):
    m = build_manifest(tmp_path, n=60, aspects=[1.0, 2.0], patch_size=P, shards=3)
    (tmp_path / "tars" / "00001.tar").unlink()
    loader = Loader(m, resolution=16, batch_size=10)
    keys = [k for b in loader for k in b.keys]
    assert not any(k.startswith("00001") for k in keys)
    assert loader.stats["replaced"] > 0
    assert "cannot open shard" in loader.stats["replaced_keys"][0][1]


def test_images_are_uint8_and_the_model_normalises_them_with_clip_mean_std(manifest):
    """Issue 22 point 1: batches leave the loader as uint8 (a quarter of float32's bytes through shared
    memory, pinning and the host-to-device copy); normalize / normalize_patches (what the model applies on
    the device) give the CLIP mean/std values the float32 batches had."""
    from aimv2data.batch import MEAN, STD, normalize, normalize_patches

    batch = next(iter(Loader(manifest, mix="rows", resolution=32, batch_size=8)))
    assert batch.images.dtype == torch.uint8 and batch.patches.dtype == torch.uint8
    assert batch.images.permute(0, 2, 3, 1).is_contiguous()        # channels-last, as both decoders fill it
    x = normalize(batch.images)
    again = (batch.images.double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1).double()) / \
        torch.tensor(STD).view(1, 3, 1, 1).double()
    assert x.dtype == torch.float32 and x.is_contiguous()
    assert torch.allclose(x.double(), again, atol=1e-5)
    assert torch.allclose(normalize_patches(batch.patches), patchify(x, P), atol=1e-6)
    assert torch.equal(denormalize(x), batch.images)
    moved = batch.to("cpu")
    assert moved.images.dtype == torch.uint8 and moved.images.stride() == batch.images.stride()
    Image.fromarray(batch.images[0].permute(1, 2, 0).numpy())   # a viewable picture
