"""Budget arithmetic, in one place: the global budget and what it means for one layer."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Literal

Decode = Literal["append", "evict"]


@dataclass(frozen=True)
class Budget:
    """``value`` is a float in (0, 1] (fraction of the prompt's KV entries kept, averaged
    over layers) or an int >= 1 (average tokens kept per layer). numpy and torch scalars
    are read as the Python number they hold."""

    value: float | int

    def __post_init__(self) -> None:
        v = self.value
        from .memory import Memory  # memory builds on this module
        if isinstance(v, Memory):
            raise ValueError(f"budget={v}: a Memory budget is resolved for a model by "
                             f"kvpolicy.apply / kvpolicy.compress; here (e.g. vLLM) pass a token "
                             f"budget (a float fraction or an int)")
        if hasattr(v, "item") and getattr(v, "ndim", getattr(v, "dim", lambda: 1)()) == 0:
            v = v.item()  # numpy / torch 0-d scalars
        if isinstance(v, bool) or not isinstance(v, (numbers.Integral, numbers.Real)):
            raise TypeError(
                f"budget must be a float in (0, 1] (kept fraction) or an int >= 1 "
                f"(tokens per layer), got {self.value!r}")
        v = int(v) if isinstance(v, numbers.Integral) else float(v)
        object.__setattr__(self, "value", v)
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError(
                f"budget {v} is outside (0, 1]: a float budget is the fraction of the prompt's "
                f"KV entries kept (e.g. 0.1); pass an int for a token count per layer")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"budget {v} < 1: an int budget is the tokens kept per layer")

    @property
    def is_fraction(self) -> bool:
        return isinstance(self.value, float)

    def total(self, num_tokens: int, num_layers: int) -> int:
        """Tokens kept over all layers for a prompt of ``num_tokens``."""
        if self.is_fraction:
            return round(self.value * num_tokens * num_layers)
        return int(self.value) * num_layers

    def check_holds(self, min_tokens: int, policy: str, which: str = "") -> None:
        """Raise if an int budget cannot hold ``min_tokens`` protected tokens per layer
        (``which``: what they are, for the message)."""
        if not self.is_fraction and self.value < min_tokens:
            which = f" ({which})" if which else ""
            raise ValueError(f"budget {self} cannot hold the {min_tokens} protected tokens per "
                             f"layer of {policy}{which}: pass budget >= {min_tokens} (or a float "
                             f"fraction)")

    def __str__(self) -> str:
        return f"{self.value:g}" if self.is_fraction else f"{self.value} tokens/layer"


def room(num_tokens: int, max_new_tokens: int, decode: Decode) -> int:
    """Tokens a layer can hold: the prompt's, plus the planned new ones for a layer that
    holds a fixed size while decoding (the budget is a fraction of both)."""
    return num_tokens + (max_new_tokens if decode == "evict" else 0)


def layer_floor(protected: int, min_scored: int, room: int) -> int:
    """Tokens every layer keeps at least: the protected ones plus ``min_scored``."""
    return min(room, max(1, protected + min_scored))


def capacity(kept: int, max_new_tokens: int, decode: Decode, bucket: int = 1) -> int:
    """Buffer slots of a layer keeping ``kept`` prompt tokens: an appending layer adds the
    planned new tokens (rounded up to ``bucket``); a fixed-size layer is its budget."""
    if decode == "evict":
        return kept
    return -(-(kept + max_new_tokens) // bucket) * bucket
