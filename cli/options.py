"""Options several commands share, generated from the registry that defines them."""
import click


def decoder_option(*names: str, default: str = "pil", help_prefix: str = ""):
    """The image decoder option: its choices and help from aimv2data.loader.decoders (read when the command
    is defined, so a decoder added there is selectable everywhere)."""
    from aimv2data.loader.decoders import DECODERS, decoders_help

    return click.option(*names, type=click.Choice(list(DECODERS)), default=default, show_default=True,
                        help=help_prefix + decoders_help())
