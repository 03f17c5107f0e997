import click


@click.group()
def tokenizer():
    """Caption tokenizer (sentencepiece): `aimv2 tokenizer train`."""


@tokenizer.command("train")
@click.argument("manifest")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Output file. The sentencepiece .model (written atomically).")
@click.option("--vocab-size", default=32000, show_default=True,
              help="Vocabulary size including the reserved pad/eos/unk (SigLIP uses 32000; use a few "
                   "hundred for a demo-sized manifest).")
@click.option("--column", "columns", multiple=True,
              help="Caption column to train on (repeatable). Default: `caption` and every `syn_<name>`.")
@click.option("--model-type", type=click.Choice(["unigram", "bpe"]), default="unigram", show_default=True,
              help="sentencepiece algorithm (SigLIP's model is unigram).")
@click.option("--character-coverage", default=0.9995, show_default=True,
              help="Fraction of characters covered by the vocabulary; the rest map to <unk>.")
@click.option("--max-sentences", default=5_000_000, show_default=True,
              help="Captions sampled (uniformly) for training when there are more.")
@click.option("--soft-limit", is_flag=True,
              help="Treat --vocab-size as an upper bound: a corpus too small to fill it gives a smaller "
                   "vocabulary instead of an error (handy for demo-sized manifests).")
@click.option("--seed", default=0, show_default=True, help="Random seed. It seeds sentencepiece's sampling.")
def train(manifest, output, vocab_size, columns, model_type, character_coverage, max_sentences, soft_limit, seed):
    """Train a sentencepiece tokenizer on every caption column of MANIFEST's samples/*.parquet.

    Reserved ids: pad=0, eos=1, unk=2, no bos (SigLIP's / T5's layout). `aimv2 train --tokenizer`
    also accepts any existing sentencepiece .model.
    """
    from rich.console import Console
    from rich.table import Table

    from aimv2train.train.tokenizer import MAX_TEXT_LEN, train_tokenizer

    with Console(stderr=True).status(f"training sentencepiece ({vocab_size} pieces) on {manifest}"):
        try:
            r = train_tokenizer(manifest, output, vocab_size, columns=list(columns) or None,
                                model_type=model_type, character_coverage=character_coverage,
                                max_sentences=max_sentences, seed=seed,
                                soft_limit=soft_limit)
        except (ValueError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None
    t = Table(title="aimv2 tokenizer train", show_header=False)
    t.add_row("model", f"{r.output} ({r.vocab_size} ids: pad=0 eos=1 unk=2)")
    t.add_row("captions", f"{r.sentences} from " + ", ".join(f"{k}={v}" for k, v in r.columns.items()))
    t.add_row("tokens/caption", f"{r.mean_tokens:.1f} mean (eos included); "
              f"{100 * r.truncated:.2f}% longer than {MAX_TEXT_LEN} are cut")
    t.add_row("example", f"{r.example[:80]!r}\n-> {' '.join(r.example_pieces[:24])}")
    Console().print(t)
