"""`aimv2 bench gpu`: the one prepared GPU check, a single command for one GPU that writes one JSON file and
prints a table. Procedure, parts, payload and the exact device calls: docs/gpucheck.md.

    python -m aimv2train.gpucheck --data PAYLOAD -o bench_gpu.json     # on the GPU machine (no click needed)
    python -m aimv2train.gpucheck --prepare PAYLOAD                    # here, on CPU: the trainer part's data
    python -m aimv2train.gpucheck --dry-run -o dry.json                # tiny sizes on CPU, the same code path
    aimv2 bench gpu [--dry-run | --prepare DIR | --data DIR] ...       # the same through the CLI

One small module per part: `env` (env and peak), `parity`, `decode` (with its JPEG generator), `trainer`
(the real `aimv2 train` on the carried payload, `payload` builds it), `steps`; `report` renders the table,
`runner` runs the parts in order and holds the command line; `common` is what the parts share (sizes,
budget, failure reasons). This face imports nothing heavy: `aimv2 bench
gpu --help` reads PARTS and the defaults below without torch.
"""
# cheap parts first; the trainer part builds (or is given) the manifest that the steps part's loader rows use
PARTS = ("env", "peak", "parity", "decode", "trainer", "steps")
BUDGET_S = 420.0          # --budget: wall-clock seconds for the whole check
NATIVE_DYNAMIC = ("auto", "true", "false")

# The command line, once for both parsers (runner.main's argparse on the GPU machine, cli/bench.py's click):
# (flag, default, kind, help); kind is "flag", a type, or a tuple of choices.
OPTIONS = (
    ("--output", "bench_gpu.json", str, "Output file. The JSON written (rewritten after every part)."),
    ("--dry-run", False, "flag", "Tiny sizes on CPU, the same code path (CI)."),
    ("--device", None, str, "torch device: cpu, cuda or cuda:N. Default: cuda if present; cpu with --dry-run."),
    ("--parts", ",".join(PARTS), str, f"Comma-separated subset of {','.join(PARTS)}."),
    ("--budget", BUDGET_S, float, "Wall-clock seconds for the whole check; trainer runs and compiled step rows "
     "that would not fit are skipped."),
    ("--data", None, str, "The trainer part's payload (a folder written by --prepare, carried to this machine); "
     "without it the part builds a small one where it runs (needs scikit-image)."),
    ("--prepare", None, str, "Only write the trainer part's payload into this new folder (on CPU, before the GPU "
     "call: real photos as tars, their manifest and tokenizer) and exit."),
    ("--max-mb", 40.0, float, "--prepare: the payload's size limit in MB (it travels in one device call of 64 MiB "
     "beside the working tree)."),
    ("--workdir", None, str, "Where the parts write (trainer runs, checkpoints; keep it off $OUT on the GPU "
     "machine). Default: OUT's folder / OUT-stem_work."),
    ("--rows", "", str, "steps: comma-separated subset of RES-ATTN-MODE rows, e.g. native-flex-compiled,"
     "native-sdpa-compiled (default: all eight)."),
    ("--native-dynamic", "auto", NATIVE_DYNAMIC, "The steps part's native-resolution rows' per-block compile, as "
     "`aimv2 train --compile-dynamic`: true / auto (dynamic block shapes), false (static block graphs, one per "
     "grid)."),
)


# -o/--output as in every other command; --out, its spelling before, still parses (issue 23 point 9)
SHORT = {"--output": "-o"}
OLD = {"--output": ("--out",)}
METAVARS = {"--output": "FILE", "--device": "DEVICE", "--parts": "PART,...", "--budget": "SECONDS", "--data": "DIR",
            "--prepare": "DIR", "--max-mb": "MB", "--workdir": "DIR", "--rows": "ROW,..."}


def parse_parts(text: str) -> tuple[str, ...]:
    """--parts' value as a tuple; ValueError naming the unknown ones."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    return parts
