"""kvpolicy inside vLLM (CPU backend, vLLM's default mode: compiled model graph, chunked
prefill) on the embedded SmolLM2: exactness against kvpolicy's HF generate, freed blocks,
deferred compaction, concurrent and preempted requests, per-request settings, refusals.
One engine (conftest's ``engine``) serves them; each policy is a request's own setting."""
import pytest

# A submodule, not "vllm": the suite puts tests/ on sys.path, where this folder would pass
# for a (namespace) package named vllm.
pytest.importorskip("vllm.engine.arg_utils",
                    reason="vLLM is not installed here (the vLLM job builds .venv-vllm: .ci/vllm)")

from vllm_support import close, greedy, hf_reference, make_llm, run_stepwise  # noqa: E402

import kvpolicy  # noqa: E402

APPEND = ["uniform", "snapkv", "pyramidkv", "prefixkv", "vlcache", "spankv"]  # their defaults
BLOCK = 32
pytestmark = pytest.mark.slow


def test_policy_none_and_budget_one_equal_transformers(smollm2, engine, prompts):
    """A request with policy "none" and one at budget 1 give transformers' own greedy
    tokens and free nothing."""
    run = run_stepwise(engine, prompts[:1] * 2, [greedy(policy="none"), greedy(policy="snapkv", budget=1.0)])
    plain, _ = hf_reference(smollm2, prompts[0], None)
    assert run["tokens"] == [plain, plain]
    assert run["freed"] == [0, 0]
    assert run["plans"][0] is None and run["plans"][1][0] == 0


