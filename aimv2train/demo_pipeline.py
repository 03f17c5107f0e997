"""The demo pipeline: the main job end to end on the embedded demo corpus (aimv2data.demo_corpus),
offline, as a resumable list of steps. `aimv2 demo` (cli/demo.py) parses flags and prints the table;
benchmarks/bench_demo_probe.py reuses `probe_trunk`, `random_trunk` and `TRAIN_FIXED`.

The demo is a list of steps; each knows whether it is already done (so a rerun skips it) and how
to run. Add a step by appending to STEPS. Steps that need the corpus on the web ask the context
for the loopback server, which starts on first use and stops when the demo ends.

This module sits above the three wings (model, train, eval) and may import all of them.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import time
from pathlib import Path
from typing import Callable, Iterator

from aimv2data.atomic import write_json_atomic
from aimv2data.fetch import FetchError, FetchIncomplete
from aimv2data.manifest.build import ManifestBuildError
from aimv2data.manifest.captions import CaptionError
from aimv2data.manifest.layout import read_manifest_json

from .eval.probe_data import ProbeDataError
from .model.aimv2 import LOSS_TERMS
from .eval.export import ExportError
from .eval.weights import WeightsError
from .train.trainer import TrainError

# what a step raises for bad input or an incomplete outside job: the demo stops, a rerun resumes
STEP_ERRORS = (FetchError, FetchIncomplete, ManifestBuildError, CaptionError, TrainError, ExportError, WeightsError,
               ProbeDataError)


class DemoContext:
    def __init__(self, out: Path, console):
        self.out, self.console = out, console
        self.corpus_dir = out / "corpus"
        self._server = None
        self._lists: dict[str, Path] | None = None

    def url_lists(self) -> dict[str, Path]:
        """Serve corpus/images on loopback and (re)write the url lists for its address. The port of
        the last run is tried first so a resumed fetch sees the same urls; when it is taken, the
        lists change and fetch outputs left incomplete by the earlier run are started over."""
        if self._lists is not None:
            return self._lists
        from aimv2data.demo_corpus import N_PATTERNS, write_url_lists
        from aimv2data.serve import LoopbackServer

        state_path = self.out / "demo_state.json"
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        srv = None
        for port in ([state["port"]] if state.get("port") else []) + [0]:
            try:
                srv = LoopbackServer(directory=self.corpus_dir / "images", port=port).start()
                break
            except OSError:
                continue
        self._server = srv
        if state.get("base_url") != srv.base_url:
            for step in STEPS:
                d = self.out / step.output
                if step.name.startswith("fetch") and d.is_dir() and not step.done(self):
                    shutil.rmtree(d)  # an incomplete fetch of the old urls: the demo owns it
        self._lists = write_url_lists(self.corpus_dir, srv.base_url, n_patterns=N_PATTERNS)
        write_json_atomic({"port": srv.port, "base_url": srv.base_url}, state_path, indent=None)
        self.console.print(f"serving {self.corpus_dir / 'images'} at {srv.base_url}")
        return self._lists

    def close(self):
        if self._server is not None:
            self._server.stop()


@dataclasses.dataclass
class Step:
    name: str
    output: str                                  # under -o/--output
    done: Callable[[DemoContext], bool]
    run: Callable[[DemoContext], str]            # returns a one-line result


# -- corpus ------------------------------------------------------------------------------------
def _corpus_done(ctx: DemoContext) -> bool:
    return (ctx.corpus_dir / "corpus.json").is_file()


def _corpus_run(ctx: DemoContext) -> str:
    from aimv2data.demo_corpus import N_PATTERNS, all_images, write_corpus

    write_corpus(ctx.corpus_dir, n_patterns=N_PATTERNS)
    images = all_images(n_patterns=N_PATTERNS)
    return (f"{len(images)} images ({sum(len(i.data) for i in images) / 1e6:.1f} MB; {N_PATTERNS} of them small "
            "patterns), captions in corpus.json")


# -- fetch -------------------------------------------------------------------------------------
def _summary(d: Path) -> dict | None:
    try:
        return json.loads((d / "fetch_summary.json").read_text())
    except (OSError, ValueError):
        return None


def _fetch_step(name: str, source: str) -> Step:
    output = f"fetch_{source}"

    def done(ctx):
        s = _summary(ctx.out / output)
        return bool(s and s.get("complete"))

    def run(ctx):
        from aimv2data.fetch import FetchOptions, fetch

        lists = ctx.url_lists()
        opts = FetchOptions(source=source, output=str(ctx.out / output), processes=2, threads=16, shard_size=32,
                            url_lists=[str(lists["coyo" if source == "coyo" else "dfn_pool"])],
                            dfn_index=str(lists["dfn_index"]) if source == "dfn" else None, timeout=5,
                            allow_private_addresses=True)   # the corpus is served on 127.0.0.1
        s = fetch(opts, console=ctx.console)
        return _fetch_line(s)

    return Step(name, output, done, run)


def _fetch_line(s: dict) -> str:
    fails = ", ".join(f"{k} {v}" for k, v in s["failures_by_reason"].items()) or "none"
    return (f"{s['samples']['success']}/{s['samples']['attempted']} images in {s['shards']['done']} shards; "
            f"failures: {fails}")


# -- shard, captions, tokenizer -----------------------------------------------------------------
def _manifest_json(ctx: DemoContext) -> dict | None:
    return read_manifest_json(ctx.out / "manifest")


def _shard_run(ctx: DemoContext) -> str:
    from aimv2data.manifest.build import build_manifest

    r = build_manifest([str(ctx.out / "fetch_coyo"), str(ctx.out / "fetch_dfn")], ctx.out / "manifest", workers=2)
    m = _manifest_json(ctx)
    return (f"{m['counts']['samples']} samples in {len(m['counts']['per_bucket'])} aspect buckets, "
            f"{m['counts']['rejects']} rejects; {r['seconds']:.1f} s")


def _captions_done(ctx: DemoContext) -> bool:
    m = _manifest_json(ctx)
    return bool(m and "synthetic" in m.get("caption_sets", {}))


def _captions_run(ctx: DemoContext) -> str:
    from aimv2data.demo_corpus import N_PATTERNS, write_synthetic_captions
    from aimv2data.manifest.captions import attach

    path = write_synthetic_captions(ctx.corpus_dir, n_patterns=N_PATTERNS)
    r = attach(ctx.out / "manifest", path, on="sha256", column="re_caption", name="synthetic")
    return (f"syn_synthetic: {r['matched_rows']} of {r['matched_rows'] + r['unmatched_rows']} samples matched "
            f"on sha256, {r['captions']} captions ({path.name})")


def _tokenizer_run(ctx: DemoContext) -> str:
    from aimv2train.train.tokenizer import train_tokenizer

    r = train_tokenizer(ctx.out / "manifest", ctx.out / "tok.model", vocab_size=512, soft_limit=True)
    return f"sentencepiece, {r.vocab_size} pieces from {r.sentences} captions"


# -- training ----------------------------------------------------------------------------------
def _run_done(name: str) -> Callable[[DemoContext], bool]:
    def done(ctx):
        try:
            return json.loads((ctx.out / name / "summary.json").read_text()).get("status") == "done"
        except (OSError, ValueError):
            return False
    return done


def _train_step(name: str, init_run: str | None = None, **kw) -> Step:
    def run(ctx):
        from aimv2train.train.plot import plot_runs
        from aimv2train.train.trainer import TrainConfig, train

        cfg = TrainConfig(manifest=str(ctx.out / "manifest"), tokenizer=str(ctx.out / "tok.model"),
                          out=str(ctx.out / name), model="tiny", workers=1, seed=0,
                          resume=(ctx.out / name / "checkpoints").is_dir(),
                          init=str(ctx.out / init_run) if init_run else None, **kw)
        s = train(cfg)
        if s["status"] != "done":  # a signal: the trainer saved and stopped; this step and the ones after wait
            raise DemoInterrupted(name, signal.Signals[s.get("signal") or "SIGTERM"])
        plot_runs([ctx.out / name])
        terms = ", ".join(f"{short} {s[k + '_end']:.3f}" for k, (short, _) in LOSS_TERMS.items())
        return f"{s['step']} steps, loss {s['loss_start']:.3f} -> {s['loss_end']:.3f} ({terms}); plots in {name}/"
    return Step(name, name, _run_done(name), run)


# -- probe -------------------------------------------------------------------------------------
# Stage 1 of the demo (see STEPS); benchmarks/bench_demo_probe.py retrains it with other seeds.
TRAIN_FIXED = dict(steps=1200, resolution=56, batch_size=16)
PROBE_RUNS = ("train_fixed", "train_native")


def _probe_done(ctx: DemoContext) -> bool:
    return (ctx.out / "probe" / "summary.json").is_file()


# the same short sweep for every trunk; Table A2's full grid is `aimv2 probe`'s default
PROBE_SWEEP = dict(lrs=(1e-3, 3e-3, 1e-2), wds=(0.05,), epochs=100, batch_size=32, warmup_epochs=0)


def probe_trunk(ckpt, train_dir, val_dir, cache_dir, dest) -> dict:
    """The demo's probe of one trunk: full results to `dest`, the headline numbers returned."""
    from aimv2train.eval.probe import ProbeConfig, ProbeJob, run_probe, write_results

    job = ProbeJob(str(ckpt), str(train_dir), str(val_dir), cache_dir=str(cache_dir), progress=False)
    r = run_probe(job, ProbeConfig(**PROBE_SWEEP), log=lambda *a: None)
    write_results(r, dest)
    return {"attentive_top1": r["attentive"]["best"]["top1"], "linear_top1": r["linear"]["best"]["top1"],
            "preprocess": r["preprocess"]["mode"], "results": str(dest), "chance_top1": r["chance_top1"],
            "classes": r["classes"], "images": {"train": r["train"]["images"], "val": r["val"]["images"]}}


