"""The hypothesis strategies of the policy author's kit (``kvpolicy.testing``)."""
from kvpolicy.testing import budgets, stats

__all__ = ["budgets", "stats"]
