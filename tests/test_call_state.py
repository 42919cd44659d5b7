"""The call state a PolicyCache owns, seen from outside: bad input found as a new user would
(empty ids to compress, a continuation whose ids do not extend the compressed document,
on unpatched and patched models) is refused with a clear error and the cache untouched."""
import pytest
import torch

import kvpolicy
from kvpolicy.models import CACHE_ARG
from tiny_lm import ids, llama  # tests/ is on sys.path (conftest)


@pytest.fixture(scope="module")
def tiny():
    model = llama()
    yield model
    kvpolicy.detach(model)


@pytest.mark.parametrize("bad", [torch.zeros(1, 0, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                                 torch.zeros(1, 4), [[5, 6]]])
def test_compress_refuses_ids_it_cannot_prefill(tiny, bad):
    with pytest.raises(ValueError, match="non-empty int tensor"):
        kvpolicy.compress(tiny, bad, "snapkv", 0.5, window=4)


def snapshot(cache) -> list[torch.Tensor]:
    return [t.clone() for layer in cache.layers for t in (layer.keys, layer.pos)]


@pytest.mark.parametrize("patched", [False, True])
def test_a_question_must_extend_the_compressed_document(tiny, patched):
    doc = ids(60, 1)
    with torch.no_grad():
        cache = kvpolicy.compress(tiny, doc, "snapkv", 0.3, window=4, max_new_tokens=8)
    before, tokens = snapshot(cache), cache.tokens.clone()
    question = ids(6, 2)
    wrong = torch.cat([ids(60, 3), question], -1)  # another document's ids
    handle = kvpolicy.apply(tiny, "snapkv", 0.3, window=4) if patched else None
    try:
        with torch.no_grad(), pytest.raises(ValueError, match="do not continue the conversation"):
            tiny.generate(wrong, max_new_tokens=3, do_sample=False, **{CACHE_ARG: cache})
        with pytest.raises(ValueError, match="at least one new token"):
            tiny.generate(doc, max_new_tokens=3, do_sample=False, **{CACHE_ARG: cache})
        assert all(torch.equal(a, b) for a, b in zip(before, snapshot(cache)))
        assert torch.equal(cache.tokens, tokens) and cache.pending is None
        right = torch.cat([doc, question], -1)
        with torch.no_grad():
            got = tiny.generate(right, max_new_tokens=3, do_sample=False, **{CACHE_ARG: cache})
            twin = kvpolicy.compress(tiny, doc, "snapkv", 0.3, window=4, max_new_tokens=8)
            want = tiny.generate(right, max_new_tokens=3, do_sample=False, **{CACHE_ARG: twin})
        assert torch.equal(got, want)
    finally:
        if handle is not None:
            handle.remove()


def test_a_finished_call_makes_the_next_forward_a_new_turn(tiny):
    """recompress=False appends a new turn as it is; the chunks of a first prompt are
    compressed: which one a forward is, the cache knows from its calls."""
    doc = ids(60, 4)
    with torch.no_grad():
        cache = kvpolicy.compress(tiny, doc, "snapkv", 0.3, window=4, chunk_size=30,
                                  max_new_tokens=8, recompress=False)
        kept = list(cache.kept)
        assert max(kept) < 60 * 0.5
        tiny(ids(10, 5), use_cache=True, **{CACHE_ARG: cache})  # a hand-written next turn
    assert [k + 10 for k in kept] == cache.kept
