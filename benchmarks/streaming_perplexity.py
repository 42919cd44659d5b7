"""Perplexity of the embedded SmolLM2 on text twice its context window: the full cache vs
StreamingLLM with keys at their text positions vs StreamingLLM with positions inside the
cache (``streamingllm(positions="cache")``) vs the same window without attention sinks.

The context is shrunk, artificially: SmolLM2 has 8192 positions, and twice that is too
slow on a shared CPU. The benchmark multiplies the model's rotary frequencies by
``--stretch`` (4): position p then rotates as 4p did, so the 8192 trained positions cover
2048 tokens, the context here (set as ``max_position_embeddings``), and the text is 4096
tokens. Every configuration runs this same modified model; only the cache differs.

The text (the Python docs' topics, ``kvpolicy.tools.embedded.docs_topics``) goes through
in chunks of ``--chunk`` tokens, all logits kept: the full cache is a DynamicCache;
StreamingLLM's layers hold ``--size`` slots (4 sinks + the most recent), recompressed after
each chunk, so a token sees the sinks and between size - 4 and size - 4 + chunk recent
tokens (the paper streams one token at a time). Perplexity is reported separately over
the first context window and the second.

    OMP_NUM_THREADS=1 python benchmarks/streaming_perplexity.py [--stretch 4 --size 512]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import DynamicCache

import kvpolicy
from kvpolicy.models import CACHE_ARG
from kvpolicy.tools.embedded import docs_topics, load_smollm2


def token_losses(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """float64 [N - 1]: -log p(ids[i + 1] | ids[: i + 1]) through ``cache``, in chunks."""
    losses, last = [], None
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            part = ids[:, start:start + chunk]
            logits = model(input_ids=part, **{CACHE_ARG: cache}, use_cache=True).logits[0].double()
            if last is not None:
                logits = torch.cat([last, logits])
            targets = ids[0, max(start - 1, 0) + 1:start + part.shape[1]] if last is None else part[0]
            n = targets.shape[0]
            losses.append(torch.nn.functional.cross_entropy(logits[:n], targets, reduction="none"))
            last = logits[-1:]
    return torch.cat(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stretch", type=int, default=4)
    parser.add_argument("--size", type=int, default=512, help="StreamingLLM slots per layer")
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=0, help="text length (default: 2 x context)")
    parser.add_argument("--rows", default="full,original,cache,window",
                        help="which of full, original, cache, window to run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load_smollm2(threads=1)
    trained = model.config.max_position_embeddings
    context = trained // args.stretch
    rotary = model.model.rotary_emb
    rotary.inv_freq.mul_(args.stretch)
    rotary.original_inv_freq.mul_(args.stretch)
    model.config.max_position_embeddings = context
    text = " ".join(" ".join(docs_topics()).split())
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :args.tokens or 2 * context]
    print(f"SmolLM2, rotary x{args.stretch}: context {context} tokens, text {ids.shape[1]} tokens, "
          f"StreamingLLM {args.size} slots per layer (4 sinks), chunks of {args.chunk}")
    print("| cache | perplexity, tokens 1..{c} | perplexity, tokens {c}..{n} | seconds |".format(
        c=min(context, ids.shape[1] // 2), n=ids.shape[1]))
    print("|---|---|---|---|")
    runs = {"full": ("full (DynamicCache)", None, 4),
            "original": ("streamingllm, positions='original'", "original", 4),
            "cache": ("streamingllm, positions='cache'", "cache", 4),
            "window": ("window: streamingllm(sinks=0), positions='cache'", "cache", 0)}
    for label, positions, sinks in (runs[r] for r in args.rows.split(",")):
        start = time.perf_counter()
        if positions is None:
            losses = token_losses(model, ids, DynamicCache(config=model.config), args.chunk)
        else:
            with kvpolicy.apply(model, "streamingllm", args.size, positions=positions,
                                sinks=sinks) as handle:
                losses = token_losses(model, ids, handle.new_cache(0), args.chunk)
        half = min(context, ids.shape[1] // 2)
        first, second = losses[:half - 1], losses[half - 1:]
        print(f"| {label} | {math.exp(first.mean()):.2f} | {math.exp(second.mean()):.2f} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
