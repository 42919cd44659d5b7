"""Parameters the tools fill in for a policy from the model they run it on."""
from __future__ import annotations

from kvpolicy import policy_class


def tokenizer_for(name: str, tok) -> dict:
    """{"tokenizer": tok} for a policy that takes the model's tokenizer (kvzip builds its
    repeat prompt with it), else {}."""
    return {"tokenizer": tok} if "tokenizer" in policy_class(name).defaults() else {}
