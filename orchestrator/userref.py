"""One loader for a user's ``module:name`` reference: a sampling strategy, an output parser, a model class.

The module is taken from a file in one of the folders searched (next to loop.yml) when
there is one, under a name private to that file (two loop.yml folders may each have a
``parse.py``); else it is imported from ``sys.path``. ``sys.path`` is never changed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["import_module", "load_ref", "split_ref"]


def split_ref(ref: str) -> tuple[str, str]:
    """``"pkg.module:name"`` -> ("pkg.module", "name"); ValueError when it is not of that form."""
    module, sep, name = ref.partition(":")
    if not sep or not module or not name or ":" in name:
        raise ValueError(f"{ref!r} is not of the form 'module:name'")
    return module, name


def module_file(name: str, base: Path) -> Path | None:
    """``name``'s file under ``base`` (``a/b.py`` or ``a/b/__init__.py`` for ``a.b``), if there is one."""
    parts = name.split(".")
    for cand in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
        if cand.is_file():
            return cand
    return None


def import_module(name: str, search: Sequence[Path] = ()) -> ModuleType:
    """``name`` from the first folder of ``search`` that holds it, else from sys.path (ImportError if neither)."""
    for base in search:
        file = module_file(name, Path(base))
        if file is not None:
            return _from_file(name, file)
    return importlib.import_module(name)


def _from_file(name: str, file: Path) -> ModuleType:
    unique = f"orchestrator_user_{abs(hash(str(file.resolve())))}_{name.replace('.', '_')}"
    if unique in sys.modules:
        return sys.modules[unique]
    spec = importlib.util.spec_from_file_location(unique, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[unique]
        raise
    return module


def load_ref(ref: str, search: Sequence[Path] = ()) -> Any:
    """The object ``module:name`` names. Raises ValueError (malformed), ImportError (or whatever the
    module raised while it was imported) and AttributeError (no such name), each saying what was wrong."""
    module_name, attr = split_ref(ref)
    module = import_module(module_name, search)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"{module_name!r} has no attribute {attr!r}") from None
