"""Probe speed: the two choices that make `aimv2 probe` cheap, each against its baseline in the same run.

1. head: our attention-pooling head (scores against W_k^T q, pool, then W_v) vs the textbook head that
   projects every token to k and v and calls torch SDPA: the same function (tests/test_probe.py), one
   training step (forward + backward + AdamW) of a whole sweep of heads on one batch.
2. cache: one probe epoch on cached features vs the same epoch when the frozen trunk re-encodes the
   images (what per-epoch augmentation would need).

    .venv/bin/python benchmarks/bench_probe.py [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from aimv2train.eval.probe import AttentionPoolingHead  # noqa: E402


class SdpaHead(AttentionPoolingHead):
    """The textbook form: k = W_k x, v = W_v x for every token, then SDPA with the learned query."""

    def pool(self, x, mask=None):
        return self.pool_sdpa(x, mask)


def step_time(cls, D, N, B, heads, sweep, classes, repeats):
    torch.manual_seed(0)
    hs = torch.nn.ModuleList(cls(D, classes, heads) for _ in range(sweep))
    opt = torch.optim.AdamW(hs.parameters(), lr=1e-3)
    x, y = torch.randn(B, N, D), torch.randint(0, classes, (B,))
    times = []
    for r in range(repeats + 1):
        t = time.perf_counter()
        torch.stack([F.cross_entropy(h(x), y) for h in hs]).sum().backward()
        opt.step()
        opt.zero_grad()
        if r:
            times.append(time.perf_counter() - t)
    return times


def bench_heads(repeats):
    rows = []
    for name, D, N, B, heads, sweep in (("tiny 64, 16 tokens", 64, 16, 256, 2, 14),
                                        ("B 768, 256 tokens", 768, 256, 16, 6, 4),
                                        ("L 1024, 256 tokens", 1024, 256, 8, 8, 2)):
        ours = step_time(AttentionPoolingHead, D, N, B, heads, sweep, 100, repeats)
        ref = step_time(SdpaHead, D, N, B, heads, sweep, 100, repeats)
        rows.append((name, B, sweep, min(ours), min(ref), min(ref) / min(ours),
                     statistics.median(ref) / statistics.median(ours)))
    print("\n| case | batch | heads in sweep | ours s/step | SDPA s/step | speed-up (best) | speed-up (median) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.1f}x | {r[6]:.1f}x |")


def bench_cache(repeats):
    import _probe_fixtures as fx

    from aimv2train.model.config import model_config
    from aimv2train.model.encoder import Encoder
    from aimv2train.model.interop import load_encoder, save_encoder
    from aimv2train.eval.probe import ProbeConfig, Standardize, SweepData, train_sweep
    from aimv2train.eval.probe_data import Features, Preprocess, encode, image_folder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tr, _ = fx.make_image_folder(tmp / "data", n_train=16, n_val=1)
        torch.manual_seed(0)
        save_encoder(Encoder(model_config("B", img_size=112).encoder), tmp / "b.pt")
        enc = load_encoder(tmp / "b.pt")
        ds = image_folder(tr)
        prep = Preprocess(resolution=112)
        t = time.perf_counter()
        rep = encode(enc, ds, tmp / "cache", prep, batch_size=16, progress=False)
        t_encode = time.perf_counter() - t
        f = Features(rep.cache)
        mean, var = f.token_stats()
        cfg = ProbeConfig(lrs=(1e-3,), wds=(0.05,), epochs=1, batch_size=16, warmup_epochs=0)
        data = SweepData(f.batch, f.labels, f.batch, f.labels)
        cached = []
        for _ in range(repeats):
            t = time.perf_counter()
            train_sweep("attentive", lambda: AttentionPoolingHead(768, 4, 6), Standardize(mean, var), data, cfg,
                        progress=False)
            cached.append(time.perf_counter() - t)
    per_epoch_reencode = t_encode + min(cached)
    print(f"\nB trunk (768 x 12) at 112 px, {len(f)} images, one probe epoch (+ its evaluation):")
    print("| epoch on cached features s | epoch re-encoding the images s | ratio |\n|---|---|---|")
    print(f"| {min(cached):.3f} | {per_epoch_reencode:.3f} | {per_epoch_reencode / min(cached):.0f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} timed repeats after a warm-up")
    bench_heads(args.repeats)
    bench_cache(args.repeats)


if __name__ == "__main__":
    main()
