"""One AdapterMethod per peft_type; AdapterModel looks them up here."""

from __future__ import annotations

from .base import AdapterMethod

METHODS: dict[str, type[AdapterMethod]] = {}


def register(cls: type[AdapterMethod]) -> type[AdapterMethod]:
    METHODS[cls.peft_type] = cls
    return cls


def _load_builtin() -> None:
    import importlib

    for mod in ("lora", "bottleneck", "prefix", "prompt"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # a method still being written; the others work
            if e.name != f"{__name__}.{mod}":
                raise


_load_builtin()
