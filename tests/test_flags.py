"""Flags that read alike across commands (issue 23 point 9): the new spellings parse, the old ones parse to the
same value with a one-line notice naming the new one, and a flag name means one thing in every command.
Parsing only (`make_context`): no command body runs."""
import re
from collections import defaultdict

import click
from click.testing import CliRunner
import pytest

from cli.config_file import resolve_config
from cli.main import main


def commands():
    """(path, command) for every leaf command, e.g. (("bench", "loader"), <Command>)."""
    ctx = click.Context(main, info_name="aimv2")

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                yield from walk(cmd.get_command(ctx, name), (*path, name))
        else:
            yield path, cmd
    return dict(walk(main, ()))


def parse(path: str, args: list[str]) -> dict:
    """The parameter values `aimv2 PATH ARGS` parses to."""
    ctx = click.Context(main, info_name="aimv2")
    cmd = main
    for name in path.split():
        cmd = cmd.get_command(ctx, name)
        ctx = cmd.make_context(name, list(args), parent=ctx) if not isinstance(cmd, click.Group) else \
            click.Context(cmd, info_name=name, parent=ctx)
    return ctx.params


@pytest.fixture
def there(tmp_path, monkeypatch):
    """An existing folder M and file T (for options that check existence)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "M").mkdir()
    (tmp_path / "T").write_text("x")


NEW = [  # (command, arguments, parameter values they give)
    ("train", ["-o", "RUN"], {"out": "RUN"}),
    ("train", ["--output", "RUN", "--image-decoder", "dali", "--torch-threads", "3"],
     {"out": "RUN", "image_decoder": "dali", "threads": 3}),
    ("train", ["-R", "56", "-B", "8", "-C", "4096", "-j", "0"],
     {"resolution": 56, "batch_size": 8, "batch_patches": 4096, "workers": 0}),
    ("plot", ["M", "-o", "P"], {"out": "P"}),
    ("plot", ["M", "--output", "P"], {"out": "P"}),
    ("demo", ["-o", "D"], {"out": "D"}),
    ("fetch", ["-o", "F", "--download-threads", "8"], {"output": "F", "threads": 8}),
    ("preview", ["M", "-o", "P", "--image-decoder", "dali", "-R", "56", "-B", "8"],
     {"output": "P", "decoder": "dali", "resolution": 56, "batch_size": 8}),
    ("bench loader", ["M", "--image-decoder", "dali", "-j", "2", "-R", "56", "-B", "8"],
     {"decoder": "dali", "workers": 2, "resolution": 56, "batch_size": 8}),
    ("caption generate", ["M", "--model", "M", "-o", "set.parquet"], {"output": "set.parquet"}),
    ("probe", ["-c", "M", "--train", "M", "--val", "M", "-j", "2", "-o", "p.json"], {"workers": 2, "output": "p.json"}),
    ("shard", ["x.tar", "-o", "m", "-j", "2"], {"output": "m", "workers": 2}),
    ("bench gpu", ["-o", "g.json"], {"output": "g.json"}),
]


@pytest.mark.parametrize("path,args,want", NEW, ids=[f"{p} {' '.join(a)}" for p, a, _ in NEW])
def test_new_spellings_parse(there, path, args, want):
    got = parse(path, args)
    assert {k: got[k] for k in want} == want


OLD = [  # (command, arguments before, old spelling, new spelling, value)
    ("train", [], "--out", "--output", "RUN"),
    ("train", [], "--decoder", "--image-decoder", "dali"),
    ("train", [], "--threads", "--torch-threads", "3"),
    ("plot", ["M"], "--out", "--output", "P"),
    ("demo", [], "--out", "--output", "D"),
    ("fetch", ["-o", "F"], "--threads", "--download-threads", "8"),
    ("preview", ["M", "-o", "P"], "--decoder", "--image-decoder", "dali"),
    ("bench loader", ["M"], "--decoder", "--image-decoder", "dali"),
    ("preview", ["M", "-o", "P"], "--epoch", "--segment", "2"),
    ("bench gpu", [], "--out", "--output", "g.json"),   # issue 23 point 4: it always was the segment
]


@pytest.mark.parametrize("path,base,old,new,value", OLD, ids=[f"{p} {o}" for p, _, o, _, _ in OLD])
def test_old_spellings_parse_alike_and_say_so(there, capsys, path, base, old, new, value):
    assert parse(path, [*base, old, value]) == parse(path, [*base, new, value])
    notice = capsys.readouterr().err.splitlines()
    assert notice == [f"aimv2 {path}: {old} is deprecated, use {new} (same value)"]
    got = parse(path, [*base, old, value, new, "9" if value.isdigit() else "pil"])  # the new spelling wins
    assert parse(path, [*base, new, "9" if value.isdigit() else "pil"]) == got


def test_old_names_still_read_from_config_files(there):
    train = commands()[("train",)]
    with open("run.toml", "w") as f:
        f.write('out = "FROM_FILE"\ndecoder = "dali"\n')
    assert parse("train", ["--config", "run.toml"])["out"] == "FROM_FILE"
    assert parse("train", ["--config", "run.toml", "--out", "X"])["out"] == "X"  # the command line wins, old or new
    assert resolve_config(train, {"out": "RUN", "decoder": "dali", "threads": 2}) == \
        {"out": "RUN", "image_decoder": "dali", "threads": 2}
    assert resolve_config(train, {"output": "RUN", "image-decoder": "dali", "torch_threads": 2}) == \
        {"out": "RUN", "image_decoder": "dali", "threads": 2}


def options(cmd):
    return [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]


def kind(p: click.Option):
    """What a user types: a number, text (paths included: some commands also take URLs), a choice, a switch."""
    t = p.type
    if isinstance(t, click.Choice):
        return ("choice", tuple(sorted(t.choices)))
    if p.is_flag:
        return "switch"
    if isinstance(t, (click.types.IntParamType, click.IntRange)):
        return "integer"
    if isinstance(t, (click.types.FloatParamType, click.FloatRange)):
        return "number"
    return "text"


def lead(p: click.Option) -> str:
    """The help's first sentence ("e.g." does not end one)."""
    return re.split(r"(?<!e\.g)\.(?:\s|$)", (p.help or "").strip(), maxsplit=1)[0]


