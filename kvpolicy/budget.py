"""The global KV budget: a kept fraction of the prompt, or an average token count per layer."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """``value`` is a float in (0, 1] (fraction of the prompt's KV entries kept, averaged
    over layers) or an int >= 1 (average tokens kept per layer)."""

    value: float | int

    def __post_init__(self) -> None:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(
                f"budget must be a float in (0, 1] (kept fraction) or an int >= 1 "
                f"(tokens per layer), got {v!r}")
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

    def __str__(self) -> str:
        return f"{self.value:g}" if self.is_fraction else f"{self.value} tokens/layer"
