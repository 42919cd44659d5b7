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


@pytest.mark.parametrize("policy", APPEND)
def test_budget_tenth_equals_hf_generate(smollm2, hf_dir, prompts, policy):
    """Tokens equal kvpolicy's HF generate; the blocks freed are those below the base the
    HF plan implies, floor((N - max_l n_l) / block size) (VL-Cache's density allocation can
    give one layer nearly the whole prompt, and then frees nothing)."""
    llm = make_llm(hf_dir, {"policy": policy, "budget": 0.1})
    try:
        block = llm.llm_engine.vllm_config.cache_config.block_size
        run = run_stepwise(llm, prompts[-1:], greedy())
    finally:
        close(llm)
    tokens, kept = hf_reference(smollm2, prompts[-1], policy, 0.1)
    assert run["tokens"] == [tokens]
    assert run["freed"] == [(len(prompts[-1]) - max(kept)) // block]


def test_concurrent_chunked_requests_in_a_small_pool(smollm2, hf_dir, prompts):
    """Three prompts of different lengths, prefilled in 128-token chunks, in a pool that
    cannot hold them all at full size: each equals its HF reference and, with blocks freed,
    all three run at once."""
    full_blocks = sum(-(-(len(p) + 12) // 32) for p in prompts)
    llm = make_llm(hf_dir, {"policy": "pyramidkv", "budget": 0.1}, block_size=32, max_model_len=1024,
                   max_num_batched_tokens=128, max_num_seqs=4,
                   num_gpu_blocks_override=full_blocks - 8)
    try:
        run = run_stepwise(llm, prompts, greedy())
    finally:
        close(llm)
    assert run["tokens"] == [hf_reference(smollm2, p, "pyramidkv", 0.1)[0] for p in prompts]
    assert run["max_running"] == 3
    assert run["peak_blocks"] < full_blocks - 8
    assert min(run["freed"]) >= 1


@pytest.mark.parametrize("entry, error", [
    ({"policy": "snapkvv"}, kvpolicy.UnknownPolicyError),
    ({"policy": "snapkv", "budget": 1.5}, ValueError),
    ({"policy": "snapkv", "budget": 4}, ValueError),
    ({"policy": "snapkv", "kernel": 7, "colour": 1}, TypeError),
    ({"policy": "h2o"}, ValueError),
    ({"policy": "streamingllm"}, ValueError),
    ("snapkv", ValueError),
])
def test_bad_settings_fail_at_engine_start(hf_dir, entry, error):
    from vllm import LLM

    with pytest.raises(error):
        LLM(model=hf_dir, additional_config={"kvpolicy": entry})


@pytest.mark.parametrize("option, message", [
    ({"enable_prefix_caching": True}, "prefix_caching"),
    ({"tensor_parallel_size": 2}, "tensor_parallel_size"),
])
def test_options_that_cannot_work_are_refused(hf_dir, option, message):
    from vllm import LLM

    with pytest.raises(ValueError, match=message):
        LLM(model=hf_dir, additional_config={"kvpolicy": {"policy": "snapkv"}}, **option)


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
