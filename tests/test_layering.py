"""The house rules of the code base (issue 11): which wing may import which, and no import circles.

model imports neither train nor eval; train does not import eval; aimv2data imports nothing from
aimv2train; the tooling above the wings (the demo pipeline, the GPU check in aimv2train/gpucheck/) is
imported by none of them; the fetch wing (aimv2data/fetch/) leans only on the shared helpers and the
manifest's lock, the manifest and loader wings never import it (they read what it wrote), and the CLI uses
its face only; no module-level or function-local import forms a circle between modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("aimv2data", "aimv2train", "cli")
TOOLING = ("aimv2train.demo_pipeline", "aimv2train.gpucheck")
# tooling that lives beside the data it serves (docs/layout.md): measurement, the demo's images, a test server
DATA_TOOLING = ("aimv2data.loader.bench", "aimv2data.demo_corpus", "aimv2data.serve")
GPUCHECK = ROOT / "aimv2train" / "gpucheck"
# what the fetch wing may import besides itself: the shared helpers (atomic writes, urls, paths or URLs, Ray;
# "aimv2data" is `from aimv2data import storage`), and the one-writer lock it shares with `aimv2 shard`
FETCH_MAY_IMPORT = ("aimv2data", "aimv2data.atomic", "aimv2data.urls", "aimv2data.storage", "aimv2data.cluster",
                    "aimv2data.manifest.lock")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module this file imports (anywhere in it, function-local imports included)."""
    name = _module_name(path) if path.parent.name != "benchmarks" else f"benchmarks.{path.stem}"
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def test_layering_rules():
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            if mod.startswith("aimv2train.model") and dep.startswith(("aimv2train.train", "aimv2train.eval")):
                bad.append(f"{mod} -> {dep}")
            if mod.startswith("aimv2train.train") and dep.startswith("aimv2train.eval"):
                bad.append(f"{mod} -> {dep}")
            if mod.startswith("aimv2data") and dep.startswith(("aimv2train", "cli")):
                bad.append(f"{mod} -> {dep}")
            if not mod.startswith("cli") and dep.startswith("cli"):
                bad.append(f"{mod} -> {dep}")
            if _in(mod, "aimv2data.fetch") and dep.startswith("aimv2data") and not _in(dep, "aimv2data.fetch") \
                    and dep not in FETCH_MAY_IMPORT:
                bad.append(f"{mod} -> {dep}")
            if mod.startswith(("aimv2data.manifest", "aimv2data.loader")) and _in(dep, "aimv2data.fetch"):
                bad.append(f"{mod} -> {dep}")
            if mod.startswith("cli") and dep.startswith("aimv2data.fetch."):   # the face, not its modules
                bad.append(f"{mod} -> {dep}")
            # the demo pipeline and the GPU check sit above the three wings: none of them may lean on either
            if mod.startswith(("aimv2train.model", "aimv2train.train", "aimv2train.eval")) and \
                    dep.startswith(TOOLING):
                bad.append(f"{mod} -> {dep}")
            # the library never leans on tooling (tooling may use tooling)
            if dep.startswith(DATA_TOOLING) and not mod.startswith(DATA_TOOLING + TOOLING + ("cli",)):
                bad.append(f"{mod} -> {dep}")
    # benchmarks use the libraries, never the CLI layer
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        bad += [f"benchmarks/{path.name} -> {m}" for m in _imports(path) if m.startswith("cli")]
    assert not bad, "layering broken:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    graph = _graph()
    # a package's face (__init__) importing its own modules is not a circle between modules
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    seen, stack, cycles = set(), [], []

    def visit(node: str, on_path: set[str]) -> None:
        for dep in sorted(edges.get(node, ())):
            if dep in on_path:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in seen:
                stack.append(dep)
                on_path.add(dep)
                visit(dep, on_path)
                on_path.discard(dep)
                stack.pop()
        seen.add(node)

    for start in sorted(edges):
        if start not in seen:
            stack[:] = [start]
            visit(start, {start})
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def _third_party(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_gpu_check_runs_without_click_and_its_face_imports_nothing():
    """The GPU machine has no click, rich or webdataset: no module of the check imports them; `aimv2 bench gpu
    --help` reads the face (PARTS, OPTIONS), which must not pull torch in."""
    bad = {f"{p.name}: {m}" for p in GPUCHECK.glob("*.py") for m in _third_party(p) & {"click", "rich", "webdataset"}}
    assert not bad, bad
    assert _third_party(GPUCHECK / "__init__.py") <= {"__future__"}


def test_the_checks_can_fail():
    """The rules above are not vacuous: the graph sees the wings and their real imports."""
    graph = _graph()
    assert "aimv2train.model.aimv2" in graph and "aimv2train.train.trainer" in graph
    assert "aimv2train.model.aimv2" in graph["aimv2train.train.trainer"]
    assert "aimv2train.demo_pipeline" in graph["cli.demo"]
    assert "aimv2data.fetch.download" in graph["aimv2data.fetch.run"] and "aimv2data.fetch" in graph["cli.fetch"]
    assert "aimv2data.manifest.lock" in graph["aimv2data.fetch.output"]
    assert "aimv2train.demo_pipeline" in _imports(ROOT / "benchmarks" / "bench_demo_probe.py")
    assert "aimv2train.train.trainer" in graph["aimv2train.gpucheck.trainer"]
    assert "aimv2train.gpucheck.runner" in graph["cli.bench"]
    assert "aimv2data.demo_corpus" in graph["aimv2train.gpucheck.payload"]
    assert _third_party(ROOT / "cli" / "bench.py") >= {"click"}


# modules the CLI reads before its heavy imports (issue 23 point 10): their import-time closure stays light
LIGHT = ("aimv2data.loader.decoders", "aimv2data.manifest.layout", "aimv2train.train.rundir",
         "aimv2train.train.config", "cli.options", "cli.main")
HEAVY = ("torch", "polars", "pyarrow", "numpy", "PIL", "nvidia", "ray")


def _top_level_imports(path: Path) -> set[str]:
    """What importing `path` imports at once: its module-level imports (not those inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def test_the_cli_reads_light_modules_before_heavy_imports():
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    heavy = []
    for start in LIGHT:
        seen, todo = set(), [start]
        while todo:
            mod = todo.pop()
            if mod in seen or mod not in files:
                continue
            seen.add(mod)
            parts = mod.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts))]   # a package's __init__ runs first
            for dep in _top_level_imports(files[mod]):
                if dep.split(".")[0] in HEAVY:
                    heavy.append(f"{start}: {mod} imports {dep}")
                todo.append(dep)
    assert not heavy, "heavy imports where the CLI needs light modules:\n" + "\n".join(sorted(set(heavy)))
