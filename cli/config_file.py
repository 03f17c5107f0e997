"""`--config FILE` for any Click command: every option can come from a TOML file (or a run's run.json),
options given on the command line win.

    @click.command()
    @config_file_option(section="train")
    @click.option("--steps", default=1000)
    ...

How: `--config` is an eager option, so Click processes it before the others; its callback reads the
file and fills `ctx.default_map`, which Click consults for every option the command line did not set
(command line > config file > the option's default). Nothing here knows the command's options: the
keys are checked against whatever `ctx.command.params` holds when it runs.

Keys: an option's parameter name (`batch_size`) or its flag without dashes (`batch-size`, `compile`).
A renamed flag's old name still reads (`decoder`, cli/flags.py). A flag `--no-X` also accepts
`X = true/false` (inverted), so run.json's `progress` fits `--no-progress`.
A JSON file with a `section` entry (run.json: `{"train": {...}, "hparams": ...}`) is read from that
entry; a TOML file may put its keys at the top or under `[section]`. `null` values are skipped (the
option's default applies). Unknown keys are a one-line error naming the nearest valid key (difflib); a
value of the wrong kind (`resolution = [56]`, `steps = 5.7`, `compile = "yes"`) or a file that is not UTF-8
is a one-line error naming the key or the file, never converted (Click would truncate 5.7 to 5).
Relative paths in the file are relative to the current directory, as on the command line.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

import click

from cli.flags import OldSpelling


def read_config(path: str | Path, section: str | None = None) -> dict:
    """The key/value pairs of a TOML or JSON config file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:   # TOML and JSON are UTF-8 by definition
        raise click.BadParameter(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8",
                                 param_hint="--config") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise click.BadParameter(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}",
                                 param_hint="--config") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a table of options", param_hint="--config")
    if section and isinstance(data.get(section), dict):
        if path.suffix == ".json":  # run.json: the other entries are outputs (hparams, model, ...)
            return dict(data[section])
        rest = {k: v for k, v in data.items() if k != section}
        return {**rest, **data[section]}
    return data


def _spellings(command: click.Command, exclude: set[str]) -> dict[str, tuple[str, bool]]:
    """Every accepted key -> (parameter name, invert?)."""
    keys: dict[str, tuple[str, bool]] = {}
    for p in command.params:
        if isinstance(p, OldSpelling):  # a renamed flag: its old name still reads (cli/flags.py)
            if p.new_name not in exclude:
                for k in (flag := p.opts[0].lstrip("-"), flag.replace("-", "_")):
                    keys.setdefault(k, (p.new_name, False))
            continue
        if not isinstance(p, click.Option) or p.name in exclude or p.name is None:
            continue
        keys[p.name] = (p.name, False)
        for opt in p.opts:
            flag = opt.lstrip("-")
            if opt.startswith("--"):
                for k in (flag, flag.replace("-", "_")):
                    keys.setdefault(k, (p.name, False))
                if p.is_flag and p.is_bool_flag and not p.secondary_opts and flag.startswith("no-"):
                    for k in (flag[3:], flag[3:].replace("-", "_")):
                        keys.setdefault(k, (p.name, True))
        for opt in p.secondary_opts:  # --x/--no-x: `no-x = true` means x = false
            flag = opt.lstrip("-")
            for k in (flag, flag.replace("-", "_")):
                keys.setdefault(k, (p.name, True))
    return keys


def resolve_config(command: click.Command, values: dict, source: str = "config",
                   exclude: set[str] = frozenset()) -> dict:
    """Map a config's keys to the command's parameter names (a Click default_map). Raises
    click.BadParameter for an unknown key, naming the nearest valid one."""
    keys = _spellings(command, set(exclude))
    params = {p.name: p for p in command.params}
    out = {}
    for key, value in values.items():
        if key not in keys:
            near = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise click.BadParameter(f"{source}: unknown key {key!r}{hint} (valid keys are the options of "
                                     f"`{command.name} --help`, with _ or -)", param_hint="--config")
        if value is None:
            continue
        name, invert = keys[key]
        _check_type(params[name], key, value, source)
        if invert:
            if not isinstance(value, bool):
                raise click.BadParameter(f"{source}: {key} must be true or false, got {value!r}",
                                         param_hint="--config")
            value = not value
        out[name] = value
    return out


def _check_type(p: click.Parameter, key: str, value, source: str) -> None:
    """A file's value must already be of the option's kind: Click would turn [56] into a traceback and
    5.7 into 5 for an integer option, silently."""
    many = p.multiple or p.nargs != 1
    if many and isinstance(value, list):
        for v in value:
            _check_type_one(p.type, key, v, source)
        return
    _check_type_one(p.type, key, value, source)


def _check_type_one(t: click.ParamType, key: str, value, source: str) -> None:
    def refuse(what):
        raise click.BadParameter(f"{source}: {key} must be {what}, got {value!r}", param_hint="--config")

    if isinstance(value, (list, dict)):
        refuse("a single value")
    if isinstance(t, click.types.IntParamType) and (isinstance(value, bool) or not isinstance(value, int)):
        refuse("a whole number")
    if isinstance(t, click.types.FloatParamType) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        refuse("a number")
    if isinstance(t, click.types.BoolParamType) and not isinstance(value, bool):
        refuse("true or false")


def config_file_option(section: str | None = None, exclude: tuple[str, ...] = ()):
    """Decorator adding `--config FILE` to a Click command (see the module docstring). `exclude`: option
    names a file may not set."""

    def callback(ctx: click.Context, param: click.Parameter, value):
        if not value:
            return value
        values = read_config(value, section)
        defaults = resolve_config(ctx.command, values, source=str(value), exclude={param.name, *exclude})
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
        return value

    return click.option("--config", type=click.Path(exists=True, dir_okay=False), is_eager=True,
                        expose_value=False, callback=callback,
                        help="TOML file of options (keys as the flags, e.g. batch_size = 256), or a run's "
                             "run.json to repeat it; flags on the command line override it.")
