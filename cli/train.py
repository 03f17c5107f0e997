import dataclasses
import typing

import click

from aimv2train.train.config import TrainConfig
from cli.config_file import config_file_option
from cli.flags import option

_PATHS = {"dir": dict(file_okay=False), "existing": dict(exists=True),
          "existing_dir": dict(exists=True, file_okay=False), "existing_file": dict(exists=True, dir_okay=False)}


def config_options(cls):
    """Click options generated from a config dataclass's fields and their metadata (train/config.py):
    the flag is the field name with dashes, the default and type are the field's, required when it
    has no default (checked by the command, `check_required`: `--dry-run` needs none); `choices`, `path`,
    `short`, `name` (another flag name) and `old` (older spellings, cli/flags.py) refine it."""
    hints = typing.get_type_hints(cls)

    def decorate(f):
        for fl in reversed(dataclasses.fields(cls)):
            meta = fl.metadata
            if meta.get("cli", True) is False:
                continue
            kind = next((t for t in typing.get_args(hints[fl.name]) if t is not type(None)), hints[fl.name])
            required = fl.default is dataclasses.MISSING
            names = [meta.get("name", "--" + fl.name.replace("_", "-"))]
            names += [meta["short"]] if "short" in meta else []
            kw = dict(help=meta["help"] + (" [required, except with --dry-run]" if required else ""),
                      **({"metavar": meta["metavar"]} if "metavar" in meta else {}))
            if kind is bool:
                kw.update(is_flag=True, flag_value=not fl.default, default=fl.default)
            else:
                kw.update(default=None if required else fl.default, type=kind,
                          show_default=not required and fl.default is not None)
                if "choices" in meta:
                    kw["type"] = click.Choice(list(meta["choices"]))
                elif "path" in meta:
                    kw["type"] = click.Path(**_PATHS[meta["path"]])
            f = option(*names, fl.name, old=meta.get("old", ()), **kw)(f)
        return f
    return decorate


def check_required(cls, settings: dict) -> None:
    """Click's own error for a required option left out (the fields without a default)."""
    ctx = click.get_current_context()
    missing = {fl.name for fl in dataclasses.fields(cls) if fl.default is dataclasses.MISSING
               and settings.get(fl.name) is None}
    for param in ctx.command.params:
        if param.name in missing:
            raise click.MissingParameter(ctx=ctx, param=param)


@click.command()
@config_file_option(section="train")
@config_options(TrainConfig)
def train(**settings):
    """Pre-train (or adapt) an AIMv2 encoder with its multimodal decoder.

    \b
    One process:  aimv2 train -m MANIFEST -t tok.model --model tiny --steps 300 -R 112 -B 16 -o RUN
    Several:      torchrun --nproc_per_node 8 -m cli.main train ... [--parallel fsdp]
    From a file:  aimv2 train --config configs/L/pretrain.toml -m MANIFEST -t tok.model -o RUN
    Plan only:    WORLD_SIZE=32 aimv2 train --config configs/L/native.toml --device cuda --dry-run
    Curves:       aimv2 plot RUN
    """
    from aimv2train.train.rundir import start_problem

    if not settings["dry_run"]:
        check_required(TrainConfig, settings)
    cfg = TrainConfig(**settings)
    if not cfg.dry_run and (problem := start_problem(cfg.manifest, cfg.val_manifest, cfg.out, cfg.resume)):
        raise click.ClickException(problem)   # before the imports below (torch: up to a minute on a busy machine)
    s = _run(cfg)
    if s["rank"] != 0:  # under torchrun, one summary; but every rank's exit code (a requeue reads any of them)
        if s["status"] == "interrupted":
            raise SystemExit(s["exit_code"])
        return
    if s["status"] == "dry_run":
        _print_plan(s["plan"])
        click.echo(s["plan"].verdict())
        return
    from rich.console import Console

    Console().print(_summary_table(s))
    if s["status"] == "interrupted":  # 130 (SIGINT) / 143 (SIGTERM): resumable, not finished (docs/contracts.md)
        raise SystemExit(s["exit_code"])


