"""The package reads in the order data flows: each layer imports only from the layers below it.

    0 kernels/                 Triton kernels and launchers (nothing of ours)
    1 the op                   freecure_ops: api, op, validation, fasa_mask, backends, reference, masks, outputs;
                               hub (where weights come from: local paths, Hub references, offline mode)
    2 adapters/                what installs FASA into diffusers models
    3 freecure_ops/pipeline/   the method: FreeCure, APG, attributes, the face parsers (BiSeNet, SegFormer)
    4 the grid library         manifest, grid, results, evaluate, face_embed: plain functions, no command line
    5 freecure_ops/cli/        the command line: one module per subcommand over shared argument checks;
      freecure_ops/demo/       the demo page (``freecure demo``), over the command line's checks and passes

Checked on the source (every ``import``/``from`` at any depth, relative ones resolved), so a lazy import inside
a function counts too; ``bench/`` is tooling over every layer and is not checked. Besides the layers: no import
cycle among the package's modules (a lazy import that closes a cycle is still one), and no module takes a
private ``_name`` of a tool module (what another module needs is public, or belongs in a shared module).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> package name (setup.py's package_dir)
FOLDERS = {"kernels": "freecure_ops.kernels", "adapters": "freecure_ops.adapters", "freecure_ops": "freecure_ops"}
GRID_LIBRARY = {"manifest", "grid", "results", "evaluate", "face_embed"}
COMMAND_LINE = {"cli", "__main__", "demo"}
# The one sanctioned upward reference: ``from freecure_ops.adapters import FreeCure`` (the method's old public
# home) still works through a lazy module ``__getattr__`` that imports nothing until the name is asked for.
COMPAT = {("freecure_ops.adapters", "freecure_ops.pipeline")}


def layer(module: str) -> int | None:
    """The layer of a freecure_ops module name, None for anything else (and for bench)."""
    parts = module.split(".")
    if parts[0] != "freecure_ops":
        return None
    if len(parts) == 1:
        return 1
    sub = parts[1]
    if sub in COMMAND_LINE:
        return 5
    return {"kernels": 0, "adapters": 2, "pipeline": 3, "bench": None}.get(sub, 4 if sub in GRID_LIBRARY else 1)


def modules():
    for folder, package in FOLDERS.items():
        # a top-level folder's package module is its _package.py (freecure_ops/subpackages.py says why)
        package_modules = {ROOT / folder / "__init__.py", ROOT / folder / "_package.py"}
        for path in sorted((ROOT / folder).rglob("*.py")):
            is_pkg = path.name == "__init__.py" or path in package_modules
            rel = path.relative_to(ROOT / folder)
            parts = rel.parent.parts if is_pkg else rel.with_suffix("").parts
            yield ".".join([package, *parts]), path, is_pkg


def imports(name: str, path: Path, is_pkg: bool):
    """Every freecure_ops module ``path`` imports (absolute, or relative resolved against ``name``)."""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            for a in node.names:  # "from freecure_ops import pipeline" imports a module, not a name
                yield f"{target}.{a.name}"


def known(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name, _, _ in MODULES)


MODULES = list(modules())


@pytest.mark.parametrize("name,path,is_pkg", MODULES, ids=[m[0] for m in MODULES])
def test_imports_only_look_down(name, path, is_pkg):
    mine = layer(name)
    up = sorted({m for m in imports(name, path, is_pkg)
                 if layer(m) is not None and mine is not None and layer(m) > mine
                 and (known(m) or m.count(".") == 1) and (name, m) not in COMPAT})
    assert not up, f"{name} (layer {mine}) imports from above: {up}"


def test_the_layers_are_where_the_docs_say():
    names = {n for n, _, _ in MODULES}
    assert {"freecure_ops.kernels.fasa_fwd", "freecure_ops.api", "freecure_ops.adapters.install",
            "freecure_ops.pipeline.freecure", "freecure_ops.pipeline.apg", "freecure_ops.pipeline.attributes",
            "freecure_ops.pipeline.face_parser", "freecure_ops.cli", "freecure_ops.cli.batch",
            "freecure_ops.results", "freecure_ops.evaluate"} <= names
    assert [layer(n) for n in ("freecure_ops.kernels.fasa_fwd", "freecure_ops.fasa_mask", "freecure_ops.adapters.attend",
                               "freecure_ops.pipeline.freecure", "freecure_ops.results", "freecure_ops.cli.batch")] \
        == [0, 1, 2, 3, 4, 5]
    # the lazy re-export keeps the old public name working without an upward import
    from freecure_ops.adapters import FreeCure
    from freecure_ops.pipeline import FreeCure as Method

    assert FreeCure is Method


# ----------------------------------------------------------------------------------------------------------
# the module graph: no cycles, no private names of tool modules
# ----------------------------------------------------------------------------------------------------------

def edges(name: str, path: Path, is_pkg: bool, names: set[str]):
    """``(module imported, name taken from it or None)`` for every import of ``path`` of a module in ``names``.
    ``from pkg import sub`` imports the module ``pkg.sub``; a parent package executed implicitly is not an edge
    (Python allows a package to import its own submodules lazily); modules outside ``names`` (bench, other
    packages) are not followed."""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((a.name, None) for a in node.names if a.name in names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                if f"{target}.{a.name}" in names:
                    yield f"{target}.{a.name}", None
                elif target in names:
                    yield target, a.name


def graph(mods) -> dict[str, set[str]]:
    """module -> the modules it imports, over ``mods`` (``(name, path, is_pkg)``; bench is not checked)."""
    names = {n for n, _, _ in mods}
    return {name: {m for m, _ in edges(name, path, is_pkg, names) if m != name}
            for name, path, is_pkg in mods if layer(name) is not None}


def private_takes(mods) -> list[str]:
    """``"a takes b._x"`` for every private name a module of ``mods`` imports from another tool module."""
    names = {n for n, _, _ in mods}
    return sorted(f"{name} takes {mod}.{what}" for name, path, is_pkg in mods
                  for mod, what in edges(name, path, is_pkg, names)
                  if what and what.startswith("_") and not what.startswith("__") and mod != name
                  and (layer(mod) or 0) >= 4)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``g`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in sorted(g):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(g[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state and nxt in g:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(g[nxt])))
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_cycles():
    cycle = find_cycle(graph(MODULES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_of_tool_modules():
    taken = private_takes(MODULES)
    assert not taken, "private names of tool modules imported elsewhere: " + "; ".join(taken)


def test_the_graph_checks_see_the_old_layout(tmp_path):
    """The checks above fail on the layout issue 20 replaced: batch.py taking cli.py's privates lazily, cli.py
    importing batch.py (a cycle)."""
    (tmp_path / "cli.py").write_text("from .batch import run\n")
    (tmp_path / "batch.py").write_text("def f():\n    from .cli import _load_pipeline, CLIError\n")
    old = [("freecure_ops.cli", tmp_path / "cli.py", False), ("freecure_ops.batch", tmp_path / "batch.py", False)]
    assert find_cycle(graph(old)) == ["freecure_ops.batch", "freecure_ops.cli", "freecure_ops.batch"]
    assert private_takes(old) == ["freecure_ops.batch takes freecure_ops.cli._load_pipeline"]
