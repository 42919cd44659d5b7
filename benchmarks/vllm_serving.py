"""Serving benchmark of the kvpolicy vLLM plugin: a fixed KV pool, N concurrent long-prompt
requests, full cache vs a kvpolicy budget. Reports requests running at once, tokens/s and
the peak number of KV blocks in use.

    .venv-vllm/bin/python benchmarks/vllm_serving.py MODEL_DIR [--requests 4] [--blocks 96]

MODEL_DIR is a Hugging Face folder (the embedded SmolLM2 exported by
``tests/vllm/smollm2_hf.py``, or any Llama-family model). Engines run in this process, one
after the other, greedy, with vLLM's default scheduling (chunked prefill on).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler is watched
# The pool is fixed by --blocks; an explicit KV space also spares vLLM's start-up check that
# most of the machine's memory is free (which fails on a machine shared with other jobs).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def prompts(tokenizer, count: int, words: int) -> list[list[int]]:
    """``count`` different chat prompts of ``words`` words of pydoc text each."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics)).split()
    out = []
    for i in range(count):
        body = " ".join(text[i * words:(i + 1) * words])
        msgs = [{"role": "user", "content": f"{body}\n\nSummarize the text above in one sentence."}]
        out.append(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"])
    return out


def serve(model: str, token_ids: list[list[int]], new_tokens: int, blocks: int,
          kvpolicy: dict | None) -> dict:
    """Run all requests at once on a pool of ``blocks`` 32-token blocks; step to the end.
    The model length is the longest request's, rounded up to whole blocks."""
    from vllm import LLM, SamplingParams

    extra = {"additional_config": {"kvpolicy": kvpolicy}} if kvpolicy else {}
    max_len = -(-(max(len(t) for t in token_ids) + new_tokens) // 32) * 32
    llm = LLM(model=model, dtype="float32", max_model_len=max_len, enforce_eager=True, seed=0,
              block_size=32, num_gpu_blocks_override=blocks, disable_log_stats=True, **extra)
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    pool = sched.kv_cache_manager.block_pool
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0)
    watch = {"peak": 0, "running": 0}
    schedule = sched.schedule

    def watched(*args, **kwargs):  # blocks in use once a step is scheduled, before it frees any
        out = schedule(*args, **kwargs)
        watch["peak"] = max(watch["peak"], blocks - 1 - pool.get_num_free_blocks())
        watch["running"] = max(watch["running"], len(sched.running))
        return out

    sched.schedule = watched
    start = time.perf_counter()
    for i, ids in enumerate(token_ids):
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    generated = 0
    preemptions: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
        preemptions.update({r: q.num_preemptions for r, q in sched.requests.items()})
    seconds = time.perf_counter() - start
    engine.engine_core.shutdown()
    del llm
    gc.collect()
    prompt_tokens = sum(len(t) for t in token_ids)
    return {"config": kvpolicy or "full", "max_running": watch["running"], "peak_blocks": watch["peak"],
            "preemptions": sum(preemptions.values()),
            "seconds": round(seconds, 1), "output_tok_s": round(generated / seconds, 2),
            "total_tok_s": round((prompt_tokens + generated) / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--words", type=int, default=700, help="words of text per prompt (~1.5 tokens each)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=72, help="KV pool size in 32-token blocks")
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--budget", type=float, default=0.1)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    token_ids = prompts(AutoTokenizer.from_pretrained(args.model), args.requests, args.words)
    print(json.dumps({"requests": args.requests, "prompt_tokens": [len(t) for t in token_ids],
                      "new_tokens": args.new_tokens, "pool_blocks": args.blocks}))
    for config in (None, {"policy": args.policy, "budget": args.budget}):
        print(json.dumps(serve(args.model, token_ids, args.new_tokens, args.blocks, config)), flush=True)


if __name__ == "__main__":
    main()