def _run(cfg: TrainConfig) -> dict:
    """The training run, its errors mapped to the command's exit codes (docs/contracts.md)."""
    from aimv2train.train.trainer import NonFiniteLoss, TrainError, WontFit
    from aimv2train.train.trainer import train as run
    try:
        return run(cfg)
    except WontFit as e:  # the plan, then the one line
        _print_plan(e.plan)
        raise click.ClickException(str(e)) from None
    except NonFiniteLoss as e:
        click.secho(f"aimv2 train: {e}", fg="red", err=True)  # unwrapped: the path must stay copyable
        raise SystemExit(3) from None
    except (TrainError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None


def _summary_table(s: dict):
    """Rank 0's end-of-run summary: what ran, how it went, where it is."""
    from rich.table import Table

    t = Table(title=f"aimv2 train: {s['status']} at step {s['step']}/{s['steps']}", show_header=False)
    for key in ("model", "stage", "data", "world", "devices", "precision", "lr", "weight_decay", "init",
                "resumed_from"):
        if s.get(key) is not None:
            t.add_row(key, str(s[key]))
    if "loss_end" in s:
        _add_loss_rows(t, s)
    if s.get("compile"):
        c = s["compile"]
        warm = (f"; warm-up {c['warmup_shapes']} shapes in {c['warmup_seconds']:.0f} s, after it "
                f"{c['graphs_after_warmup']} graphs / {c['recompiles_after_warmup']} recompiles" if "warmup_shapes" in c else "")
        t.add_row("compile", f"{c['graphs']} graphs ({c['scope']}{', dynamic' if c['dynamic'] else ''}), "
                  f"{c['recompiles']} recompiles, {c['seconds']:.0f} s compiling (rank 0){warm}")
    if "replaced" in s:
        split = (f" ({s['replaced_unreachable']} because the store did not answer, {s['replaced_damaged']} missing "
                 "or damaged)" if s.get("replaced_unreachable") else "")
        t.add_row("replaced", f"{s['replaced']} of {s['draws']} samples drawn ({100 * s['replaced_share']:.1f}%) "
                  f"could not be read or decoded and were replaced{split}")
    if s.get("caption_shares"):
        t.add_row("captions", "; ".join(f"{src or 'all'} " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in per.items())
                                        for src, per in s["caption_shares"].items()))
    saved = str(s.get("checkpoint"))
    if s.get("save_time") is not None:  # what a scheduler's preemption notice must leave room for (docs/train.md)
        saved += f" (written in {s['save_time']:.1f} s)"
    t.add_row("checkpoint", saved)
    t.add_row("run", f"{s['run']} (metrics.jsonl; curves: aimv2 plot {s['run']})")
    return t


def _add_loss_rows(t, s: dict) -> None:
    """Loss (total, per term, validation), throughput and MFU: present once any step was logged."""
    from aimv2train.model.aimv2 import LOSS_TERMS

    t.add_row("loss", f"{s['loss_start']:.4f} -> {s['loss_end']:.4f} (mean of the first / last "
              f"{s['loss_window']} steps logged)")
    ends = [(short, s[f"{k}_end"]) for k, (short, _) in LOSS_TERMS.items() if f"{k}_end" in s]
    t.add_row("  " + " / ".join(n for n, _ in ends), " / ".join(f"{v:.4f}" for _, v in ends))
    t.add_row("throughput", f"{s['steps_per_s']:.2f} steps/s, {s['images_per_s']:.1f} images/s, "
              f"{s['patches_per_s']:.0f} patches/s")
    if "val_loss_end" in s:
        vals = [(short, s[f"val_{k}_end"]) for k, (short, _) in LOSS_TERMS.items() if f"val_{k}_end" in s]
        t.add_row("val loss", f"{s['val_loss_end']:.4f} (" + ", ".join(f"{n} {v:.4f}" for n, v in vals)
                  + f"; step {s['val_step']})")
    t.add_row("MFU", f"{100 * s['mfu']:.1f}%: all ranks' model FLOPs over {s.get('world_size', 1)} x "
              f"{s['peak_flops'] / 1e9:.0f} GFLOP/s ({s.get('peak_source', 'measured matmul peak')})")


def _print_plan(plan) -> None:
    """The run's plan (memory, batch, parallelism): what --dry-run prints, and what a run that won't fit shows."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="aimv2 train: plan", show_header=False)
    for key, value in plan.rows:
        t.add_row(key, value)
    Console(width=120).print(t)
