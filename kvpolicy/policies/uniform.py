"""uniform: the same number of tokens in every layer, chosen by the window's attention."""
from __future__ import annotations

from ..policy import Policy
from ..registry import register_policy


@register_policy("uniform")
class Uniform(Policy):
    """Equal per-layer budgets (remainder to the first layers); score = attention of the
    last ``window`` prompt queries, so comparisons isolate the effect of allocation."""

    queries = "window"

    def __init__(self, window: int = 8):
        self.window = window
