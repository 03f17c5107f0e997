"""The `aimv2` command group. Each subcommand lives in its own module and is imported only when
it is run, so `aimv2 --help` stays fast (torch and DALI are heavy imports)."""
from __future__ import annotations

import importlib
import signal
import threading

import click

# name -> "module:attribute" of a click.Command. Add a line here to add a command.
COMMANDS: dict[str, str] = {
    "doctor": "cli.doctor:doctor",
    "fetch": "cli.fetch:fetch",
    "demo": "cli.demo:demo",
    "tokenizer": "cli.tokenizer:tokenizer",
    "train": "cli.train:train",
    "plot": "cli.plot:plot",
    "embed": "cli.embed:embed",
    "shard": "cli.shard:shard",
    "split": "cli.split:split",
    "caption": "cli.caption:caption",
    "stats": "cli.stats:stats",
    "preview": "cli.preview:preview",
    "bench": "cli.bench:bench",
    "probe": "cli.probe:probe",
    "export": "cli.export:export",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so `finally` blocks remove temp files and release locks."""


def _on_sigterm(signum, frame):
    raise Terminated()


class LazyGroup(click.Group):
    def invoke(self, ctx):
        """Interrupted commands exit 130 (SIGINT) or 143 (SIGTERM) with one line, not click's "Aborted!"
        and 1; `train` and `fetch` install their own handlers (save / resume) and exit the same way."""
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            name = ctx.invoked_subcommand or "aimv2"
            term = isinstance(e, Terminated) or getattr(e, "signum", None) == signal.SIGTERM
            click.echo(f"aimv2 {name}: interrupted ({'SIGTERM' if term else 'SIGINT'}); what was written is "
                       "complete, rerun the same command to resume", err=True)
            raise SystemExit(143 if term else 130) from None
        finally:
            if main:
                signal.signal(signal.SIGTERM, old)

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aimv2")
def main():
    """aimv2: from URL lists to a trained AIMv2 vision encoder.

    fetch -> shard -> caption attach -> tokenizer train -> train -> export / probe / embed.
    """


if __name__ == "__main__":
    main()
