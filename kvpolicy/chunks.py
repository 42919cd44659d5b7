"""How ``compress(chunk_size=...)`` splits a prompt, one rule for its forwards and for the
reconstruction passes that score each chunk once it is read."""
from __future__ import annotations

SHORT_TAIL = 8  # a last piece shorter than chunk_size / SHORT_TAIL joins the chunk before it


def chunk_spans(n: int, size: int) -> list[tuple[int, int]]:
    """[(start, stop)]: positions [0, n) in chunks of ``size`` tokens, except that a last
    piece shorter than size // SHORT_TAIL is read with the chunk before it (so the last
    chunk holds up to size + size // SHORT_TAIL - 1 tokens): a forward over a few tokens
    costs about a read of every weight, and its compaction and reconstruction pass are as
    dear as a full chunk's."""
    starts = list(range(0, n, size))
    if len(starts) > 1 and n - starts[-1] < size // SHORT_TAIL:
        starts.pop()
    return list(zip(starts, starts[1:] + [n]))
