"""Options several commands share, generated from the registry that defines them."""
import click

from cli.flags import option


def require_manifest(path) -> None:
    """Refuse a local MANIFEST without _manifest.json in one line, before a command's heavy imports (issue 23
    point 10: torch or polars take seconds, up to a minute on a busy machine)."""
    from aimv2data.manifest.layout import missing_manifest

    if problem := missing_manifest(path):
        raise click.ClickException(problem)


def decoder_option(*names: str, default: str = "pil", help_prefix: str = "", old: tuple[str, ...] = ()):
    """The image decoder option: its choices and help from aimv2data.loader.decoders (read when the command
    is defined, so a decoder added there is selectable everywhere); `old` spellings as cli/flags.py's."""
    from aimv2data.loader.decoders import DECODERS, decoders_help

    return option(*names, type=click.Choice(list(DECODERS)), default=default, show_default=True, old=old,
                  help=help_prefix + decoders_help())
