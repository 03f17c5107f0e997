"""Renamed flags: `option(..., old=("--out",))` is `click.option` whose older spellings still parse to the
same value, with a one-line notice on stderr naming the new spelling.

    @option("-o", "--output", "out", type=click.Path(file_okay=False), old=("--out",), help=...)

Each old spelling is a hidden option of its own (so `--help` shows only the new one) that hands its value to
the new option; the new spelling wins when both are given. `--config` files read the old names too
(cli/config_file.py maps an `OldSpelling`'s keys to the new option). Only public Click API: callbacks,
`ctx.meta` and `ctx.get_parameter_source`.
"""
from __future__ import annotations

import click

_UNSET = (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)


class OldSpelling(click.Option):
    """A deprecated spelling of the option named `new_name` (hidden; its value goes to that option)."""

    def __init__(self, *args, new_name: str, new_flag: str, **kw):
        super().__init__(*args, **kw)
        self.new_name, self.new_flag = new_name, new_flag


def _notice(ctx: click.Context, param: OldSpelling, value):
    if ctx.get_parameter_source(param.name) not in _UNSET and not ctx.resilient_parsing:
        command = " ".join(["aimv2", *ctx.command_path.split()[1:]])  # the same under CliRunner and torchrun
        click.echo(f"{command}: {param.opts[0]} is deprecated, use {param.new_flag} (same value)", err=True)
        ctx.meta[("renamed", param.new_name)] = value
    return value


def option(*decls: str, old: tuple[str, ...] = (), **attrs):
    """`click.option(*decls, **attrs)` that also accepts the spellings in `old` (see the module docstring)."""
    if not old:
        return click.option(*decls, **attrs)
    probe = click.Option(list(decls), **attrs)  # Click's own reading of the name, type and arity
    if probe.is_flag:
        raise TypeError("renamed boolean flags are not supported (none is renamed yet)")
    given = attrs.pop("callback", None)

    def take_old(ctx, param, value):
        if ctx.get_parameter_source(param.name) in _UNSET and ("renamed", param.name) in ctx.meta:
            value = ctx.meta[("renamed", param.name)]
        return given(ctx, param, value) if given else value

    def decorate(f):
        for spelling in old:
            f = click.option(spelling, f"{probe.name}__{spelling.lstrip('-').replace('-', '_')}", cls=OldSpelling,
                             new_name=probe.name, new_flag=max(probe.opts, key=len), type=probe.type,
                             multiple=probe.multiple, nargs=probe.nargs, hidden=True, expose_value=False,
                             callback=_notice)(f)
        return click.option(*decls, callback=take_old, **attrs)(f)
    return decorate
