"""Helpers for the vLLM plugin tests: engines built in this process (vLLM's default mode:
compiled model graph, chunked prefill), a stepwise runner that watches the scheduler's
block pool, and kvpolicy's HF reference generate."""
import gc
import itertools

NEW_TOKENS = 12
WORDS = (180, 300, 420)  # about 300, 460 and 620 prompt tokens
_runs = itertools.count()


QUESTION = "Summarize the text above in one sentence."


def chat_messages(words: int, question: str = QUESTION) -> list[dict]:
    """One user message: ``words`` words of pydoc text, then the question."""
    from pydoc_data.topics import topics

    text = " ".join(" ".join(topics[k] for k in sorted(topics)).split()[:words])
    return [{"role": "user", "content": f"{text}\n\n{question}"}]


def chat_prompt(tok, words: int, question: str = QUESTION) -> list[int]:
    """Token ids of the chat-templated ``chat_messages``."""
    msgs = chat_messages(words, question)
    return tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]


def make_llm(hf_dir: str, kvpolicy: dict | None = None, **kwargs):
    """An in-process vLLM engine on the exported model (float32, vLLM's defaults otherwise)."""
    from vllm import LLM

    if kvpolicy is not None:
        kwargs["additional_config"] = {"kvpolicy": kvpolicy}
    kwargs.setdefault("max_model_len", 2048)
    return LLM(model=hf_dir, dtype="float32", seed=0, **kwargs)


def small_pool_args(prompts) -> dict:
    """Engine arguments for the shared engines: 128-token prefill chunks, 32-token blocks, a
    pool 8 blocks short of holding ``prompts`` (and their new tokens) at full size."""
    full_blocks = sum(-(-(len(p) + NEW_TOKENS) // 32) for p in prompts)
    return dict(block_size=32, max_model_len=1024, max_num_batched_tokens=128, max_num_seqs=4,
                num_gpu_blocks_override=full_blocks - 8)


def close(llm) -> None:
    """Shut an in-process engine down and release its KV pool."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def greedy(new_tokens: int = NEW_TOKENS, **kvpolicy):
    """Greedy SamplingParams; ``kvpolicy``: per-request settings (policy=..., budget=...)."""
    from vllm import SamplingParams

    extra = {f"kvpolicy_{k}": v for k, v in kvpolicy.items()}
    return SamplingParams(max_tokens=new_tokens, temperature=0.0, extra_args=extra or None)


def scheduler(llm):
    """The engine's scheduler (in-process engines only)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def run_stepwise(llm, token_ids: list[list[int]], params, preempt_at: int | None = None) -> dict:
    """Submit all prompts at once and step the engine to the end, watching the block pool.

    preempt_at: once a request has that many new tokens, the scheduler preempts every
    running request (vLLM's own preemption, through ``reset_prefix_cache``); they resume
    by recomputing their prompt and new tokens.
    params: one SamplingParams for all prompts, or a list of one per prompt.
    Returns tokens (list per prompt), plans (per prompt the (base, kept per layer) of its
    last plan, None if never planned), peak_blocks (most blocks in use at once, sampled
    when a step is scheduled), max_running (most requests running at once), freed (per
    request, the most of its blocks that held the null block at once), preemptions (per
    request) and crossed (per request: whether a step computed tokens on both sides of its
    prompt's end, which only a resumed request can be scheduled to do).
    """
    engine, sched = llm.llm_engine, scheduler(llm)
    pool = sched.kv_cache_manager.block_pool
    manager = sched.kv_cache_manager.coordinator.single_type_managers[0]
    total = pool.num_gpu_blocks - 1  # block 0 is the null block
    run = next(_runs)  # request ids unique per engine: an engine may serve several runs
    index = {f"{run}-{i}": i for i in range(len(token_ids))}

    def ours(engine_id: str) -> str:  # the engine's request id is ours plus "-" and a random tag
        return engine_id if engine_id in index else engine_id.rsplit("-", 1)[0]

    watch = {"peak": 0, "running": 0}
    crossed: set[str] = set()
    schedule = sched.schedule

    def watched(*args, **kwargs):  # blocks in use once a step is scheduled, before it frees any
        out = schedule(*args, **kwargs)
        watch["peak"] = max(watch["peak"], total - pool.get_num_free_blocks())
        watch["running"] = max(watch["running"], len(sched.running))
        for req_id, n in out.num_scheduled_tokens.items():  # computed tokens already advanced
            req = sched.requests[req_id]
            if req.num_computed_tokens - n < req.num_prompt_tokens < req.num_computed_tokens:
                crossed.add(ours(req_id))
        return out

    sched.schedule = watched
    for req_id, i in index.items():
        engine.add_request(req_id, {"prompt_token_ids": token_ids[i]},
                           params[i] if isinstance(params, list) else params)
    tokens, freed, preemptions, plans = {}, {}, {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
        for req_id, req in sched.requests.items():
            preemptions[ours(req_id)] = req.num_preemptions
            plans[ours(req_id)] = getattr(req, "kvpolicy_plan", None)
        if preempt_at is not None and any(r.num_output_tokens >= preempt_at for r in sched.running):
            engine.reset_prefix_cache(reset_running_requests=True)
            preempt_at = None
        for req_id, blocks in manager.req_to_blocks.items():
            nulls = sum(b is manager._null_block for b in blocks)
            freed[ours(req_id)] = max(freed.get(ours(req_id), 0), nulls)
    order = sorted(index, key=index.get)
    return {"tokens": [tokens[k] for k in order], "plans": [plans[k] for k in order], "peak_blocks": watch["peak"], "max_running": watch["running"],
            "freed": [freed[k] for k in order], "preemptions": [preemptions[k] for k in order],
            "crossed": [k in crossed for k in order]}


def hf_reference(smollm2, token_ids: list[int], policy: str | None, budget: float = 0.1,
                 new_tokens: int = NEW_TOKENS, **params) -> tuple[list[int], list[int] | None]:
    """(new tokens, kept tokens per layer) of kvpolicy's HF greedy generate (policy None:
    transformers' own generate, kept None)."""
    import contextlib

    import torch

    import kvpolicy

    model, _ = smollm2
    ids = torch.tensor([token_ids])
    ctx = contextlib.nullcontext() if policy is None else kvpolicy.apply(model, policy, budget, **params)
    with torch.no_grad(), ctx:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), getattr(out.past_key_values, "kept", None)
