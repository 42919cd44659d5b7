"""kvpolicy: KV-cache compression policies for Hugging Face language and vision-language models."""
from . import policies  # noqa: F401  (registers the built-ins)
from .apply import PolicyHandle, apply, compress
from .budget import Budget
from .cache import PolicyCache
from .hooks import attach, detach
from .memory import Memory
from .policy import FixedSizePolicy, Plan, Policy, Requirements, Stats
from .registry import (UnknownPolicyError, available_policies, get_policy, policy_class,
                       register_policy)

__version__ = "0.1.0"
__all__ = ["Budget", "FixedSizePolicy", "Memory", "Plan", "Policy", "PolicyCache", "PolicyHandle",
           "Requirements", "Stats", "UnknownPolicyError", "apply", "attach", "available_policies", "compress", "detach",
           "get_policy", "policy_class", "register_policy"]
