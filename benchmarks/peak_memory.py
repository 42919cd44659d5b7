"""Peak memory of prefilling a long prompt on the embedded SmolLM2: a full-cache prefill
(DynamicCache, last position's logits only) against ``kvpolicy.compress`` per policy, whole
and in chunks. Each configuration runs in its own process; the number is the growth of the
process's peak resident set (VmHWM) over its resident set just before the prefill. So that
the resident set follows the live tensors, glibc's heap is trimmed before the baseline and
its mmap threshold is fixed (else memory freed while loading the model stays resident and
is reused unseen, which understates every peak and most the smaller ones).

    python benchmarks/peak_memory.py --tokens 6000 --chunk 512 [--policies snapkv,h2o]

Prints a markdown table (MiB, and the ratio to the full-cache prefill).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys

POLICIES = ["uniform", "snapkv", "pyramidkv", "prefixkv", "vlcache", "spankv", "h2o", "streamingllm"]


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field))
    return int(line.split()[1]) * 1024


def child(policy: str, tokens: int, chunk: int | None, budget: float) -> None:
    import torch
    from transformers import DynamicCache

    import kvpolicy
    from kvpolicy.models import CACHE_ARG
    from kvpolicy.tools.embedded import load_smollm2, needle_prompt
    from kvpolicy.tools.params import tokenizer_for

    model, tok = load_smollm2(threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ids = needle_prompt(tok, tokens, 0.5)["input_ids"]
    with torch.no_grad():  # warm-up on a short prompt: allocator and kernels
        model(ids[:, :64], **{CACHE_ARG: DynamicCache(config=model.config)}, logits_to_keep=1)
        kvpolicy.compress(model, ids[:, :64], "snapkv", budget=0.5)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back before the baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = status_bytes("VmRSS:")
    with torch.no_grad():
        if policy == "full":
            cache = DynamicCache(config=model.config)
            model(ids, **{CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
            kept = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        else:
            cache = kvpolicy.compress(model, ids, policy, budget=budget, chunk_size=chunk,
                                      **tokenizer_for(policy, tok))
            kept = cache.nbytes()
    print(json.dumps({"peak": status_bytes("VmHWM:") - before, "kept": kept,
                      "tokens": ids.shape[1]}))


def run(policy: str, tokens: int, chunk: int | None, budget: float) -> dict:
    args = [sys.executable, __file__, "--child", policy, "--tokens", str(tokens), "--budget",
            str(budget), "--chunk", str(chunk or 0)]
    # a fixed threshold: large tensors get their own mappings, returned to the OS when freed
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=6000)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--child")
    a = parser.parse_args()
    if a.child:
        return child(a.child, a.tokens, a.chunk or None, a.budget)  # --chunk 0: whole prompt
    full = run("full", a.tokens, None, a.budget)
    mib = 2 ** 20
    print(f"prompt {full['tokens']} tokens, budget {a.budget}, chunk {a.chunk}; full-cache prefill "
          f"peak growth {full['peak'] / mib:.1f} MiB (cache {full['kept'] / mib:.1f} MiB)\n")
    print("| policy | whole prompt: peak MiB | x full | chunked: peak MiB | x full | kept MiB |")
    print("|---|---|---|---|---|---|")
    for policy in a.policies.split(","):
        whole, chunked = run(policy, a.tokens, None, a.budget), run(policy, a.tokens, a.chunk, a.budget)
        print(f"| {policy} | {whole['peak'] / mib:.1f} | {whole['peak'] / full['peak']:.2f} | "
              f"{chunked['peak'] / mib:.1f} | {chunked['peak'] / full['peak']:.2f} | "
              f"{chunked['kept'] / mib:.1f} |", flush=True)


if __name__ == "__main__":
    main()
