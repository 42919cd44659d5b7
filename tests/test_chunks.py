"""compress(chunk_size=C)'s chunks (kvpolicy.chunks.chunk_spans): C tokens each, a last
piece shorter than C / 8 read with the chunk before it, in the forwards and in KVzip's
passes alike."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import kvpolicy
from kvpolicy import get_policy, reconstruction
from kvpolicy.chunks import SHORT_TAIL, chunk_spans
from test_agnostic_policies import CharTokenizer
from tiny_lm import ids, llama


@given(st.integers(1, 3000), st.integers(1, 600))
def test_spans_cover_the_prompt_in_chunks_with_no_short_last_piece(n, size):
    spans = chunk_spans(n, size)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, in order
    assert all(stop - start == size for start, stop in spans[:-1])
    last = spans[-1][1] - spans[-1][0]
    assert 1 <= last <= size + max(0, size // SHORT_TAIL - 1)
    assert len(spans) == 1 or last >= size // SHORT_TAIL  # a short remainder joined the one before
    plain = len(range(0, n, size))
    assert len(spans) == plain - (plain > 1 and n % size != 0 and n % size < size // SHORT_TAIL)


def test_a_short_last_piece_is_read_and_scored_with_the_chunk_before_it(monkeypatch):
    """65 tokens in chunks of 16: four forwards (the last of 17 tokens) and four KVzip
    passes, the last scoring positions [48, 65); 70 tokens (a last piece of 6): five."""
    tiny, forwards, passes = llama(), [], []
    tiny.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(
        kwargs["input_ids"].shape[1]), with_kwargs=True)
    real = reconstruction.PassObserver.__init__

    def observed(self, layers, q, start, stop, *args):
        passes.append((start, stop))
        real(self, layers, q, start, stop, *args)

    monkeypatch.setattr(reconstruction.PassObserver, "__init__", observed)
    with torch.no_grad():
        for n, want in ((65, [(0, 16), (16, 32), (32, 48), (48, 65)]),
                        (70, [(0, 16), (16, 32), (32, 48), (48, 64), (64, 70)])):
            forwards.clear()
            passes.clear()
            kvpolicy.compress(tiny, ids(n, 2), "snapkv", 0.3, chunk_size=16, window=4)
            assert forwards == [b - a for a, b in want]
            forwards.clear()
            kvpolicy.compress(tiny, ids(n, 2), get_policy("kvzip", tokenizer=CharTokenizer()), 0.3,
                              chunk_size=16)
            assert passes == want
            assert len(forwards) == 2 * len(want)  # a chunk, then its pass
    kvpolicy.detach(tiny)
