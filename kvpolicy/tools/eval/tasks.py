"""Retrieval and QA tasks over the Python docs (``pydoc_data.topics``), deterministic per seed.

Each sample is a document of about ``context`` tokens cut from the docs, possibly with
facts inserted as their own lines at chosen depths, followed by one question. Answers
are short strings checked by substring match (see ``metrics.score_answer``).
"""
from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from ..embedded import docs_topics

SPLIT_SEEDS = {"tune": 0, "heldout": 1_000_003}
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
KEYS = ("guitar", "volcano", "penguin", "lantern", "saturn", "walnut", "harbor", "tulip")
MAX_ANSWER_COUNT = 20  # a doc_sentence answer's first word occurs at most this often in the docs
ANSWER_WORDS = 4
COLORS = ("red", "blue", "green", "yellow", "purple", "orange")


@dataclass
class Sample:
    """One prompt: ``document`` then ``question``, and the start of the assistant's reply
    (``answer_prefix``), which the model continues; the answer is every string in ``answers``."""

    id: str
    task: str
    document: str
    question: str
    answer_prefix: str
    answers: list[str]
    depths: list[float] = field(default_factory=list)  # where the facts sit (0..1)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{self.document}\n\n{self.question}"},
                {"role": "assistant", "content": self.answer_prefix}]

    def input_ids(self, tokenizer) -> list[int]:
        """The chat-templated prompt, ending inside the assistant's reply."""
        return tokenizer.apply_chat_template(self.messages(), continue_final_message=True,
                                             tokenize=True, return_dict=True)["input_ids"]


@lru_cache(maxsize=1)
def corpus_lines() -> tuple[str, ...]:
    """The docs as non-empty lines, topics in sorted order."""
    return tuple(line for topic in docs_topics() for line in topic.splitlines() if line.strip())


def line_tokens(tokenizer) -> list[int]:
    """Token count of each corpus line (cached on the tokenizer)."""
    counts = getattr(tokenizer, "_kvpolicy_line_tokens", None)
    if counts is None:
        counts = [len(ids) for ids in tokenizer(list(corpus_lines()), add_special_tokens=False).input_ids]
        tokenizer._kvpolicy_line_tokens = counts
    return counts


def cut_document(rng: random.Random, tokenizer, context: int) -> list[str]:
    """Consecutive corpus lines from a random start, about ``context`` tokens in all."""
    lines, counts = corpus_lines(), line_tokens(tokenizer)
    i, total, out = rng.randrange(len(lines)), 0, []
    while total < context:
        out.append(lines[i])
        total += counts[i] + 1  # + the newline
        i = (i + 1) % len(lines)
    return out


def insert_lines(lines: list[str], facts: list[tuple[float, str]], tokenizer) -> list[str]:
    """``lines`` with each (depth, fact) inserted at the line boundary nearest that depth."""
    sizes = [len(tokenizer(l, add_special_tokens=False).input_ids) + 1 for l in lines]
    total, bounds, acc = sum(sizes), [0], 0
    for s in sizes:
        acc += s
        bounds.append(acc)
    out = list(lines)
    for depth, fact in sorted(facts, reverse=True):  # deepest first keeps indices valid
        at = min(range(len(bounds)), key=lambda b: abs(bounds[b] - depth * total))
        out.insert(at, fact)
    return out


def number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def needle(rng, tokenizer, context, sid):
    """One secret code at one of ``DEPTHS``."""
    depth, code = rng.choice(DEPTHS), number(rng, 6)
    doc = insert_lines(cut_document(rng, tokenizer, context), [(depth, f"The secret code is {code}.")], tokenizer)
    return Sample(sid, "needle", "\n".join(doc), "What is the secret code mentioned in the text above?",
                  "The secret code is", [code], [depth])


