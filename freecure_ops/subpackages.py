"""Where ``freecure_ops.kernels``, ``freecure_ops.adapters`` and ``freecure_ops.bench`` come from.

They are the checkout's top-level folders ``kernels/``, ``adapters/`` and ``bench/``; setup.py's ``package_dir``
installs them inside ``freecure_ops/``. The same three names are PyPI packages our users have installed (Hugging
Face's ``kernels``, which transformers >= 5.25 imports whenever diffusers loads a model; AdapterHub's
``adapters``; ``bench``), and anything started from the checkout root (``python -m pytest``, a script, a
notebook) has the root on ``sys.path`` ahead of site-packages. So the folders carry no ``__init__.py``: Python
takes such a folder only as a namespace portion, and a regular package of the same name later on ``sys.path``
wins over it, so ``import kernels`` at the checkout root still gives the installed package (``find_spec``,
``import_module`` and ``pkgutil`` agree, since it is Python's own rule and not a redirect).

Nothing else finds a folder without ``__init__.py`` as our subpackage (setuptools' editable finder looks for
one; a checkout's ``freecure_ops/`` does not hold the folders), so this finder does: ``freecure_ops.<name>`` is
the folder inside this package (a wheel) or beside it (a checkout, an editable install), and the package's own
module, what an ``__init__.py`` would hold, is the folder's ``_package.py``. It answers for those three names
only, and ahead of the path finder, which would otherwise take a wheel's folder for a bare namespace package.
"""
from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from importlib.util import spec_from_file_location
from pathlib import Path

FOLDERS = ("kernels", "adapters", "bench")
PACKAGE_MODULE = "_package.py"


class FolderPackages(MetaPathFinder):
    """Finds ``<package>.kernels`` / ``.adapters`` / ``.bench`` in ``package_dir`` or beside it."""

    def __init__(self, package: str, package_dir: Path):
        self.package = package
        self.folders = {f"{package}.{name}": (package_dir / name, package_dir.parent / name) for name in FOLDERS}

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        for folder in self.folders.get(fullname, ()):
            module = folder / PACKAGE_MODULE
            if module.is_file():
                return spec_from_file_location(fullname, module, submodule_search_locations=[str(folder)])
        return None


def install(package: str, package_dir: Path) -> None:
    """Put the finder for ``package`` first on ``sys.meta_path`` (once: a reload replaces it)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not (isinstance(f, FolderPackages) and f.package == package)]
    sys.meta_path.insert(0, FolderPackages(package, package_dir))
