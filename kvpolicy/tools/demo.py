"""``kvpolicy demo``: a needle in a long prompt, answered by the embedded SmolLM2 with the
full cache and with each built-in policy; prints the answer, KV bytes, tokens kept per
layer, prefill and decode time."""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from kvpolicy import apply, available_policies, models, policy_class

from .embedded import ANSWER, NEEDLE, load_smollm2, needle_prompt
from .params import tokenizer_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=float, default=0.1, help="kept fraction of the prompt's KV entries")
    parser.add_argument("--policies", nargs="+", default=None,
                        help="policies to compare with the full cache (default: the built-ins)")
    parser.add_argument("--tokens", type=int, default=1500, help="prompt length in tokens (approx.)")
    parser.add_argument("--depth", type=float, default=0.5, help="where the needle sits (0 = start, 1 = end)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    model, tok = load_smollm2(threads=args.threads)
    inputs = needle_prompt(tok, args.tokens, args.depth)
    N = inputs["input_ids"].shape[1]
    print(f"prompt: {N} tokens, needle at depth {args.depth:.0%}: {NEEDLE!r}; budget {args.budget}")
    rows = []
    for name in tqdm(["full", *(args.policies or built_in())], desc="kvpolicy demo", unit="config"):
        if name == "full":
            rows.append(measure(model, tok, inputs, args.max_new_tokens, name))
        else:
            with apply(model, name, args.budget, **tokenizer_for(name, tok)):
                rows.append(measure(model, tok, inputs, args.max_new_tokens, name))
    print(table(rows))
    return 0


def built_in() -> list[str]:
    """The policies shipped in kvpolicy.policies (not plugins)."""
    return [n for n in available_policies() if policy_class(n).__module__.startswith("kvpolicy.policies.")]


def measure(model, tok, inputs: dict, max_new_tokens: int, name: str, **generate_kwargs) -> dict:
    """Greedy generation timed per forward: answer, KV bytes, kept tokens per layer, prefill
    seconds (until the first one-token forward starts: the prompt's forwards, KVzip's
    reconstruction passes included), decode ms/token (the one-token forwards)."""
    begun: list[tuple[float, int]] = []  # (start, tokens) of each forward, nested ones too
    steps: list[float] = []  # seconds of each one-token forward
    first_step: list[float] = []  # when the first one-token forward started

    def before(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        begun.append((time.perf_counter(), ref.shape[1]))

    def after(module, args, kwargs, output):
        start, tokens = begun.pop()
        if tokens == 1:
            steps.append(time.perf_counter() - start)
            first_step.append(start)

    pre = model.register_forward_pre_hook(before, with_kwargs=True)
    post = model.register_forward_hook(after, with_kwargs=True)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 return_dict_in_generate=True, **generate_kwargs)
    finally:
        pre.remove()
        post.remove()
    end = time.perf_counter()
    cache = models.output_cache(out)
    N = inputs["input_ids"].shape[1]
    if hasattr(cache, "nbytes"):
        kv_bytes, kept = cache.nbytes(), cache.kept
    else:
        kv_bytes = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)
        kept = [N] * len(cache.layers)
    answer = tok.decode(out.sequences[0, N:], skip_special_tokens=True).strip()
    return dict(name=name, answer=answer, correct=ANSWER in answer, kv_bytes=kv_bytes, kept=kept,
                prefill_s=(first_step[0] if first_step else end) - start,
                decode_ms=1000 * sum(steps) / max(1, len(steps)))


def table(rows: list[dict]) -> str:
    head = f"{'config':<20}{'answer':<26}{'ok':<4}{'KV MiB':>8}{'kept/layer min/mean/max':>26}" \
           f"{'prefill s':>11}{'decode ms/tok':>15}"
    lines = [head, "-" * len(head)]
    for r in rows:
        k = r["kept"]
        kept = f"{min(k):.0f}/{sum(k) / len(k):.0f}/{max(k):.0f}"  # per head: means over heads
        answer = r["answer"].replace("\n", " ")[-24:]  # the end: the model restates the question first
        lines.append(f"{r['name']:<20}{answer:<26}{'yes' if r['correct'] else 'no':<4}"
                     f"{r['kv_bytes'] / 2**20:>8.2f}{kept:>26}{r['prefill_s']:>11.2f}{r['decode_ms']:>15.1f}")
    return "\n".join(lines)