def multi_needle(rng, tokenizer, context, sid):
    """Three secret codes of differently coloured boxes spread over the document (the
    others are distractors); one box is asked."""
    depths = sorted(rng.sample(DEPTHS, 3))
    colors = rng.sample(COLORS, 3)
    codes = [number(rng, 6) for _ in colors]
    facts = [(d, f"The secret code of the {c} box is {v}.") for d, c, v in zip(depths, colors, codes)]
    asked = rng.randrange(3)
    doc = insert_lines(cut_document(rng, tokenizer, context), facts, tokenizer)
    return Sample(sid, "multi_needle", "\n".join(doc),
                  f"What is the secret code of the {colors[asked]} box mentioned in the text above?",
                  f"The secret code of the {colors[asked]} box is", [codes[asked]], [depths[asked]])


def key_value(rng, tokenizer, context, sid):
    """Three distinctive keys with 4-digit values on adjacent lines; one key is asked."""
    keys = rng.sample(KEYS, 3)
    values = [number(rng, 4) for _ in keys]
    depth = rng.choice(DEPTHS)
    table = "\n".join(f"The locker number of {k} is {v}." for k, v in zip(keys, values))
    asked = rng.randrange(len(keys))
    doc = insert_lines(cut_document(rng, tokenizer, context), [(depth, table)], tokenizer)
    return Sample(sid, "key_value", "\n".join(doc),
                  f"What is the locker number of {keys[asked]}?",
                  f"The locker number of {keys[asked]} is", [values[asked]], [depth])


def doc_sentence(rng, tokenizer, context, sid):
    """Recall how a line of the document itself goes on: the reply starts with the line's
    first words (at least six, unique in the document); the answer is the next
    ``ANSWER_WORDS`` words, the first of them rare in the docs, so that the start of the
    line alone does not give them away."""
    while True:  # a document without a usable line (rare: tables, grammar) is redrawn
        lines = cut_document(rng, tokenizer, context)
        text = "\n".join(lines)
        options = [option for i, line in enumerate(lines) if (option := _recall_point(i, line, text))]
        if options:
            break
    i, head, phrase = rng.choice(options)
    return Sample(sid, "doc_sentence", text,
                  "Continue quoting the sentence of the text above that your reply begins with.",
                  head, [phrase], [i / len(lines)])


@lru_cache(maxsize=1)
def word_counts() -> Counter:
    """How often each lower-case word occurs in the docs."""
    return Counter(re.findall(r"[a-z]+", "\n".join(corpus_lines()).lower()))


def _recall_point(i, line, text):
    """(line index, head, next words) at the first usable point of the line, else None."""
    words = line.split()
    for k in range(6, len(words) - ANSWER_WORDS + 1):
        head, phrase = " ".join(words[:k]), words[k:k + ANSWER_WORDS]
        phrase[-1] = phrase[-1].rstrip(".,;:")
        first = phrase[0]
        if (all(re.fullmatch(r"[A-Za-z]+", w) for w in phrase) and re.fullmatch(r"[a-z]{5,}", first)
                and word_counts()[first] <= MAX_ANSWER_COUNT and first not in head.lower()
                and text.count(head) == 1):
            return i, head, " ".join(phrase)
    return None


TASKS = {"needle": needle, "multi_needle": multi_needle, "key_value": key_value, "doc_sentence": doc_sentence}


def sample_seed(seed: int, split: str, index: int) -> int:
    key = f"{seed}/{SPLIT_SEEDS[split]}/{index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def build_samples(tokenizer, n: int, context: int, seed: int = 0, split: str = "tune",
                  tasks: list[str] | None = None) -> list[Sample]:
    """``n`` samples cycling through ``tasks`` (all by default), deterministic per seed/split."""
    names = tasks or list(TASKS)
    out = []
    for i in range(n):
        task = names[i % len(names)]
        rng = random.Random(sample_seed(seed, split, i))
        out.append(TASKS[task](rng, tokenizer, context, f"{split}-{seed}-{i}-{task}"))
    return out
