"""The earlier one-question tasks (splits ``tune-v1`` / ``heldout-v1``), unchanged so that
the numbers published with them stay reproducible (with ``--answer-prefix``): documents
from the pydoc source only, one wording per task."""
from __future__ import annotations

import re

from .corpus import cut_document, insert_lines, number, word_counts

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
KEYS = ("guitar", "volcano", "penguin", "lantern", "saturn", "walnut", "harbor", "tulip")
MAX_ANSWER_COUNT = 20  # a doc_sentence answer's first word occurs at most this often in the docs
ANSWER_WORDS = 4
COLORS = ("red", "blue", "green", "yellow", "purple", "orange")


def _sample(sid, task, document, question, prefix, answers, depth):
    from .tasks import Question, Sample  # tasks imports this module

    return Sample(sid, task, "pydoc", document, [Question(question, answers, prefix, depth)])


def needle(rng, tokenizer, context, sid):
    """One secret code at one of ``DEPTHS``."""
    depth, code = rng.choice(DEPTHS), number(rng, 6)
    doc = insert_lines(cut_document(rng, tokenizer, context), [(depth, f"The secret code is {code}.")], tokenizer)
    return _sample(sid, "needle", "\n".join(doc), "What is the secret code mentioned in the text above?",
                   "The secret code is", [code], depth)


def multi_needle(rng, tokenizer, context, sid):
    """Three secret codes of differently coloured boxes spread over the document (the
    others are distractors); one box is asked."""
    depths = sorted(rng.sample(DEPTHS, 3))
    colors = rng.sample(COLORS, 3)
    codes = [number(rng, 6) for _ in colors]
    facts = [(d, f"The secret code of the {c} box is {v}.") for d, c, v in zip(depths, colors, codes)]
    asked = rng.randrange(3)
    doc = insert_lines(cut_document(rng, tokenizer, context), facts, tokenizer)
    return _sample(sid, "multi_needle", "\n".join(doc),
                   f"What is the secret code of the {colors[asked]} box mentioned in the text above?",
                   f"The secret code of the {colors[asked]} box is", [codes[asked]], depths[asked])


def key_value(rng, tokenizer, context, sid):
    """Three distinctive keys with 4-digit values on adjacent lines; one key is asked."""
    keys = rng.sample(KEYS, 3)
    values = [number(rng, 4) for _ in keys]
    depth = rng.choice(DEPTHS)
    table = "\n".join(f"The locker number of {k} is {v}." for k, v in zip(keys, values))
    asked = rng.randrange(len(keys))
    doc = insert_lines(cut_document(rng, tokenizer, context), [(depth, table)], tokenizer)
    return _sample(sid, "key_value", "\n".join(doc), f"What is the locker number of {keys[asked]}?",
                   f"The locker number of {keys[asked]} is", [values[asked]], depth)


def doc_sentence(rng, tokenizer, context, sid):
    """Recall how a line of the document itself goes on: the reply starts with the line's
    first words (at least six, unique in the document); the answer is the next
    ``ANSWER_WORDS`` words, the first of them rare in the docs. Meaningful only with the
    answer prefix."""
    while True:  # a document without a usable line (rare: tables, grammar) is redrawn
        lines = cut_document(rng, tokenizer, context)
        text = "\n".join(lines)
        options = [option for i, line in enumerate(lines) if (option := _recall_point(i, line, text))]
        if options:
            break
    i, head, phrase = rng.choice(options)
    return _sample(sid, "doc_sentence", text,
                   "Continue quoting the sentence of the text above that your reply begins with.",
                   head, [phrase], i / len(lines))


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
