"""The house rules of issue 23 that a reading of the source can check: one name per fact."""
from __future__ import annotations

import ast
from pathlib import Path

from aimv2data.manifest import layout

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("aimv2data", "aimv2train", "cli")


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _manifest_names_spelled(path: Path) -> list[str]:
    """Where `path` spells a manifest file name itself: the unmistakable names anywhere in code, the
    folder names as a path part (`root / "idx"`, `join(root, "captions")`, "samples/part-...")."""
    tree = ast.parse(path.read_text())
    skip = _docstrings(tree)
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    unmistakable = {layout.MANIFEST_JSON, layout.PARTS, layout.SHARDS}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if node.value in unmistakable or node.value.startswith(tuple(f"{e}/" for e in layout.ENTRIES)):
                found.append(f"{where}:{node.lineno}: {node.value!r}")
        parts = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            parts = [node.right]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "join":
            parts = node.args
        found += [f"{where}:{p.lineno}: {p.value!r}" for p in parts
                  if isinstance(p, ast.Constant) and p.value in layout.ENTRIES]
    return found


def test_manifest_file_names_are_spelled_only_in_layout():
    """manifest/layout.py is the one place that knows a manifest's file names (docs/layout.md)."""
    found = [hit for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))
             if path != ROOT / "aimv2data" / "manifest" / "layout.py" for hit in _manifest_names_spelled(path)]
    assert not found, "manifest file names spelled outside aimv2data/manifest/layout.py:\n" + "\n".join(found)


def test_the_manifest_name_check_can_fail(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('import os\n\n\ndef f(root):\n    """Reads root / "idx"."""\n'
                     '    return root / "idx", os.path.join(root, "captions"), "_parts", f"samples/part-{root}"\n')
    assert len(_manifest_names_spelled(probe)) == 4


def test_table2_is_one_fact_in_paper():
    """Table 2 lives in aimv2data/paper.py; the sampler's source shares and the caption chooser's
    within-source odds are both read from it."""
    from aimv2data import paper
    from aimv2data.loader import captions, sampler

    assert sampler.TABLE2_SOURCES == {"dfn": 60.0, "coyo": 6.0, "hqitp": 31.0}
    assert captions.table2_mix() == {"dfn": 0.5, "coyo": 1.0, "hqitp": 28 / 31, "default": 0.5}
    for module in ("aimv2data/loader/sampler.py", "aimv2data/loader/captions.py"):
        tree = ast.parse((ROOT / module).read_text())
        tables = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Dict)
                  and any(isinstance(k, ast.Constant) and k.value == "hqitp" for k in n.keys)]
        assert not tables, f"{module} writes out a table of the paper's sources itself (line {tables})"
    assert paper.TABLE2["hqitp"] == {"alt": 28, "synthetic": 3}
