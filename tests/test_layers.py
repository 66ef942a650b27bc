"""The package reads in the order data flows: each layer imports only from the layers below it.

    0 kernels/                 Triton kernels and launchers (nothing of ours)
    1 the op                   freecure_ops: api, op, validation, fasa_mask, backends, reference, masks, outputs;
                               hub (where weights come from: local paths, Hub references, offline mode)
    2 adapters/                what installs FASA into diffusers models
    3 freecure_ops/pipeline/   the method: FreeCure, APG, attributes, the face parsers (BiSeNet, SegFormer)
    4 tools on top             the grid tools (manifest, grid, batch, evaluate, face_embed) and the CLI

Checked on the source (every ``import``/``from`` at any depth, relative ones resolved), so a lazy import inside
a function counts too; ``bench/`` is tooling over every layer and is not checked.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> package name (setup.py's package_dir)
FOLDERS = {"kernels": "freecure_ops.kernels", "adapters": "freecure_ops.adapters", "freecure_ops": "freecure_ops"}
TOP_TOOLS = {"manifest", "grid", "batch", "evaluate", "face_embed", "cli", "__main__"}
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
    return {"kernels": 0, "adapters": 2, "pipeline": 3, "bench": None}.get(sub, 4 if sub in TOP_TOOLS else 1)


def modules():
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            is_pkg = path.name == "__init__.py"
            yield name, path, is_pkg


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
            "freecure_ops.pipeline.face_parser", "freecure_ops.cli", "freecure_ops.batch"} <= names
    assert [layer(n) for n in ("freecure_ops.kernels.fasa_fwd", "freecure_ops.fasa_mask", "freecure_ops.adapters.attend",
                               "freecure_ops.pipeline.freecure", "freecure_ops.cli")] == [0, 1, 2, 3, 4]
    # the lazy re-export keeps the old public name working without an upward import
    from freecure_ops.adapters import FreeCure
    from freecure_ops.pipeline import FreeCure as Method

    assert FreeCure is Method
