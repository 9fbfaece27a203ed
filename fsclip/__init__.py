"""fsclip: zero-shot, few-shot and semantic search with CLIP-style models.

    >>> import fsclip
    >>> model = fsclip.load_model("shapes")                      # or "ViT-B-32@laion2b_s34b_b79k", ...
    >>> clf = fsclip.ZeroShotClassifier(model, ["red circle", "blue star"], "shapes")
    >>> probs = clf.predict_proba(model.encode_images(pixels))   # (N, 2)

Heavy modules (torch, open_clip, transformers, faiss) load on first use, so `import fsclip` is cheap.
"""

from __future__ import annotations

import importlib

from fsclip._version import __version__

__all__ = [
    "ImageIndex",
    "ZeroShotClassifier",
    "__version__",
    "fit",
    "list_adapters",
    "load_adapter",
    "load_image_folder",
    "load_model",
]

_LAZY = {
    "ImageIndex": "fsclip.search",
    "ZeroShotClassifier": "fsclip.zeroshot",
    "fit": "fsclip.adapters",
    "list_adapters": "fsclip.adapters",
    "load_adapter": "fsclip.adapters",
    "load_image_folder": "fsclip.data",
    "load_model": "fsclip.backends",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fsclip' has no attribute {name!r}")
