"""Conversations and long documents on the embedded model: a second chat turn from a
compressed cache, compress once and ask several questions, chunked prefill."""
import copy

import pytest
import torch
from transformers import DynamicCache

import kvpolicy
from tiny_lm import ids, llama

pytestmark = pytest.mark.slow
POLICIES = ["uniform", "snapkv", "pyramidkv", "prefixkv", "vlcache", "spankv", "h2o", "streamingllm"]
NEW = 8


def turn(tok, history, text):
    """history ids [1, n] followed by a templated user turn: int64 [1, n + m]."""
    msgs = [{"role": "user", "content": text}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    return ids if history is None else torch.cat([history, ids], -1)


@pytest.fixture(scope="module")
def chat(smollm2, long_prompt):
    """(first prompt ids, reference first answer, second prompt ids, reference second answer)
    of the unpatched model with one DynamicCache across both turns."""
    model, tok = smollm2
    ids = long_prompt["input_ids"]
    cache = DynamicCache()
    with torch.no_grad():
        first = model.generate(ids, max_new_tokens=NEW, do_sample=False, past_key_values=cache)
        second_ids = turn(tok, first, "Now say it in three words.")
        second = model.generate(second_ids, max_new_tokens=NEW, do_sample=False, past_key_values=cache)
    return ids, first, second_ids, second


@pytest.mark.parametrize("name", POLICIES)
def test_two_turn_chat_at_full_budget_equals_dynamic_cache(smollm2, chat, name):
    model, _ = smollm2
    ids, first, second_ids, second = chat
    with kvpolicy.apply(model, name, budget=1.0), torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values
        assert torch.equal(out.sequences, first)
        again = model.generate(second_ids, max_new_tokens=NEW, do_sample=False, past_key_values=cache)
    assert torch.equal(again, second)
    assert int(cache.get_seq_length()) == second.shape[1] - 1


@pytest.mark.parametrize("name", POLICIES)
def test_second_turn_at_small_budget_stays_within_budget(smollm2, chat, name):
    model, _ = smollm2
    ids, _, second_ids, _ = chat
    with kvpolicy.apply(model, name, budget=0.2), torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values
        second_ids = torch.cat([out.sequences, second_ids[:, chat[1].shape[1]:]], -1)
        again = model.generate(second_ids, max_new_tokens=NEW, do_sample=False, past_key_values=cache)
    assert second_ids.shape[1] < again.shape[1] <= second_ids.shape[1] + NEW  # EOS may stop it
    # fixed-size layers hold the new tokens too; a deferred plan counts its decode steps
    seen = second_ids.shape[1] + (NEW if name in ("h2o", "streamingllm") else 0) + \
        min(cache.policy.defer, NEW - 1)
    L = len(cache.layers)
    assert sum(cache.kept) <= 0.2 * seen * L + L  # budget of everything seen, not of turn one


def test_compress_once_ask_three_questions(smollm2, long_prompt):
    """On an unpatched model: compress the context, then three questions from copies; at
    budget 1.0 the answers equal a DynamicCache prefilled with the same context."""
    model, tok = smollm2
    ctx = long_prompt["input_ids"][:, :-5]  # the document, before the generation prompt
    questions = ["What is the topic?", "Name one keyword.", "Is it about Python?"]
    with torch.no_grad():
        full = kvpolicy.compress(model, ctx, "snapkv", budget=1.0)
        small = kvpolicy.compress(model, ctx, "snapkv", budget=0.2)
        for q in questions:
            ids = turn(tok, ctx, q)
            ref_cache = DynamicCache()
            model(ctx, past_key_values=ref_cache)
            ref = model.generate(ids, max_new_tokens=NEW, do_sample=False, past_key_values=ref_cache)
            got = model.generate(ids, max_new_tokens=NEW, do_sample=False,
                                 past_key_values=copy.deepcopy(full))
            assert torch.equal(got, ref), q
            short = model.generate(ids, max_new_tokens=NEW, do_sample=False,
                                   past_key_values=small.copy())
            assert ids.shape[1] < short.shape[1] <= ids.shape[1] + NEW  # EOS may stop it early
    assert int(full.get_seq_length()) == ctx.shape[1]  # the copies left it untouched
    kvpolicy.detach(model)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_copy_shares_no_tensor(smollm2, long_prompt):
    model, _ = smollm2
    with torch.no_grad():
        cache = kvpolicy.compress(model, long_prompt["input_ids"], "h2o", budget=0.3)
    twin = cache.copy()
    mine = {t.data_ptr() for layer in cache.layers for t in layer.owned()}
    theirs = {t.data_ptr() for layer in twin.layers for t in layer.owned()}
    assert not mine & theirs
    kvpolicy.detach(model)


@pytest.mark.parametrize("name", POLICIES)
def test_chunked_prefill_runs_every_policy_and_is_exact_at_full_budget(smollm2, long_prompt,
                                                                      reference_tokens, name):
    model, _ = smollm2
    n = reference_tokens.shape[1] - long_prompt["input_ids"].shape[1]
    with kvpolicy.apply(model, name, budget=1.0), torch.no_grad():
        out = model.generate(**long_prompt, max_new_tokens=n, do_sample=False, prefill_chunk_size=128)
    assert torch.equal(out, reference_tokens)
    with torch.no_grad():
        cache = kvpolicy.compress(model, long_prompt["input_ids"], name, budget=0.1, chunk_size=100)
    assert max(cache.kept) <= long_prompt["input_ids"].shape[1]
    kvpolicy.detach(model)


@pytest.mark.parametrize("recompress", [True, False])
def test_chunks_of_one_prompt_are_compressed_whatever_recompress(smollm2, long_prompt, recompress):
    """recompress governs new turns only: every chunk of the first prompt is compressed, so
    the cache holds about budget x prompt (a final chunk of up to 100 tokens included)."""
    model, _ = smollm2
    n = long_prompt["input_ids"].shape[1]
    with torch.no_grad():
        cache = kvpolicy.compress(model, long_prompt["input_ids"], "snapkv", budget=0.1,
                                  chunk_size=100, recompress=recompress, window=8)
    assert sum(cache.kept) / len(cache.kept) <= 0.1 * n + 8
    kvpolicy.detach(model)


def test_bad_continuations_are_refused_with_the_cache_untouched(smollm2, long_prompt):
    model, _ = smollm2
    ids = long_prompt["input_ids"]
    with kvpolicy.apply(model, "snapkv", budget=0.3), torch.no_grad():
        cache = model.generate(ids, max_new_tokens=4, do_sample=False,
                               return_dict_in_generate=True).past_key_values
        before = int(cache.get_seq_length())
        wrong = ids.clone()
        wrong[0, 3] += 1
        with pytest.raises(ValueError, match="do not continue"):
            model.generate(wrong, max_new_tokens=2, past_key_values=cache)
        with pytest.raises(ValueError, match="batch"):
            model(torch.cat([ids, ids]), past_key_values=cache)
    assert int(cache.get_seq_length()) == before


def test_document_chat_example_runs(smollm2):
    """docs/examples/document_chat.py (compress once, two questions from copies, a follow-up
    turn) at budget 1.0: the embedded model finds both planted numbers."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "docs" / "examples" / "document_chat.py"
    spec = importlib.util.spec_from_file_location("document_chat", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with torch.no_grad():
        replies = example.run(*smollm2, budget=1.0, words=300, new_tokens=16)
    assert "582914" in replies[0] and "3307" in replies[1]
    assert len(replies) == 3


@pytest.mark.parametrize("name", ["streamingllm", "pyramidkv", "prefixkv", "spankv", "h2o"])
def test_chunked_compress_plans_each_layer_on_the_tokens_it_holds(name):
    """After a chunk the layers hold different counts (pyramidkv, prefixkv by design,
    streamingllm's last chunk); the next chunk's plan sees each layer's own slots, not the
    left padding of the narrower ones: every layer holds its planned count of real tokens
    and the policy's sinks."""
    model = llama()
    with torch.no_grad():
        cache = kvpolicy.compress(model, ids(150, 2), name, 0.2, chunk_size=32)
    kvpolicy.detach(model)
    sinks = cache.policy.sinks
    for layer, kept in zip(cache.layers, cache.plan.kept):
        held = sorted(int(p) for p in layer.pos[0, 0] if p >= 0)
        assert len(held) == kept and held[:sinks] == list(range(sinks)), (kept, held)
