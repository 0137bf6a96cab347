"""Name registries for scenarios and auxiliary models.

A spec string is ``"name"`` or ``"name:arg"`` (e.g. ``"mixture:1.5"``,
``"noisy:0.5"``); the registered factory receives the parsed argument. The
built-in entries use the same mechanism as user code::

    from sim import register_scenario, Scenario

    @register_scenario("shifted")
    class Shifted(Scenario):
        def p_star(self, x, phi1, phi2):
            return sigmoid(self.du(phi1, phi2) + 0.3 * self.kappa)
"""

from __future__ import annotations

from typing import Callable


class Registry:
    """A mapping ``name -> factory`` with ``name:arg`` spec parsing."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name: str, *, overwrite: bool = False):
        """Decorator registering ``obj`` (a class or factory function) under ``name``."""
        if not name or ":" in name:
            raise ValueError(f"{self.kind} name must be non-empty and contain no ':'; got {name!r}")

        def deco(obj):
            if name in self._entries and not overwrite:
                raise ValueError(f"{self.kind} {name!r} is already registered (pass overwrite=True to replace it)")
            if isinstance(obj, type):
                obj.name = name  # classes know the name they are registered under
            self._entries[name] = obj
            return obj

        return deco

    @staticmethod
    def parse(spec: str) -> tuple[str, str | None]:
        """Split ``"name:arg"`` into ``(name, arg)``; ``arg`` is None when absent."""
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"spec must be a non-empty string, got {spec!r}")
        name, _, arg = spec.strip().partition(":")
        return name, (arg if arg != "" else None)

    def get(self, name: str) -> Callable:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


SCENARIOS = Registry("scenario")
AUX_MODELS = Registry("auxiliary model")

register_scenario = SCENARIOS.register
register_aux = AUX_MODELS.register