def random_trunk(path, img_size: int, pos_embed: str = "learned", seed: int = 0):
    """A randomly initialised tiny encoder, the baseline a trained trunk has to beat."""
    import torch

    from aimv2train.model.config import model_config
    from aimv2train.model.encoder import Encoder
    from aimv2train.model.interop import save_encoder

    torch.manual_seed(seed)
    return save_encoder(Encoder(model_config("tiny", img_size=img_size, pos_embed=pos_embed).encoder), path)


def _probe_run(ctx: DemoContext) -> str:
    """The issue-7 yardstick on the demo itself: attentive and linear probes on a labelled set of the
    pattern family (fresh draws, never trained on), for both demo trunks and randomly initialised trunks
    of the same architectures. Each run's results go to RUN/probe.json, where `aimv2 export` finds them."""
    from aimv2data.demo_corpus import write_probe_set
    from aimv2train.eval.weights import load_weights
    from aimv2train.eval.probe import write_results

    out = ctx.out / "probe"
    train_dir, val_dir = write_probe_set(out / "patterns")
    img_size = load_weights(ctx.out / "train_fixed").cfg.img_size
    trunks = {name: (ctx.out / name, ctx.out / name / "probe.json") for name in PROBE_RUNS}
    for name, pos in (("random_init", "learned"), ("random_init_native", "sincos")):  # baselines of each kind
        trunks[name] = (random_trunk(out / f"{name}.pt", img_size, pos), out / f"{name}_probe.json")
    summary = {}
    for name, (ckpt, dest) in trunks.items():
        r = probe_trunk(ckpt, train_dir, val_dir, out / "cache", dest)
        summary[name] = {k: r[k] for k in ("attentive_top1", "linear_top1", "preprocess", "results")}
        ctx.console.print(f"{name}: attentive {r['attentive_top1']:.0f}%, linear {r['linear_top1']:.0f}% "
                          f"({r['preprocess']} resolution)")
    summary.update(chance_top1=r["chance_top1"], classes=r["classes"], images=r["images"])
    write_results(summary, out / "summary.json")
    return _probe_line(summary)


