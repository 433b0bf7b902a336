"""Where `fastadapters.kernels` comes from.

The Triton kernels live in the repository's top-level `kernels/` folder, which has no `__init__.py`: nothing in
this repository is importable as the top-level name `kernels`, which belongs to Hugging Face's `kernels` package
(transformers >= 5.25 imports it). A wheel ships that folder as the namespace subpackage `fastadapters.kernels`.
A source tree (repo root on sys.path) or an editable install does not map it (setuptools' editable finder does not
resolve a namespace subpackage under a regular package), so here the package maps it itself, to that folder only.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"


def ensure_kernels_package(package: str) -> None:
    """Make `<package>.kernels` importable: as installed when it is, else from the source tree's kernels/ folder."""
    name = f"{package}.kernels"
    if name in sys.modules:
        return
    parent = sys.modules[package]
    if importlib.machinery.PathFinder.find_spec(name, list(parent.__path__)) is not None:
        return  # a wheel install: fastadapters/kernels/ is a folder beside this file
    if not KERNELS_DIR.is_dir():
        raise ImportError(f"{name} is missing: neither {Path(parent.__file__).parent / 'kernels'} nor {KERNELS_DIR} "
                          "exists; reinstall fastadapters")
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(KERNELS_DIR)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent.kernels = module
