"""A tiny name -> factory registry, shared by datasets, models, attacks and defences."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

from quantpatch.errors import ConfigError, UnknownNameError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """Maps names to factories; unknown names raise ``UnknownNameError`` listing the choices.

    A name is written once: ``@REGISTRY.register`` takes it from the definition (a class's
    ``name`` attribute, else the ``__name__``), and the help from the docstring's first line.
    ``@REGISTRY.register("fashion-mnist")`` names it explicitly, for names that are not
    identifiers.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}

    @overload
    def register(self, name: T, help: str = "") -> T: ...

    @overload
    def register(self, name: str | None = None, help: str = "") -> Callable[[T], T]: ...

    def register(self, name: str | T | None = None, help: str = "") -> T | Callable[[T], T]:
        """Decorator: ``@register``, ``@register()`` or ``@register("name", help="...")``."""
        if callable(name):  # bare ``@register``
            return self._add(name, None, help)
        return lambda factory: self._add(factory, name, help)

    def _add(self, factory: T, name: str | None, help: str) -> T:
        name = name if name is not None else _defined_name(factory)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = factory
        doc = (factory.__doc__ or "").strip().splitlines()
        self._help[name] = help or (doc[0] if doc else "")
        return factory

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            choices = ", ".join(sorted(self._entries))
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'; choose from: {choices}"
            ) from None

    def create(self, name: str, **params: Any) -> Any:
        """Build ``name`` from ``params``, after one check for every registry: a parameter the
        factory does not take, or a required one left out, is a ``ConfigError`` naming what it
        takes (the factory's own checks then judge the values)."""
        factory = self.get(name)
        accepted, required = accepted_params(factory)
        unknown = sorted(set(params) - set(accepted))
        missing = [p for p in required if p not in params]
        if unknown or missing:
            problem = (f"does not take {', '.join(unknown)}" if unknown
                       else f"needs {', '.join(missing)}")  # fmt: skip
            raise ConfigError(
                f"{self.kind} '{name}' {problem}; it takes: {', '.join(accepted) or 'nothing'}"
            )
        return factory(**params)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> list[tuple[str, str]]:
        return [(name, self._help[name]) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _defined_name(factory: Callable) -> str:
    """A class's ``name`` attribute, else the ``__name__``. The attribute may be inherited, so
    a subclass that forgot its own name clashes with its parent ("registered twice") instead
    of being listed under its Python class name."""
    name = getattr(factory, "name", None) if isinstance(factory, type) else None
    return name if isinstance(name, str) else factory.__name__


def accepted_params(factory: Callable) -> tuple[list[str], list[str]]:
    """(keyword parameters ``factory`` takes, those without a default). For a class, its
    ``__init__``, following ``**kwargs`` up the class chain to the parents that take them."""
    if not isinstance(factory, type):
        return _parameters(inspect.signature(factory).parameters.values())
    accepted: list[str] = []
    required: list[str] = []
    for klass in factory.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = list(inspect.signature(vars(klass)["__init__"]).parameters.values())[1:]
        names, needed = _parameters(params)
        accepted += [n for n in names if n not in accepted]
        required += [n for n in needed if n not in required]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return accepted, required


def _parameters(params: Any) -> tuple[list[str], list[str]]:
    named = [p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [p.name for p in named], [p.name for p in named if p.default is p.empty]
