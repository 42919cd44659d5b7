"""The kit's invariants for RandomKeep (random scores: not permutation-equivariant)."""
from kvpolicy.testing import check_policy
from kvpolicy_random import RandomKeep


def test_random_keep_invariants():
    check_policy(RandomKeep, equivariant=False)
