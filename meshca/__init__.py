"""meshca: a certificate authority for service meshes (SPIFFE X.509-SVIDs over Envoy SDS).

A long-running command (serve, agent) installs its log handler; until one does, meshca's
events go nowhere: the ``meshca`` logger gets a ``NullHandler``. Without it, Python's
last-resort handler would print a backend's retry narration ("serving what is cached,
retrying ...") beside a one-shot command's own one-line verdict. The handler is added as
soon as ``logging`` is imported, not by importing it here: the commands that never log
(``meshca issue``, ``inspect``, ``bundle``) start faster without it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

__version__ = "0.1.0"


def _quiet(logging: ModuleType) -> None:
    logging.getLogger(__name__).addHandler(logging.NullHandler())


class _QuietWhenLoggingLoads:
    """An import finder for ``logging`` alone: it finds the module as the finders after it
    would, and adds meshca's ``NullHandler`` once the module has run; then it is gone."""

    @classmethod
    def find_spec(
        cls, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name != "logging":
            return None
        sys.meta_path.remove(cls)
        spec = _find_elsewhere(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _quiet(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _find_elsewhere(
    name: str, path: Sequence[str] | None, target: ModuleType | None
) -> ModuleSpec | None:
    """The module's spec from the other finders, in the order the import system asks them."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        spec: ModuleSpec | None = find(name, path, target) if find else None
        if spec is not None:
            return spec
    return None


def _install() -> None:
    logging: Any = sys.modules.get("logging")
    if logging is not None:
        _quiet(logging)
    else:
        sys.meta_path.insert(0, _QuietWhenLoggingLoads)


_install()
