"""Name registries for methods and tasks: one decorator, auto-discovery, plug-ins, "did you mean",
and a type check on register and on lookup (so a wrong `module:attr` fails with a clear message)."""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects registered by name.

    Built-ins register themselves when their package (`package`, one module per entry) is imported,
    so adding one means adding one file. Users plug theirs in without editing NeuronBench: as
    `path.to.module:Name`, or through the entry-point group `group`.
    """

    def __init__(self, kind: str, package: str, group: str, accepts: Callable[[object], bool],
                 expected: str, adapt: Callable[[object], object] | None = None):
        """
        Args:
            kind: what the entries are, for messages ("method", "task").
            package: the package whose modules hold the built-ins.
            group: the entry-point group of plug-ins.
            accepts: whether an object may be an entry (checked on register and on lookup).
            expected: what an entry is, for messages ("a Method subclass").
            adapt: turns what a `module:attr` name points at into an entry (e.g. a task's scoring
                function into its task) before the check.
        """
        self.kind, self.package, self.group = kind, package, group
        self.accepts, self.expected, self.adapt = accepts, expected, adapt or (lambda obj: obj)
        self._items: dict[str, T] = {}
        self._discovered = False

    def _check(self, name: str, obj: object, error: type[Exception] = TypeError) -> T:
        # TypeError when registering the wrong thing (a programming error); KeyError on lookup,
        # like an unknown name (the command line reports both as a usage error).
        if not self.accepts(obj):
            raise error(f"{self.kind} {name!r} is {type(obj).__name__} {obj!r:.80}, not {self.expected}")
        return obj  # type: ignore[return-value]

    def values(self) -> list[T]:
        """The registered entries (built-ins not yet discovered are not listed)."""
        return list(self._items.values())

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            self._check(name, obj)
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice "
                                 f"({self._items[name]!r} and {obj!r}); pick another name")
            self._items[name] = obj
            return obj
        return decorate

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")  # a broken one fails loudly
        for ep in entry_points(group=self.group):
            if ep.name not in self._items:
                self._items[ep.name] = self._check(ep.name, self.adapt(ep.load()), KeyError)

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._items)

    def get(self, name: str) -> T:
        """The entry called `name`, or the object at `module:attr`."""
        if ":" in name:
            module, _, attr = name.partition(":")
            try:
                obj = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as err:
                raise KeyError(f"cannot import {self.kind} {name!r}: {err}. Use path.to.module:Name "
                               "with the module importable (on PYTHONPATH or installed)") from None
            return self._check(name, self.adapt(obj), KeyError)
        self._discover()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._items))}; "
                           f"or pass path.to.module:Name")
        return self._items[name]
