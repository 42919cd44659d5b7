"""Policy cards: the single source of each built-in policy's title, paper, link and rule
(registry/cards/NAME.toml); its decode mode and parameters come from the class. The rule
is also the class's docstring (set at registration) and what ``kvpolicy list`` shows."""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from importlib import resources

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib


@dataclass
class Card:
    name: str
    title: str
    paper: str
    rule: str
    decode: str
    url: str = ""
    parameters: dict[str, object] = field(default_factory=dict)


def card_fields(name: str) -> dict | None:
    """The TOML fields of the card shipped for ``name`` (title, paper, url, rule), or None."""
    path = resources.files("kvpolicy.cards_data") / f"{name}.toml"
    return tomllib.loads(path.read_text()) if path.is_file() else None


def builtin_card(name: str) -> Card | None:
    """The card shipped in registry/cards for a built-in policy, or None."""
    fields = card_fields(name)
    if fields is None:
        return None
    from .registry import policy_class  # the registry reads cards when policies register

    cls = policy_class(name)
    return Card(**fields, decode=cls.decode, parameters=cls.defaults())


def card(name: str) -> Card:
    """A policy's card; plugins without one get a card from their docstring and defaults."""
    from .registry import policy_class

    found = builtin_card(name)
    if found is not None:
        return found
    cls = policy_class(name)
    doc = inspect.getdoc(cls) or "(no description)"
    return Card(name=name, title=cls.__name__, paper=f"plugin: {cls.__module__}", rule=doc,
                decode=cls.decode, parameters=cls.defaults())

