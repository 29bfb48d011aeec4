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


def callback_spec(obj: Any) -> str | dict[str, Any]:
    """How a saved model or processor names a callback or count function so that it can rebuild it.

    A module-level function: its import path (:func:`import_path`). An object with settings (a class instance
    with a ``get_config()`` method returning its constructor's keyword arguments, e.g.
    :class:`cornstarch.models.feature_selection.SelectFeatures`): ``{"class_path": ..., "config": {...}}``. Anything
    else: ``UNSERIALIZABLE``.

    >>> callback_spec(import_path)
    'cornstarch.models.multimodal_language_model.import_paths:import_path'
    >>> from cornstarch.models.feature_selection import SelectFeatures
    >>> callback_spec(SelectFeatures(layer=-2, strategy="default"))
    {'class_path': 'cornstarch.models.feature_selection:SelectFeatures', 'config': {'layer': -2, 'strategy': 'default'}}
    """
    get_config = getattr(obj, "get_config", None)
    if callable(get_config) and not isinstance(obj, type):
        class_path = import_path(type(obj))
        if class_path != UNSERIALIZABLE:
            return {"class_path": class_path, "config": dict(get_config())}
    return import_path(obj)


def build_callback(spec: str | dict[str, Any]) -> Any:
    """Rebuild what :func:`callback_spec` described (parameters of a callback module are loaded afterwards).

    Raises:
        ValueError: for ``UNSERIALIZABLE``.
        ImportError / AttributeError: if the named module or class does not exist.

    >>> build_callback({"class_path": "cornstarch.models.feature_selection:SelectFeatures", "config": {"layer": -1}})
    SelectFeatures(layer=-1, strategy='default')
    """
    if isinstance(spec, dict):
        return resolve(spec["class_path"])(**spec.get("config", {}))
    if spec == UNSERIALIZABLE:
        raise ValueError("This callback was not saved: it is not an importable module-level function or object.")
    return resolve(spec)
