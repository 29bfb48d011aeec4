"""Import paths of classes and module-level callables, so a saved model can name what rebuilds it."""

from __future__ import annotations

import importlib
from typing import Any, Callable

UNSERIALIZABLE = "<unserializable>"


def import_path(obj: Any) -> str:
    """``"package.module:QualName"`` of a class or module-level function, or ``UNSERIALIZABLE``.

    Lambdas, closures and bound methods cannot be re-imported and yield ``UNSERIALIZABLE``.

    >>> import_path(dict)
    'builtins:dict'
    >>> import_path(lambda x: x)
    '<unserializable>'
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname or hasattr(obj, "__self__") and not isinstance(obj, type):
        return UNSERIALIZABLE
    try:
        if resolve(f"{module}:{qualname}") is not obj:
            return UNSERIALIZABLE
    except (ImportError, AttributeError):
        return UNSERIALIZABLE
    return f"{module}:{qualname}"


def resolve(path: str) -> Callable[..., Any]:
    """Import ``"package.module:QualName"`` and return the object.

    Raises:
        ImportError / AttributeError: if the module or the name does not exist.

    >>> resolve("builtins:dict") is dict
    True
    """
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