def _probe_line(s: dict) -> str:
    f = lambda k: f"{s[k]['attentive_top1']:.0f}/{s[k]['linear_top1']:.0f}%"  # noqa: E731
    return (f"patterns, {len(s['classes'])} classes (chance {s['chance_top1']:.0f}%), attentive/linear top-1: "
            f"train_fixed {f('train_fixed')} (random init {f('random_init')}), "
            f"train_native {f('train_native')} (random init {f('random_init_native')})")


def _export_run(ctx: DemoContext) -> str:
    from aimv2train.eval.export import export

    r = export(ctx.out / "train_native", "hf", ctx.out / "export_hf", overwrite=True)
    return f"transformers Aimv2VisionModel folder (step {r['step']})"


def _summary_line(ctx: DemoContext, step: Step) -> str:
    """What a finished step reports when a rerun skips it."""
    if step.name.startswith("fetch"):
        return _fetch_line(_summary(ctx.out / step.output))
    if step.name == "probe":
        try:
            return _probe_line(json.loads((ctx.out / "probe" / "summary.json").read_text()))
        except (OSError, ValueError, KeyError):
            return ""
    if step.name.startswith("train"):
        try:
            s = json.loads((ctx.out / step.output / "summary.json").read_text())
            return f"{s['step']} steps, loss {s['loss_start']:.3f} -> {s['loss_end']:.3f}"
        except (OSError, ValueError, KeyError):
            return ""
    return ""


