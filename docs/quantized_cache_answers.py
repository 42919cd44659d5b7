"""Answer the prompts of a ``kvpolicy eval`` run with transformers' ``QuantizedCache`` (every
token kept, K/V quantized as KIVI does, no eviction), for comparison at the same bytes.

Runs in the project's venv with one extra package (the cache's backend):

    .venv/bin/pip install optimum-quanto          # backend "quanto"; or hqq for "HQQ"
    OMP_NUM_THREADS=1 .venv/bin/python docs/quantized_cache_answers.py kvpolicy-eval/results.json qc.json --nbits 2,4

The prompts are the very token ids of that run (``samples[].context_ids`` / ``rest_ids``),
its mode followed as docs/kvpress_answers.py does (query-agnostic: the document prefilled
alone into the cache, then the question; query-aware: the whole prompt). quanto's tensors
cannot be deep-copied, so the document is prefilled again for each question (the same
deterministic quantization a copy would hold).
Greedy, the run's ``max_new_tokens``, stopping at the model's end-of-turn tokens. The cache
keeps transformers' defaults (``q_group_size=64``, ``residual_length=128``) but ``nbits``.

Bytes: after the document's prefill, the bytes the cache holds for it (the packed codes,
scales and shifts of the quantized part, and any rows still in full precision) over the
bytes of the same K/V in the model's dtype, as ``held_fraction`` of kvpolicy's eval counts
them. Scored with kvpolicy's own ``score_answer``; prints one row per configuration and
writes the answers in docs/kvpress_answers.py's format (``_meta.label`` "transformers").
"""
import argparse
import importlib.metadata
import json
import time

import torch
from transformers import QuantizedCache

from kvpolicy.tools.embedded import load_smollm2
from kvpolicy.tools.eval.metrics import score_answer


def tensor_bytes(t) -> int:
    """Bytes of a tensor or a quanto tensor subclass (its inner tensors, packed ones too)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def held_fraction(cache, tokens: int, model) -> float:
    """The cache's bytes over the full K/V of ``tokens`` tokens in the model's dtype."""
    held = 0
    for layer in cache.layers:
        held += tensor_bytes(layer._quantized_keys) + tensor_bytes(layer._quantized_values)
        held += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values)
                    if isinstance(t, torch.Tensor))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    full = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * tokens * head_dim * model.dtype.itemsize
    return held / full


def reply(model, ids: torch.Tensor, cache, max_new_tokens: int) -> torch.Tensor:
    """Greedy new tokens after ``ids`` [1, n], the cache holding a prefix of them."""
    out = model.generate(ids, past_key_values=cache, max_new_tokens=max_new_tokens,
                         do_sample=False)
    return out[0, ids.shape[1]:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results.json of a kvpolicy eval run")
    p.add_argument("out", help="answers JSON")
    p.add_argument("--backend", default="quanto", help="QuantizedCache backend: quanto or HQQ")
    p.add_argument("--nbits", default="2,4", help="comma list of bit widths")
    args = p.parse_args()
    torch.set_grad_enabled(False)  # the caches are deep-copied per question
    with open(args.results) as f:
        results = json.load(f)
    meta = results["meta"]
    if meta["model"] != "smollm2" or meta.get("chunk_size") or meta.get("answer_prefix"):
        raise SystemExit("this script answers runs on the embedded SmolLM2, whole prompts, natural format")
    model, tok = load_smollm2(threads=torch.get_num_threads())
    aware = meta.get("mode", "query-aware") == "query-aware"
    groups: dict[tuple, list[dict]] = {}  # questions sharing a document
    for sample in results["samples"]:
        groups.setdefault(tuple(sample["context_ids"]), []).append(sample)
    answers = {"_meta": {"label": "transformers", "backend": args.backend,
                         "transformers": importlib.metadata.version("transformers"),
                         "torch": torch.__version__, "mode": meta.get("mode", "query-aware")}}
    print(f"| configuration | bytes | acc | seconds |\n|---|---:|---:|---:|")
    for nbits in [int(b) for b in args.nbits.split(",")]:
        started, scores, fractions, by_sample = time.perf_counter(), [], [], {}
        for context_ids, samples in groups.items():
            context = torch.tensor([context_ids])
            for s in samples:  # quanto's tensors cannot be deep-copied: the document is prefilled again
                ids = torch.cat([context, torch.tensor([s["rest_ids"]])], 1)
                prefix = ids[:, :-1] if aware else context
                cache = QuantizedCache(backend=args.backend, config=model.config, nbits=nbits)
                model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
                fractions.append(held_fraction(cache, prefix.shape[1], model))
                text = tok.decode(reply(model, ids, cache, meta["max_new_tokens"]), skip_special_tokens=True)
                by_sample[s["id"]] = text
                scores.append(score_answer(text, s["answers"]))
        name = f"{args.backend}-{nbits}bit"
        bytes_ = sum(fractions) / len(fractions)
        answers[name] = {f"{bytes_:.4f}": by_sample}
        print(f"| transformers QuantizedCache ({args.backend}, {nbits} bits) | {bytes_:.3f} | "
              f"{sum(scores) / len(scores):.2f} | {time.perf_counter() - started:.0f} |", flush=True)
        with open(args.out, "w") as f:
            json.dump(answers, f, indent=1)


if __name__ == "__main__":
    main()
