"""Named objects in a registry (policies, probe designs): one way to print and look them up."""
from __future__ import annotations


class Named:
    """An object known by its name; `kind` says what it is in its repr (<policy pp>)."""
    name = ""
    kind = ""

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name}>"

    def __str__(self) -> str:
        return self.name


def lookup(registry: dict, value, cls: type, what: str, known: str):
    """The registered object of that name (or the object itself); an unknown name is an error
    listing the known ones: "unknown <what> 'x'; known <known>: a, b"."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, str) or value not in registry:
        raise ValueError(f"unknown {what} {value!r}; known {known}: {', '.join(registry)}")
    return registry[value]
