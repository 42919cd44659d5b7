"""``kvpolicy eval`` with the ablation policies the papers compare against, registered
under their own names so that the eval runs them like any built-in:

- ``uniform-prefixkv`` / ``uniform-vlcache``: that policy's scores, protected tokens and
  selection with equal layer budgets (``uniform(scores=...)``): allocation alone differs;
- ``window``: StreamingLLM without attention sinks (``streamingllm(sinks=0)``): a rolling
  window of the most recent tokens at the same fixed size as ``h2o`` and ``streamingllm``.

Usage (arguments as ``kvpolicy eval``; docs/reproduction.md gives the runs it reports),
then the paired comparison table of a results.json:

    OMP_NUM_THREADS=1 python benchmarks/reproduction.py --policies prefixkv,uniform-prefixkv ...
    python benchmarks/reproduction.py summarize kvpolicy-eval/results.json
"""
from __future__ import annotations

import sys

import torch

from kvpolicy.policies import StreamingLLM, Uniform
from kvpolicy.registry import register_policy
from kvpolicy.tools.cli import main


@register_policy("uniform-prefixkv")
class UniformPrefixKV(Uniform):
    """prefixkv's scores and selection, equal layer budgets."""

    def __init__(self):
        super().__init__(scores="prefixkv")


@register_policy("uniform-vlcache")
class UniformVLCache(Uniform):
    """vlcache's scores and selection, equal layer budgets."""

    def __init__(self):
        super().__init__(scores="vlcache")


@register_policy("window")
class Window(StreamingLLM):
    """The most recent tokens only: streamingllm without sinks."""

    def __init__(self):
        super().__init__(sinks=0)


# (paper's method, what the paper says it beats, paper)
PAIRS = [("pyramidkv", "snapkv", "PyramidKV"), ("prefixkv", "uniform-prefixkv", "PrefixKV"),
         ("vlcache", "uniform-vlcache", "VL-Cache"), ("h2o", "window", "H2O"),
         ("streamingllm", "window", "StreamingLLM"), ("snapkv", "h2o", "SnapKV")]


def summarize(path: str) -> None:
    """Print, per pair and budget: mean KL to the full cache and accuracy of each side, and
    on how many samples the paper's method has the lower KL (paired)."""
    import json

    runs = [r for r in json.load(open(path))["runs"] if not r.get("error")]
    by = {(r["policy"], r["budget"], r["sample"]): r for r in runs}
    budgets = sorted({r["budget"] for r in runs if r["policy"] != "full"})
    print("| paper | method vs baseline | budget | KL method / baseline | accuracy method / "
          "baseline | samples with lower KL |")
    print("|---|---|---|---|---|---|")
    for method, base, paper in PAIRS:
        for b in budgets:
            samples = sorted({k[2] for k in by if k[0] == method and k[1] == b}
                             & {k[2] for k in by if k[0] == base and k[1] == b})
            if not samples:
                continue
            m = [by[(method, b, s)] for s in samples]
            o = [by[(base, b, s)] for s in samples]
            mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
            wins = sum(x["kl"] < y["kl"] for x, y in zip(m, o))
            print(f"| {paper} | {method} vs {base} | {b:g} | {mean(m, 'kl'):.3f} / {mean(o, 'kl'):.3f} | "
                  f"{mean(m, 'score'):.2f} / {mean(o, 'score'):.2f} | {wins} of {len(samples)} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1:2] == ["summarize"]:
        summarize(sys.argv[2])
    else:
        raise SystemExit(main(["eval", *sys.argv[1:]]))
