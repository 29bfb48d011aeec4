"""Where the demo's built artefacts (the trained tokenizer) are cached."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["demo_root"]


def demo_root() -> Path:
    """Directory where demo artefacts are cached (built on first use, not created here).

    Returns:
        ``$CORNSTARCH_CACHE`` if set, else ``~/.cache/cornstarch``.

    >>> demo_root().is_absolute()
    True
    """
    return Path(os.environ.get("CORNSTARCH_CACHE") or "~/.cache/cornstarch").expanduser()
