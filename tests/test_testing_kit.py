"""kvpolicy.testing: the kit passes a sound policy and catches broken ones."""
import pytest
import torch

from kvpolicy import Stats
from kvpolicy.policies import Uniform
from kvpolicy.testing import check_monotone, check_policy


class Unsorted(Uniform):
    """Keep rows in descending order."""

    def evict(self, scores, n, stats):
        return [k.flip(-1) for k in super().evict(scores, n, stats)]


class FirstTokens(Uniform):
    """Keeps the first n positions: drops the protected window."""

    def evict(self, scores, n, stats):
        B, G, _ = scores[0].shape
        return [torch.arange(int(k)).expand(B, G, -1) for k in n]


def test_sound_policy_passes():
    check_policy("uniform", examples=20)


@pytest.mark.parametrize("broken, match", [(Unsorted, "not sorted"),
                                           (FirstTokens, "protected token evicted|padding kept")])
def test_broken_plans_fail(broken, match):
    with pytest.raises(AssertionError, match=match):
        check_policy(broken, examples=30, monotone=False, equivariant=False)


def test_falling_allocation_fails():
    class Falling(Uniform):
        def allocate(self, stats, total, floor):
            return torch.tensor([40 - total // 2, total // 2])

    s = Stats(attn=torch.rand(2, 1, 1, 20), queries=torch.ones(1, 20, dtype=torch.bool),
              valid=torch.ones(1, 20, dtype=torch.bool))
    with pytest.raises(AssertionError, match="fell"):
        check_monotone(Falling(), s, 10, 30)
