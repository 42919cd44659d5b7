"""Two ways to give StreamingLLM's cached keys positions inside the cache, one decode step
of one layer each, on CPU (one thread), with SmolLM2's shapes (3 KV heads, 9 query heads,
head dim 64, rope theta 100000), 4 sinks and a full ring of ``S`` slots:

- ``rerotate``: keys stored rotated at their rank in the cache; when the oldest non-sink
  token leaves, every later key's rank drops by one, so each step rotates the window's
  keys by one position back, in place (a constant rotation, no gather);
- ``unrotated`` (what kvpolicy does): keys stored un-rotated; each step ranks the slots
  (a sort), gathers cos / sin at the ranks and rotates all keys into a temporary.

Also timed: the step's attention (grouped_attention over S slots), for scale. And the
error: each way's key, after its lifetime in the window (S - sinks steps), against the
exact rotation in float64, in float32 and bfloat16.

    OMP_NUM_THREADS=1 python benchmarks/streaming_rotation.py [--slots 256,1024,4096]
"""
from __future__ import annotations

import argparse
import time

import torch

from kvpolicy.rotary import cache_ranks
from kvpolicy.attention import grouped_attention

G, H, D, SINKS, THETA = 3, 9, 64, 4, 100000.0


def cos_sin(positions: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (THETA ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = positions.double()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def step_rerotate(keys: torch.Tensor, back: tuple[torch.Tensor, torch.Tensor]) -> None:
    """keys [1, G, S, D] rotated at their ranks: the window's ranks drop by one."""
    window = keys[:, :, SINKS:]
    window.copy_(rotate(window, *back))


def step_unrotated(keys: torch.Tensor, pos: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]):
    """keys [1, G, S, D] un-rotated, pos int64 [1, S]: keys rotated at their ranks."""
    ranks, _ = cache_ranks(pos)
    cos, sin = table[0][ranks][:, None], table[1][ranks][:, None]
    return rotate(keys, cos, sin)


def per_step(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def timings(S: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    keys, values = torch.randn(1, G, S, D), torch.randn(1, G, S, D)
    query = torch.randn(1, H, 1, D)
    pos = torch.randperm(S)[None] + 1000  # a ring: slots hold positions in any order
    table = cos_sin(torch.arange(S))
    back = cos_sin(torch.tensor(-1))
    visible = torch.ones(1, G, S, dtype=torch.bool)
    return {
        "rerotate": per_step(lambda: step_rerotate(keys, back), repeats),
        "unrotated": per_step(lambda: step_unrotated(keys, pos, table), repeats),
        "attention": per_step(lambda: grouped_attention(query, keys, values, visible, D ** -0.5),
                              repeats),
    }


def errors(S: int, dtype: torch.dtype) -> dict[str, float]:
    """Max relative error of one key after S - SINKS steps in the window (its lifetime)."""
    torch.manual_seed(1)
    key = torch.randn(1, 1, 1, D, dtype=torch.float64)
    start, end = S - 1, SINKS  # rank when it joins, rank just before it leaves
    exact = rotate(key, *cos_sin(torch.tensor(end), torch.float64))
    k = rotate(key.to(dtype), *cos_sin(torch.tensor(start), dtype))
    back = cos_sin(torch.tensor(-1), dtype)
    for _ in range(start - end):
        k = rotate(k, *back)
    rerotated = (k.double() - exact).norm() / exact.norm()
    stored = key.to(dtype)  # kvpolicy: the model's rotated key, un-rotated, stored, re-rotated
    model_rotated = rotate(stored, *cos_sin(torch.tensor(start), dtype))
    unrot = rotate(model_rotated.float(), *(c.float() for c in _inverse(cos_sin(torch.tensor(start))))).to(dtype)
    again = rotate(unrot.float(), *cos_sin(torch.tensor(end))).to(dtype)
    unrotated = (again.double() - exact).norm() / exact.norm()
    return {"rerotate": float(rerotated), "unrotated": float(unrotated)}


def _inverse(cs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return cs[0], -cs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", default="256,1024,4096")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| slots S | re-rotate (us/step) | un-rotated + rotate at attention (us/step) | "
          "attention (us/step) | error fp32: re-rotate / un-rotated | error bf16: re-rotate / un-rotated |")
    print("|---|---|---|---|---|---|")
    for S in (int(s) for s in args.slots.split(",")):
        t = timings(S, args.repeats)
        e32, e16 = errors(S, torch.float32), errors(S, torch.bfloat16)
        print(f"| {S} | {t['rerotate']:.0f} | {t['unrotated']:.0f} | {t['attention']:.0f} | "
              f"{e32['rerotate']:.1e} / {e32['unrotated']:.1e} | "
              f"{e16['rerotate']:.1e} / {e16['unrotated']:.1e} |")


if __name__ == "__main__":
    main()
