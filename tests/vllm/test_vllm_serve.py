"""``vllm serve`` with kvpolicy, as a user starts it (vLLM's defaults: compiled graph,
engine core in its own process), driven by the official ``openai`` client: concurrent chat
and completion requests, streamed and not, with per-request settings; answers equal the
offline engine's; KV usage against plain vLLM on the same requests."""
import concurrent.futures

import pytest

pytest.importorskip("vllm.engine.arg_utils",
                    reason="vLLM is not installed here (the vLLM job builds .venv-vllm: .ci/vllm)")
openai = pytest.importorskip("openai", reason="the openai client is not installed (.ci/vllm installs it)")

from serve_support import Server  # noqa: E402
from vllm_support import NEW_TOKENS, WORDS, chat_messages, greedy, small_pool_args  # noqa: E402

pytestmark = pytest.mark.slow
ENGINE = {"policy": "snapkv", "budget": 0.1}


def serve_args(prompts) -> list[str]:
    """The CLI form of the session engine's arguments (float32, seed 0, the small pool)."""
    args = ["--dtype", "float32", "--seed", "0"]
    for k, v in small_pool_args(prompts).items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


@pytest.fixture(scope="module")
def server(hf_dir, prompts, tmp_path_factory):
    s = Server(hf_dir, serve_args(prompts), str(tmp_path_factory.mktemp("serve") / "kvpolicy.log"),
               {"kvpolicy": ENGINE})
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat(server, words: int, stream: bool, xargs: dict | None) -> str:
    body = {"vllm_xargs": xargs} if xargs else None
    out = client(server).chat.completions.create(
        model=server_model(server), messages=chat_messages(words), max_tokens=NEW_TOKENS,
        temperature=0.0, stream=stream, extra_body=body)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in out if c.choices)
    return out.choices[0].message.content


def complete(server, ids: list[int], stream: bool, xargs: dict | None) -> str:
    body = {"vllm_xargs": xargs} if xargs else None
    out = client(server).completions.create(model=server_model(server), prompt=ids, max_tokens=NEW_TOKENS,
                                            temperature=0.0, stream=stream, extra_body=body)
    if stream:
        return "".join(c.choices[0].text for c in out if c.choices)
    return out.choices[0].text


def usage_while_decoding(server, ids: list[int], after: int = 4) -> float:
    """One streamed completion of 32 new tokens (ignore_eos) alone on the server: /metrics
    vllm:kv_cache_usage_perc read once ``after`` tokens have streamed back (the prompt is
    prefilled and compacted by then, and the request is still decoding)."""
    out = client(server).completions.create(model=server_model(server), prompt=ids, max_tokens=32,
                                            temperature=0.0, stream=True, extra_body={"ignore_eos": True})
    usage = None
    for i, _ in enumerate(out):
        if i == after:
            usage = server.gauge("vllm:kv_cache_usage_perc")
    assert usage is not None, f"the stream ended before {after} tokens"
    return usage


def server_model(server) -> str:
    return client(server).models.list().data[0].id


def offline(engine, ids: list[int], xargs: dict | None) -> str:
    settings = {k[len("kvpolicy_"):]: v for k, v in (xargs or {}).items()}
    return engine.generate([{"prompt_token_ids": ids}], greedy(**settings), use_tqdm=False)[0].outputs[0].text


def test_concurrent_openai_requests_equal_offline(server, engine, prompts):
    """Chat and completion requests, streamed and not, with and without per-request
    settings, sent at once: each answer equals the offline engine's on the same tokens."""
    cases = [(chat, 2, False, None), (chat, 1, True, {"kvpolicy_policy": "pyramidkv", "kvpolicy_budget": 0.2}),
             (complete, 0, False, {"kvpolicy_policy": "none"}), (complete, 2, True, {"kvpolicy_policy": "spankv"}),
             (chat, 0, True, {"kvpolicy_policy": "uniform"}), (complete, 1, False, None)]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        futures = [pool.submit(f, server, WORDS[i] if f is chat else prompts[i], stream, xargs)
                   for f, i, stream, xargs in cases]
        answers = [f.result() for f in futures]
    assert answers == [offline(engine, prompts[i], xargs) for _, i, _, xargs in cases]


@pytest.mark.parametrize("xargs, key", [({"kvpolicy_policy": "snapkv", "kvpolicy_budget": 1.5}, "kvpolicy_budget"),
                                        ({"kvpolicy_policy": "h2o"}, "kvpolicy_policy")])
def test_bad_request_settings_answer_400(server, prompts, xargs, key):
    """An invalid per-request value is a 400 naming the key; the server goes on serving."""
    with pytest.raises(openai.BadRequestError, match=key):
        complete(server, prompts[0], False, xargs)
    assert complete(server, prompts[0], False, None)


def test_kv_usage_falls_against_plain_vllm(server, hf_dir, prompts, tmp_path_factory):
    """Each prompt alone on plain vLLM (same arguments, no kvpolicy) and on the kvpolicy
    server (SnapKV 0.1): the engine's KV usage (/metrics vllm:kv_cache_usage_perc) while the
    request decodes is under a third of plain vLLM's. One request at a time, so the reading
    does not depend on how the scheduler interleaves prefills (benchmarks/vllm_serving.py
    measures the concurrent case)."""
    plain = Server(hf_dir, serve_args(prompts), str(tmp_path_factory.mktemp("serve") / "plain.log"))
    try:
        plain.wait_ready()
        usage = {name: [usage_while_decoding(s, ids) for ids in prompts]
                 for name, s in (("plain", plain), ("kvpolicy", server))}
    finally:
        plain.stop()
    print("vllm:kv_cache_usage_perc while decoding, per prompt", usage)
    for ours, theirs in zip(usage["kvpolicy"], usage["plain"]):
        assert 0 < ours < theirs / 3
