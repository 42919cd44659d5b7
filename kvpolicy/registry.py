"""Policy registry: built-ins by decorator, third-party policies by entry point."""
from __future__ import annotations

import difflib
import inspect
import warnings
from importlib.metadata import entry_points
from typing import Callable, TypeVar

from .cards import card_fields
from .policy import Policy

ENTRY_POINT_GROUP = "kvpolicy.policies"
P = TypeVar("P", bound=type[Policy])



class UnknownPolicyError(ValueError):
    """No policy is registered under the requested name."""


_policies: dict[str, type[Policy]] = {}
_plugins_loaded = False


def register_policy(name: str) -> Callable[[P], P]:
    """Class decorator: make a Policy subclass available as ``name``."""

    def deco(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise TypeError(f"@register_policy({name!r}) needs a kvpolicy.Policy subclass, got {cls!r}")
        if name in _policies and _policies[name] is not cls:
            raise ValueError(f"policy name {name!r} is already registered by {_policies[name]!r}")
        cls.name = name
        _policies[name] = cls
        fields = card_fields(name)
        if fields is not None and not cls.__dict__.get("__doc__"):
            cls.__doc__ = f"{fields['rule'].strip()}\n\n{fields['paper']}"
        return cls

    return deco


def _load_plugins() -> None:
    """Import each ``kvpolicy.policies`` entry point once; a broken one only warns."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _policies:
            continue
        try:
            cls = ep.load()
            register_policy(ep.name)(cls)
        except Exception as exc:  # a plugin must never break the others
            warnings.warn(f"kvpolicy: skipping policy plugin {ep.name!r} ({ep.value}): "
                          f"{type(exc).__name__}: {exc}", stacklevel=2)


def available_policies() -> list[str]:
    """Sorted names of all built-in and installed policies."""
    _load_plugins()
    return sorted(_policies)


def policy_class(name: str) -> type[Policy]:
    """The class registered as ``name``; unknown names list the available ones."""
    if name not in _policies:
        _load_plugins()
    if name not in _policies:
        close = difflib.get_close_matches(name, _policies, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownPolicyError(f"unknown policy {name!r}.{hint} Available: {', '.join(available_policies())}")
    return _policies[name]


def get_policy(name: str | Policy, **params: object) -> Policy:
    """A policy instance by name with its parameters (or ``name`` itself if already a Policy)."""
    if isinstance(name, Policy):
        if params:
            raise TypeError(f"parameters {sorted(params)} given with a policy instance; "
                            f"set them on the instance instead")
        return name
    if isinstance(name, type) and issubclass(name, Policy):
        raise TypeError(f"pass a policy name or an instance: {name.__name__}() rather than the class")
    if not isinstance(name, str):
        raise TypeError(f"policy must be a registered name (str) or a Policy instance, got {name!r}")
    cls = policy_class(name)
    allowed = cls.defaults()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(f"policy {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                        f"its parameters are: {_describe(allowed)}")
    return cls(**params)


def _describe(defaults: dict[str, object]) -> str:
    return ", ".join(f"{k}={v!r}" if v is not inspect.Parameter.empty else k
                     for k, v in defaults.items()) or "(none)"
