"""Deprecated alias of :mod:`cornstarch.demo`, the offline demo data; import from there instead.

Kept so that configs naming ``cornstarch.data.demo:build_tokenizer`` or ``cornstarch.data.demo:digits_vlm_dataset``
keep working. ``build_tokenizer`` here is :func:`cornstarch.demo.demo_tokenizer` (it trains the demo BPE; not to be
confused with :func:`cornstarch.models.builder.build_tokenizer`, which loads a tokenizer). Every other name is the
object of the same name in :mod:`cornstarch.demo`. Importing this module emits a ``DeprecationWarning``.
"""

import warnings

from .. import demo as _demo
from ..demo import *  # noqa: F401,F403  (every public name of cornstarch.demo)
from ..demo import demo_tokenizer as build_tokenizer

warnings.warn("cornstarch.data.demo is deprecated: use cornstarch.demo (build_tokenizer is now demo_tokenizer)",
              DeprecationWarning, stacklevel=2)

__all__ = [name for name in _demo.__all__ if name != "demo_tokenizer"] + ["build_tokenizer"]