STEPS: list[Step] = [
    Step("corpus", "corpus", _corpus_done, _corpus_run),
    _fetch_step("fetch-coyo", "coyo"),
    _fetch_step("fetch-dfn", "dfn"),
    Step("shard", "manifest", lambda ctx: _manifest_json(ctx) is not None, _shard_run),
    Step("captions", "manifest", _captions_done, _captions_run),
    Step("tokenizer", "tok.model", lambda ctx: (ctx.out / "tok.model").is_file(), _tokenizer_run),
    # Stage 1 (Table A1, scaled to a 2-core CPU): fixed resolution, RandomResizedCrop, learned positions.
    # 56 px and 1200 steps: the least that learns the patterns well enough to beat a random trunk's
    # probe by a wide margin (docs/eval.md); 300 steps at 84 px only memorised the images.
    _train_step("train_fixed", **TRAIN_FIXED),
    # Native resolution (paper §2.4): area-sampled constant-patch batches, sin-cos positions.
    _train_step("train_native", steps=40, native_res=True, batch_patches=4096, init_run="train_fixed"),
    Step("probe", "probe", _probe_done, _probe_run),
    Step("export", "export_hf", lambda ctx: (ctx.out / "export_hf" / "config.json").is_file(), _export_run),
]


@dataclasses.dataclass
class StepResult:
    name: str
    skipped: bool          # already done by an earlier run
    seconds: float
    output: Path
    detail: str            # the step's one-line result


class DemoStepFailed(RuntimeError):
    """A step raised one of STEP_ERRORS; `step` names it, the cause is chained."""

    def __init__(self, step: str, cause: Exception):
        super().__init__(f"demo step {step} failed: {cause}")
        self.step = step


class DemoInterrupted(KeyboardInterrupt):
    """SIGTERM / SIGINT stopped step `step` before it finished: the demo stops there, the step is not done
    (a rerun resumes it), and `aimv2 demo` exits 128 + `signum` like every interrupted command."""

    def __init__(self, step: str, signum: int):
        super().__init__(f"demo step {step} interrupted by {signal.Signals(signum).name}")
        self.step, self.signum = step, signum


def run_demo(out: str | Path, console) -> Iterator[StepResult]:
    """Run (or resume) every step of STEPS under `out`, yielding each step's result as it ends.
    `console` is a rich Console (step headers, the loopback address, probe lines). A step stopped by a
    signal raises DemoInterrupted (a KeyboardInterrupt): no later step runs."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(root, console)
    try:
        for step in STEPS:
            if step.done(ctx):
                yield StepResult(step.name, True, 0.0, root / step.output, _summary_line(ctx, step))
                continue
            console.rule(f"[bold]{step.name}")
            t0 = time.perf_counter()
            try:
                detail = step.run(ctx)
            except STEP_ERRORS as e:
                if getattr(e, "signal_number", None):  # fetch stopped by a signal (FetchIncomplete)
                    raise DemoInterrupted(step.name, e.signal_number) from e
                raise DemoStepFailed(step.name, e) from e
            yield StepResult(step.name, False, time.perf_counter() - t0, root / step.output, detail)
    finally:
        ctx.close()
