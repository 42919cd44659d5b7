"""Policy cards: name, paper, rule and parameters of each policy (``kvpolicy list`` shows them)."""
from __future__ import annotations

import inspect
import tomllib
from dataclasses import dataclass, field
from importlib import resources

from .registry import policy_class


@dataclass
class Card:
    name: str
    title: str
    paper: str
    rule: str
    decode: str
    url: str = ""
    parameters: dict[str, object] = field(default_factory=dict)


def builtin_card(name: str) -> Card | None:
    """The card shipped in registry/cards for a built-in policy, or None."""
    path = resources.files("kvpolicy.cards_data") / f"{name}.toml"
    if not path.is_file():
        return None
    return Card(**tomllib.loads(path.read_text()))


def card(name: str) -> Card:
    """A policy's card; plugins without one get a card from their docstring and defaults."""
    found = builtin_card(name)
    if found is not None:
        return found
    cls = policy_class(name)
    doc = inspect.getdoc(cls) or "(no description)"
    return Card(name=name, title=cls.__name__, paper=f"plugin: {cls.__module__}", rule=doc,
                decode=cls.decode, parameters=cls.defaults())

