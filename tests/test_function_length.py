"""No function in the library is longer than MAX_LINES (issue 23 point 6): a long one is split into short,
named stages that read top to bottom. What is still longer is listed below, each with its reason; an entry
whose function got short (or moved) fails too, so the list only shrinks."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("aimv2data", "aimv2train", "cli")
MAX_LINES = 60

ALLOWED: dict[str, str] = {}   # qualified name -> why it is still longer (none is, since issue 23 point 6)


def _functions(path: Path):
    """(qualified name, lines) of every function and method in the file, nested ones included."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + child.name, child.end_lineno - child.lineno + 1
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)
    yield from walk(ast.parse(path.read_text()), "")


def _long_functions() -> dict[str, int]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name, lines in _functions(path):
                if lines > MAX_LINES:
                    found[f"{path.relative_to(ROOT).as_posix()}::{name}"] = lines
    return found


def test_no_library_function_is_longer_than_60_lines():
    long = {k: n for k, n in _long_functions().items() if k not in ALLOWED}
    assert not long, (f"functions over {MAX_LINES} lines: {long}; split them into short named stages "
                      "(or, when another branch is changing that file, list them in ALLOWED with the reason)")


def test_the_allow_list_names_only_functions_that_are_still_long():
    stale = sorted(set(ALLOWED) - set(_long_functions()))
    assert not stale, f"{stale} are {MAX_LINES} lines or fewer now (or gone): remove them from ALLOWED"
