"""Exception types. Each subclasses a builtin too, so callers can catch either."""

from __future__ import annotations

__all__ = ["AdapterError", "DataError", "FsclipError", "IndexError_", "ModelLoadError", "UsageError"]


class FsclipError(Exception):
    """Base class of every error fsclip raises on purpose."""


class UsageError(FsclipError, ValueError):
    """A bad argument or option value."""


class ModelLoadError(FsclipError, OSError):
    """A model spec that cannot be resolved or loaded."""


class DataError(FsclipError, ValueError):
    """Input data (images, labels, folders) that cannot be used."""


class AdapterError(FsclipError, ValueError):
    """An adapter that cannot be fitted, saved or loaded."""


class IndexError_(FsclipError, OSError):  # noqa: N801 - builtin IndexError means something else
    """A search index that cannot be opened, updated or queried."""
