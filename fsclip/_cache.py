"""Where fsclip keeps derived data (label embeddings, feature caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$FSCLIP_CACHE` (else `$XDG_CACHE_HOME/fsclip`, else `~/.cache/fsclip`) joined with `parts`."""
    root = os.environ.get("FSCLIP_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = os.path.join(xdg, "fsclip")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