@pytest.mark.parametrize("policy", APPEND)
def test_budget_tenth_equals_hf_generate(smollm2, engine, prompts, policy):
    """Tokens equal kvpolicy's HF generate; each layer keeps as many tokens as in HF's plan;
    the blocks freed are those below the base that plan implies, floor((P - max_l n_l) /
    block size), P = prompt + deferred decode steps (SpanKV defers 8; VL-Cache's density
    allocation can give one layer nearly the whole prompt, and then frees nothing)."""
    prompt = prompts[-1]
    run = run_stepwise(engine, [prompt], greedy(policy=policy, budget=0.1))
    tokens, kept = hf_reference(smollm2, prompt, policy, 0.1)
    planned = len(prompt) + kvpolicy.get_policy(policy).requirements().defer
    assert run["plans"] == [((planned - max(kept)) // BLOCK * BLOCK, kept)]
    assert run["tokens"] == [tokens]
    assert run["freed"] == [(planned - max(kept)) // BLOCK]


@pytest.fixture(scope="module")
def pyramid_references(smollm2, prompts):
    """(tokens, kept per layer) of kvpolicy's HF generate, PyramidKV 0.1, for each prompt."""
    return [hf_reference(smollm2, p, "pyramidkv", 0.1) for p in prompts]


def test_concurrent_chunked_requests_in_a_small_pool(engine, prompts, pyramid_references):
    """Three prompts of different lengths, prefilled in 128-token chunks, in a pool that
    cannot hold them all at full size: each equals its HF reference, frees exactly the
    blocks below its base and, with blocks freed, all three run at once."""
    run = run_stepwise(engine, prompts, greedy(policy="pyramidkv"))
    pool = engine.llm_engine.vllm_config.cache_config.num_gpu_blocks_override
    assert run["tokens"] == [tokens for tokens, _ in pyramid_references]
    assert run["freed"] == [(len(p) - max(kept)) // BLOCK for p, (_, kept) in zip(prompts, pyramid_references)]
    assert run["max_running"] == 3
    assert run["peak_blocks"] < pool
    assert run["preemptions"] == [0, 0, 0]


def test_preempted_requests_resume_exactly(engine, prompts, pyramid_references):
    """Requests preempted once the first has 4 new tokens (vLLM's recompute preemption)
    re-run their prompt in chunks that stop at the prompt's end, are planned again,
    recompute their new tokens over the compacted cache and continue with the tokens of an
    unpreempted run."""
    run = run_stepwise(engine, prompts, greedy(policy="pyramidkv"), preempt_at=4)
    assert run["preemptions"][0] == 1  # the first request, 4 tokens into its answer
    assert run["crossed"] == [False, False, False]
    assert run["tokens"] == [tokens for tokens, _ in pyramid_references]


def test_preempted_deferred_request_resumes_exactly(smollm2, engine, prompts):
    """SpanKV (defer=8) preempted after its plan: the recomputed chunk stops at the prompt's
    end plus the 8 deferred steps, which are observed again before the plan."""
    run = run_stepwise(engine, prompts[:1], greedy(policy="spankv"), preempt_at=10)
    assert run["preemptions"] == [1]
    assert run["tokens"] == [hf_reference(smollm2, prompts[0], "spankv", 0.1)[0]]


@pytest.mark.parametrize("extra, key", [
    ({"kvpolicy_policy": "snapkvv"}, "kvpolicy_policy"),
    ({"kvpolicy_policy": "snapkv", "kvpolicy_budget": 1.5}, "kvpolicy_budget"),
    ({"kvpolicy_policy": "snapkv", "kvpolicy_budget": 4}, "kvpolicy_budget"),
    ({"kvpolicy_policy": "snapkv", "kvpolicy_colour": 1}, "kvpolicy_colour"),
    ({"kvpolicy_policy": "h2o"}, "kvpolicy_policy"),
    ({"kvpolicy_budget": 0.2}, "kvpolicy_budget"),
    ({"kvpolicy_policy": "none", "kvpolicy_budget": 0.2}, "kvpolicy_policy"),
])
def test_bad_request_settings_fail_that_request(engine, prompts, extra, key):
    """An invalid per-request value fails that request at admission with vLLM's validation
    error (HTTP 400 on the server) naming the key; the engine goes on serving."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=f"^{key}"):
        engine.generate([{"prompt_token_ids": prompts[0]}],
                        SamplingParams(max_tokens=2, extra_args=extra), use_tqdm=False)
    assert len(engine.generate([{"prompt_token_ids": prompts[0]}], greedy(2), use_tqdm=False)) == 1


def test_eager_mode(smollm2, hf_dir, prompts):
    """enforce_eager=True (no compiled graph) serves the tokens of HF generate. Runs last in
    the session (conftest): shutting an in-process engine down tears down vLLM's
    process-wide parallel state, which the session engine needs."""
    llm = make_llm(hf_dir, {"policy": "snapkv", "budget": 0.1}, enforce_eager=True)
    try:
        run = run_stepwise(llm, prompts[-1:], greedy())
    finally:
        close(llm)
    assert run["tokens"] == [hf_reference(smollm2, prompts[-1], "snapkv", 0.1)[0]]


@pytest.mark.parametrize("entry, error", [
    ({"policy": "snapkvv"}, kvpolicy.UnknownPolicyError),
    ({"policy": "snapkv", "budget": 1.5}, ValueError),
    ({"policy": "snapkv", "budget": 4}, ValueError),
    ({"policy": "snapkv", "kernel": 7, "colour": 1}, TypeError),
    ({"policy": "h2o"}, ValueError),
    ({"policy": "streamingllm"}, ValueError),
    ({"policy": "tova"}, ValueError),
    ({"policy": "keydiff"}, ValueError),  # needs the cached keys in its Stats
    ({"policy": "kvzip"}, ValueError),  # needs reconstruction passes
    ({"policy": "expected_attention"}, ValueError),  # needs query statistics
    ("snapkv", ValueError),
])
def test_bad_settings_fail_at_engine_start(hf_dir, entry, error):
    from vllm import LLM

    with pytest.raises(error):
        LLM(model=hf_dir, additional_config={"kvpolicy": entry})


@pytest.mark.parametrize("option, message", [
    ({"enable_prefix_caching": True}, "prefix_caching"),
    ({"tensor_parallel_size": 2}, "tensor_parallel_size"),
    ({"pipeline_parallel_size": 2}, "pipeline_parallel_size"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}, "speculative"),
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
    ({"scheduler_cls": "vllm.v1.core.sched.scheduler.Scheduler"}, "scheduler_cls"),
])
def test_options_that_cannot_work_are_refused(hf_dir, option, message):
    from vllm import LLM

    with pytest.raises(ValueError, match=message):
        LLM(model=hf_dir, additional_config={"kvpolicy": {"policy": "snapkv"}}, **option)


def test_other_platforms_are_refused_at_engine_start(hf_dir, monkeypatch):
    """On a platform other than CPU (e.g. CUDA) the engine is refused before its config is
    built: the plugin's GPU path is not implemented."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    with pytest.raises(ValueError, match="CPU backend"):
        EngineArgs(model=hf_dir, additional_config={"kvpolicy": {"policy": "snapkv"}}).create_engine_config()


def test_without_the_key_the_config_is_vllms(hf_dir):
    """Without the kvpolicy key the plugin leaves vLLM's defaults alone (prefix caching and
    chunked prefill stay on, vLLM's scheduler, no logits processor)."""
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=hf_dir).create_engine_config()
    assert config.cache_config.enable_prefix_caching is True
    assert config.scheduler_config.enable_chunked_prefill is True
    assert config.scheduler_config.scheduler_cls is None
    assert not config.model_config.logits_processors


@pytest.mark.parametrize("entry, error", [('{"policy": "nope"}', kvpolicy.UnknownPolicyError),
                                          ('{"policy": "snapkv", "budget": 0.1}', None)])
def test_serve_cli_reaches_the_plugin(hf_dir, entry, error):
    """``vllm serve MODEL --additional-config '{"kvpolicy": ...}'`` builds its engine config
    through the plugin: bad settings fail, good ones switch prefix caching off and select
    the plugin's scheduler."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    cli = parser.parse_args(["--model", hf_dir, "--additional-config", f'{{"kvpolicy": {entry}}}'])
    args = AsyncEngineArgs.from_cli_args(cli)
    if error is not None:
        with pytest.raises(error):
            args.create_engine_config()
    else:
        config = args.create_engine_config()
        assert config.cache_config.enable_prefix_caching is False
        assert config.scheduler_config.scheduler_cls == "kvpolicy.vllm.scheduler.KVPolicyScheduler"