# Names that mean different things in different commands, and why that stays.
ALLOWED = {
    "--dry-run": "train prints its memory plan and exits; bench gpu rehearses the whole GPU check at tiny sizes on CPU",
    "--output": "a folder where the command writes many files, a file where it writes one (checked below)",
    "--batch-size": "the batch of each command's own step: loader images per step (train, preview, bench loader), "
                    "generate() calls (caption generate), forward passes (embed), the probe's optimiser batch (probe)",
    "--column": "a caption column of the caption set (caption attach) or of the manifest (tokenizer train)",
    "--distributor": "each command offers the distributors it supports (img2dataset's in fetch)",
    "--model": "a size preset to build (train) or a captioning model folder to load (caption generate)",
    "--name": "the set's name in the manifest (caption attach) or the column in the written set (caption generate)",
    "--source": "fetch: which kind of url list; shard: the source name samples get (the manifest's `source`)",
    "--warmup": "train: learning-rate warmup steps; bench loader: untimed steps before timing",
}


def shared_options():
    by_name = defaultdict(list)
    for path, cmd in commands().items():
        for p in options(cmd):
            for opt in p.opts:
                if opt.startswith("--"):
                    by_name[opt].append((" ".join(path), p))
    return {name: uses for name, uses in by_name.items() if len(uses) > 1}


def test_a_flag_name_means_one_thing_in_every_command():
    shared = shared_options()
    differ = {name for name, uses in shared.items() if len({(kind(p), lead(p)) for _, p in uses}) > 1}
    details = {name: [(cmd, kind(p), lead(p)) for cmd, p in shared[name]] for name in differ - set(ALLOWED)}
    assert not details, details
    assert set(ALLOWED) <= differ, f"no longer needed: {set(ALLOWED) - differ}"


def test_output_is_o_and_says_folder_or_file():
    for path, cmd in commands().items():
        for p in options(cmd):
            if "--output" in p.opts:
                assert "-o" in p.opts and lead(p) in ("Output folder", "Output file"), (path, p.opts, lead(p))
            assert "-o" not in p.opts or "--output" in p.opts, (path, p.opts)


def test_short_flags_mean_one_long_flag():
    longs = defaultdict(set)
    for cmd in commands().values():
        for p in options(cmd):
            for short in (o for o in p.opts if not o.startswith("--")):
                longs[short].add(max(p.opts, key=len))
    assert {s: names for s, names in longs.items() if len(names) > 1} == {}
    assert {s: next(iter(longs[s])) for s in ("-o", "-R", "-B", "-C", "-j")} == {
        "-o": "--output", "-R": "--resolution", "-B": "--batch-size", "-C": "--batch-patches", "-j": "--workers"}


def test_every_option_has_help():
    missing = [(path, p.opts) for path, cmd in commands().items() for p in options(cmd) if not (p.help or "").strip()]
    assert missing == []


def test_one_default_policy_for_workers_and_patch_budgets():
    uses = shared_options()
    workers = {cmd: p.default for cmd, p in uses["--workers"]}
    assert workers == {"bench loader": 0, "probe": 0, "shard": 0, "train": 4}  # in this process, but train
    assert all(f"Default {p.default}" in p.help and ("but train" in p.help or cmd == "train")
               for cmd, p in uses["--workers"])  # the policy, said in each help
    assert len({p.default for _, p in uses["--max-patches"]}) == 1


def test_required_options_say_so_in_help():
    fetch = {p.name: p for p in commands()[("fetch",)].params}
    for name in ("source", "url_lists"):  # both, unless --retry-failed reads them from DIR's record
        assert fetch[name].help.endswith("[required, except with --retry-failed]")
    embed = CliRunner().invoke(main, ["embed", "--help"], terminal_width=300).output
    assert re.search(r"--checkpoint .*\[required\]", embed)
