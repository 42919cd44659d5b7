"""kvpolicy inside vLLM (CPU backend) on the embedded SmolLM2: exactness against plain vLLM
and against kvpolicy's HF generate, freed blocks, concurrent requests, refusals."""
import pytest

# A submodule, not "vllm": the suite puts tests/ on sys.path, where this folder would pass
# for a (namespace) package named vllm.
pytest.importorskip("vllm.engine.arg_utils",
                    reason="vLLM is not installed here (the vLLM job builds .venv-vllm: .ci/vllm)")

from vllm_support import close, greedy, hf_reference, make_llm, run_stepwise  # noqa: E402

import kvpolicy  # noqa: E402

APPEND = ["uniform", "snapkv", "pyramidkv", "prefixkv", "vlcache", "spankv"]
ON_VLLM = {"spankv": {"defer": 0}}  # vLLM plans at the prompt's end: no deferred compaction
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plain_tokens(hf_dir, prompts):
    llm = make_llm(hf_dir)
    try:
        return run_stepwise(llm, prompts, greedy())["tokens"]
    finally:
        close(llm)


def test_budget_one_equals_plain_vllm(hf_dir, prompts, plain_tokens):
    llm = make_llm(hf_dir, {"policy": "snapkv", "budget": 1.0})
    try:
        run = run_stepwise(llm, prompts, greedy())
    finally:
        close(llm)
    assert run["tokens"] == plain_tokens
    assert run["freed"] == [0, 0, 0]


@pytest.mark.parametrize("policy", [p for p in APPEND if p != "pyramidkv"])  # pyramidkv: below
def test_budget_tenth_equals_hf_generate(smollm2, hf_dir, prompts, policy):
    """Tokens equal kvpolicy's HF generate; each layer keeps as many tokens as in HF's plan;
    the blocks freed are those below the base that plan implies, floor((N - max_l n_l) /
    block size) (VL-Cache's density allocation can give one layer nearly the whole prompt,
    and then frees nothing)."""
    from kvpolicy.vllm import runner

    params = ON_VLLM.get(policy, {})
    llm = make_llm(hf_dir, {"policy": policy, "budget": 0.1, **params})
    try:
        block = llm.llm_engine.vllm_config.cache_config.block_size
        run = run_stepwise(llm, prompts[-1:], greedy())
        planned = [state.kept for state in runner.worker().requests.values()]
    finally:
        close(llm)
    tokens, kept = hf_reference(smollm2, prompts[-1], policy, 0.1, **params)
    assert planned == [kept]
    assert run["tokens"] == [tokens]
    assert run["freed"] == [(len(prompts[-1]) - max(kept)) // block]


@pytest.fixture(scope="module")
def pyramid_references(smollm2, prompts):
    """(tokens, kept per layer) of kvpolicy's HF generate, PyramidKV 0.1, for each prompt."""
    return [hf_reference(smollm2, p, "pyramidkv", 0.1) for p in prompts]


@pytest.fixture(scope="module")
def small_pool_llm(hf_dir, prompts):
    """A PyramidKV 0.1 engine prefilling in 128-token chunks, 32-token blocks, in a pool 8
    blocks short of holding the three prompts (and their new tokens) at full size."""
    full_blocks = sum(-(-(len(p) + 12) // 32) for p in prompts)
    llm = make_llm(hf_dir, {"policy": "pyramidkv", "budget": 0.1}, block_size=32, max_model_len=1024,
                   max_num_batched_tokens=128, max_num_seqs=4,
                   num_gpu_blocks_override=full_blocks - 8)
    yield llm, full_blocks - 8
    close(llm)


def test_concurrent_chunked_requests_in_a_small_pool(small_pool_llm, prompts, pyramid_references):
    """Three prompts of different lengths, prefilled in 128-token chunks, in a pool that
    cannot hold them all at full size: each equals its HF reference, frees exactly the
    blocks below its base and, with blocks freed, all three run at once."""
    llm, pool = small_pool_llm
    run = run_stepwise(llm, prompts, greedy())
    assert run["tokens"] == [tokens for tokens, _ in pyramid_references]
    assert run["freed"] == [(len(p) - max(kept)) // 32 for p, (_, kept) in zip(prompts, pyramid_references)]
    assert run["max_running"] == 3
    assert run["peak_blocks"] < pool
    assert run["preemptions"] == [0, 0, 0]


def test_preempted_requests_resume_exactly(small_pool_llm, prompts, pyramid_references):
    """Requests preempted once the first has 4 new tokens (vLLM's recompute preemption)
    re-run their prompt in chunks that stop at the prompt's end, are planned again,
    recompute their new tokens over the compacted cache and continue with the tokens of an
    unpreempted run."""
    llm, _ = small_pool_llm
    run = run_stepwise(llm, prompts, greedy(), preempt_at=4)
    assert run["preemptions"][0] == 1  # the first request, 4 tokens into its answer
    assert run["crossed"] == [False, False, False]
    assert run["tokens"] == [tokens for tokens, _ in pyramid_references]


@pytest.mark.parametrize("entry, error", [
    ({"policy": "snapkvv"}, kvpolicy.UnknownPolicyError),
    ({"policy": "snapkv", "budget": 1.5}, ValueError),
    ({"policy": "snapkv", "budget": 4}, ValueError),
    ({"policy": "snapkv", "kernel": 7, "colour": 1}, TypeError),
    ({"policy": "h2o"}, ValueError),
    ({"policy": "streamingllm"}, ValueError),
    ({"policy": "spankv"}, ValueError),  # its default defer=8 waits for decode steps
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
    chunked prefill stay on)."""
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=hf_dir).create_engine_config()
    assert config.cache_config.enable_prefix_caching is True
    assert config.scheduler_config.enable_chunked_prefill is True


@pytest.mark.parametrize("entry, error", [('{"policy": "nope"}', kvpolicy.UnknownPolicyError),
                                          ('{"policy": "snapkv", "budget": 0.1}', None)])
def test_serve_cli_reaches_the_plugin(hf_dir, entry, error):
    """``vllm serve MODEL --additional-config '{"kvpolicy": ...}'`` builds its engine config
    through the plugin: bad settings fail, good ones switch prefix caching off."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    cli = parser.parse_args(["--model", hf_dir, "--additional-config", f'{{"kvpolicy": {entry}}}'])
    args = AsyncEngineArgs.from_cli_args(cli)
    if error is not None:
        with pytest.raises(error):
            args.create_engine_config()
    else:
        assert args.create_engine_config().cache_config.enable_prefix_caching is False
