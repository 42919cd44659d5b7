"""Quality metrics: answer accuracy, agreement with the full cache, KL divergence."""
from __future__ import annotations

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
