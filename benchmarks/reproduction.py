"""``kvpolicy eval`` with the ablation policies the papers compare against, registered
under their own names so that the eval runs them like any built-in:

- ``uniform-prefixkv`` / ``uniform-vlcache``: that policy's scores, protected tokens and
  selection with equal layer budgets (``uniform(scores=...)``): allocation alone differs;
- ``window``: StreamingLLM without attention sinks (``streamingllm(sinks=0)``): a rolling
  window of the most recent tokens at the same fixed size as ``h2o`` and ``streamingllm``.

Usage (arguments as ``kvpolicy eval``; docs/reproduction.md gives the runs it reports):

    OMP_NUM_THREADS=1 python benchmarks/reproduction.py --policies prefixkv,uniform-prefixkv ...
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


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main(["eval", *sys.argv[1:]]))
