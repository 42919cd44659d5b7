"""Hypothesis strategies for policy authors: random prompt statistics and budgets."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from kvpolicy import Budget, Stats


@st.composite
def stats(draw, max_layers: int = 6, max_tokens: int = 64, with_vision: bool | None = None,
          max_new_tokens: int = 16) -> Stats:
    """Stats of a random left-padded batch: L 1-6, B 1-3, G 1-4, heads per group 1-3,
    N 1-max_tokens; scores random, all equal, or peaked; optional vision spans."""
    L, B = draw(st.integers(1, max_layers)), draw(st.integers(1, 3))
    G, g = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    N = draw(st.integers(1, max_tokens))
    pads = torch.tensor([0] + [draw(st.integers(0, N - 1)) for _ in range(B - 1)])
    valid = torch.arange(N)[None, :] >= pads[:, None]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["random", "equal", "peaked"]))
    attn = {"random": lambda: torch.rand(L, B, G, N, generator=gen),
            "equal": lambda: torch.ones(L, B, G, N),
            "peaked": lambda: torch.rand(L, B, G, N, generator=gen) ** 8}[kind]()
    attn = attn * valid[None, :, None, :]
    vision = None
    if with_vision or (with_vision is None and draw(st.booleans())):
        start = draw(st.integers(0, N - 1))
        stop = draw(st.integers(start, N))
        vision = valid & (torch.arange(N) >= start) & (torch.arange(N) < stop)
    s = Stats(attn=attn, queries=valid.clone(), valid=valid, heads_per_group=g, vision=vision,
              max_new_tokens=draw(st.integers(0, max_new_tokens)))
    entries = s.causal_entries()[None, :, None] * g
    s.below = torch.floor(torch.rand(L, B, G, generator=gen) * entries)
    return s


def budgets(max_tokens: int = 128):
    """A float fraction in (0, 1] or an int token count per layer."""
    return st.one_of(st.floats(0.001, 1.0), st.just(1.0),
                     st.integers(1, max_tokens)).map(Budget)
