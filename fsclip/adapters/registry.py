"""The adapter registry: one entry per method, filled by `register_adapter` at the end of each module."""

from __future__ import annotations

from fsclip.errors import UsageError

__all__ = ["AUTO", "get_adapter", "list_adapters", "list_methods", "register_adapter"]

AUTO = "auto"  # not an adapter: the strategy advisor picks one of the registered methods
_ADAPTERS: dict[str, type] = {}


def register_adapter(cls: type) -> type:
    """Add an `Adapter` subclass under its `name`; a name can be registered only once."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} has no method name (set the class attribute `name`)")
    if name == AUTO or name in _ADAPTERS:
        raise ValueError(f"adapter {name!r} is already registered")
    _ADAPTERS[name] = cls
    return cls


def list_adapters() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_ADAPTERS)


def list_methods() -> list[str]:
    """What `fit(method=...)` accepts: `auto` and every registered adapter."""
    return [AUTO, *list_adapters()]


def get_adapter(name: str) -> type:
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(list_methods())}") from None
