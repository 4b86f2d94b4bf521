"""One registry class for every swappable piece (backbones, heads, losses, attacks, frameworks, ...)."""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration problem; the message names the key path."""


def did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable] = {}

    def register(self, name: str):
        def add(obj):
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj
        return add

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str, key: str = "") -> Callable:
        if name not in self._items:
            where = f"{key}: " if key else ""
            raise ConfigError(f"{where}unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; "
                              f"known: {', '.join(self.names())}")
        return self._items[name]

    def check_args(self, name: str, args: dict, key: str = "", provided: tuple[str, ...] = ()) -> None:
        """Refuse keyword arguments the registered constructor does not take, naming the config key."""
        params = inspect.signature(self.get(name, key)).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        allowed = [p for p in params if p not in provided]
        for arg in args:
            if arg not in allowed:
                raise ConfigError(f"{key}.{arg}: {self.kind} '{name}' takes no argument '{arg}'"
                                  f"{did_you_mean(arg, allowed)}; it takes: {', '.join(allowed) or 'nothing'}")

    def build(self, name: str, args: dict | None = None, key: str = "", **provided: Any):
        args = dict(args or {})
        self.check_args(name, args, key, tuple(provided))
        return self.get(name, key)(**provided, **args)
