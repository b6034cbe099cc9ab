"""The import of a framework that an integration needs and snapens does not install by default."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


def import_optional(name: str, *, extra: str, needs: str, pip: str, broken_hint: str | None = None) -> ModuleType:
    """Import ``name`` for ``snapens.integrations.<extra>``; a missing framework says what to install.

    Args:
        name: the module to import, e.g. ``"lightning.pytorch"``.
        extra: the integration and the pip extra of the same name (``pip install -e '.[extra]'``).
        needs: the framework as the message names it, e.g. ``"Keras 3"``.
        pip: what ``pip install`` needs, e.g. ``"keras h5py"``.
        broken_hint: for a framework that is installed but fails to import, what to do (the error is raised as
            ImportError with it); None re-raises the original error.

    Raises:
        ImportError: the framework is missing (or broken, with ``broken_hint``).
    """
    root = name.split(".")[0]
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if exc.name in (name, root) or importlib.util.find_spec(root) is None:
            raise ImportError(f"snapens.integrations.{extra} needs {needs}: pip install {pip} (or pip install -e "
                              f"'.[{extra}]' in a clone)") from exc
        if broken_hint is None:
            raise
        raise ImportError(f"{needs.split()[0]} is installed but failed to import ({exc}); {broken_hint}") from exc
