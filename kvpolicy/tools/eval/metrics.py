"""Quality metrics: answer accuracy, agreement with the full cache, KL divergence, and
accuracy as a fraction of the full cache's with a bootstrap interval."""
from __future__ import annotations

import random
import re

import torch
from torch import Tensor


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def answer_pattern(answer: str) -> str:
    """The regex an expected string is looked for with, in normalized text: numbers as
    whole numbers (``1234`` does not match inside ``912345``), words as whole words."""
    a = re.escape(normalize(answer))
    return rf"(?<!\d){a}(?!\d)" if answer.isdigit() else rf"\b{a}\b"


def score_answer(generated: str, answers: list[str]) -> float:
    """Fraction of the expected strings found (case-insensitive, ``answer_pattern``) in
    the generated text."""
    text = normalize(generated)
    return sum(re.search(answer_pattern(a), text) is not None for a in answers) / len(answers)


def shared_prefix(tokens: list[int], reference: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        n += 1
    return n


def prefix_agreement(tokens: list[int], reference: list[int]) -> float:
    """Fraction of the reference reproduced before the first differing token."""
    return shared_prefix(tokens, reference) / len(reference) if reference else 1.0


def kl_divergence(ref_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(full || compressed) per position, in nats: [T, V] logits -> [T]."""
    p_log = torch.log_softmax(ref_logits.double(), dim=-1)
    q_log = torch.log_softmax(logits.double(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0.0)


def of_full(scores: list[float], full: list[float], level: float = 0.95, resamples: int = 2000,
            seed: int = 0) -> tuple[float, float, float] | None:
    """(ratio, low, high): a policy's accuracy as a fraction of the full cache's,
    ``sum(scores) / sum(full)`` over the same questions (``scores[i]`` and ``full[i]`` the
    same question's), with a paired percentile-bootstrap interval at ``level``: questions
    resampled with replacement ``resamples`` times (a ``random.Random(seed)``, so a rerun
    prints the same interval), resamples where the full cache answers nothing left out.
    None when the full cache answers none of the questions."""
    if len(scores) != len(full):
        raise ValueError(f"{len(scores)} policy scores against {len(full)} full-cache scores")
    if sum(full) == 0:
        return None
    rng, n = random.Random(seed), len(full)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        denominator = sum(full[i] for i in picks)
        if denominator:
            ratios.append(sum(scores[i] for i in picks) / denominator)
    ratios.sort()
    tail = (1 - level) / 2
    low = ratios[int(tail * (len(ratios) - 1))]
    high = ratios[int(round((1 - tail) * (len(ratios) - 1)))]
    return sum(scores) / sum(full), low, high
