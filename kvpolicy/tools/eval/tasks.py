"""Eval samples: a document (``corpus``) with facts planted at chosen depths, and two or
more questions about it, deterministic per seed and split.

The natural format (the default): the document and one question in the user turn, then the
chat template's generation prompt; the answer is looked for in the reply. With
``answer_prefix`` the prompt instead ends inside the assistant's reply with the start of
the answer ("The secret code is"), the format of the ``-v1`` splits' published numbers.

Splits ``tune`` and ``heldout`` draw from disjoint pools of fact and question wordings
and keys, and each sample's document comes from either source, so a rule tuned on one
cannot key on a phrasing. ``tune-v1`` / ``heldout-v1`` are the earlier one-question
tasks (``tasks_v1``), kept so their numbers stay reproducible.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from . import tasks_v1
from .corpus import SOURCES, cut_document, insert_lines, number

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
SPLIT_SEEDS = {"tune": 7_919, "heldout": 104_729, "tune-v1": 0, "heldout-v1": 1_000_003}

# (fact, question, answer prefix) per split; {v} is the value. Disjoint between splits.
CODE_WORDINGS = {
    "tune": [("The secret code is {v}.", "What is the secret code mentioned in the text above?",
              "The secret code is"),
             ("The access code for the vault is {v}.", "What is the access code for the vault?",
              "The access code for the vault is"),
             ("Note: the PIN of the office safe is {v}.", "Which PIN opens the office safe?",
              "The PIN of the office safe is"),
             ("Your order was given the ticket number {v}.", "What ticket number was the order given?",
              "The ticket number is")],
    "heldout": [("Remember this password: {v}.", "Which password were you asked to remember?",
                 "The password is"),
                ("The serial number printed on the device is {v}.",
                 "Tell me the serial number printed on the device.", "The serial number is"),
                ("The customer's account number is {v}.", "What is the customer's account number?",
                 "The customer's account number is"),
                ("The parcel can be tracked with the number {v}.",
                 "With which number can the parcel be tracked?", "The tracking number is")],
}
# (table line, question, answer prefix) per split; {k} is a key, {v} a 4-digit value.
TABLE_WORDINGS = {
    "tune": ("The locker number of {k} is {v}.", "What is the locker number of {k}?",
             "The locker number of {k} is"),
    "heldout": ("{k} stays in room {v}.", "In which room does {k} stay?", "{k} stays in room"),
}
TABLE_KEYS = {"tune": ("guitar", "volcano", "penguin", "lantern", "saturn", "walnut", "harbor", "tulip"),
              "heldout": ("Alice", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiro")}
# (fact, question, answer prefix, answers) per split: facts with word answers
WORD_FACTS = {
    "tune": [("The meeting with the auditors is on {a}.", "On which day is the meeting with the auditors?",
              "The meeting with the auditors is on", ("Monday", "Tuesday", "Thursday", "Friday")),
             ("The spare key is hidden under the {a}.", "Where is the spare key hidden?",
              "The spare key is hidden under the", ("doormat", "flowerpot", "bench", "stairs")),
             ("Maria's favourite fruit is the {a}.", "What is Maria's favourite fruit?",
              "Maria's favourite fruit is the", ("mango", "apricot", "pear", "cherry"))],
    "heldout": [("The conference will take place in {a}.", "In which city will the conference take place?",
                 "The conference will take place in", ("Lisbon", "Oslo", "Nairobi", "Kyoto")),
                ("The winning horse was called {a}.", "What was the name of the winning horse?",
                 "The winning horse was called", ("Thunderbolt", "Moonlight", "Juniper", "Bramble")),
                ("The lab's new microscope is painted {a}.", "What colour is the lab's new microscope?",
                 "The lab's new microscope is painted", ("orange", "purple", "turquoise", "silver"))],
}


@dataclass
class Question:
    text: str
    answers: list[str]
    answer_prefix: str  # the reply's start in the answer-prefix format
    depth: float = 0.0  # where its fact sits (0..1)


@dataclass
class Sample:
    """One document and the questions asked about it."""

    id: str
    task: str
    source: str
    document: str
    questions: list[Question] = field(default_factory=list)

    def messages(self, q: int, answer_prefix: bool = False) -> list[dict[str, str]]:
        question = self.questions[q]
        out = [{"role": "user", "content": f"{self.document}\n\n{question.text}"}]
        if answer_prefix:
            out.append({"role": "assistant", "content": question.answer_prefix})
        return out

    def split_ids(self, tokenizer, q: int, answer_prefix: bool = False) -> tuple[list[int], list[int]]:
        """(context, rest) token ids of question ``q``'s prompt: the context ends with the
        document (what query-agnostic mode compresses alone); the rest is the question, the
        template's end of turn and the generation prompt (or the answer prefix)."""
        text = tokenizer.apply_chat_template(self.messages(q, answer_prefix), tokenize=False,
                                             add_generation_prompt=not answer_prefix,
                                             continue_final_message=answer_prefix)
        cut = text.index(self.document) + len(self.document)
        enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
        return enc(text[:cut]), enc(text[cut:])


def _plant(rng, tokenizer, context, facts):
    """A document from a random source with ``facts`` [(fact line, ...)] at distinct depths."""
    source = rng.choice(SOURCES)
    depths = sorted(rng.sample(DEPTHS, len(facts)))
    rng.shuffle(depths)
    lines = insert_lines(cut_document(rng, tokenizer, context, source),
                         [(d, f) for d, f in zip(depths, facts)], tokenizer)
    return source, "\n".join(lines), depths


def needle(rng, tokenizer, context, sid, split):
    """Two codes (6 digits) with different labels at two depths; each is asked."""
    wordings = rng.sample(CODE_WORDINGS[split], 2)
    codes = [number(rng, 6) for _ in wordings]
    source, doc, depths = _plant(rng, tokenizer, context, [f.format(v=c) for (f, _, _), c in zip(wordings, codes)])
    qs = [Question(q, [c], p, d) for (_, q, p), c, d in zip(wordings, codes, depths)]
    return Sample(sid, "needle", source, doc, qs)


def key_value(rng, tokenizer, context, sid, split):
    """Three keys with 4-digit values on adjacent lines at one depth; two keys are asked."""
    line, question, prefix = TABLE_WORDINGS[split]
    keys = rng.sample(TABLE_KEYS[split], 3)
    values = [number(rng, 4) for _ in keys]
    table = "\n".join(line.format(k=k, v=v) for k, v in zip(keys, values))
    source, doc, (depth,) = _plant(rng, tokenizer, context, [table])
    asked = rng.sample(range(3), 2)
    qs = [Question(question.format(k=keys[i]), [values[i]], prefix.format(k=keys[i]), depth) for i in asked]
    return Sample(sid, "key_value", source, doc, qs)


def word_fact(rng, tokenizer, context, sid, split):
    """Two facts with one-word answers (a day, a city, a name...) at two depths; each is asked."""
    facts = rng.sample(WORD_FACTS[split], 2)
    answers = [rng.choice(options) for *_, options in facts]
    source, doc, depths = _plant(rng, tokenizer, context, [f.format(a=a) for (f, *_), a in zip(facts, answers)])
    qs = [Question(q, [a], p, d) for (_, q, p, _), a, d in zip(facts, answers, depths)]
    return Sample(sid, "word_fact", source, doc, qs)


TASKS = {"needle": needle, "key_value": key_value, "word_fact": word_fact}


def task_names(split: str) -> list[str]:
    return list(tasks_v1.TASKS if split.endswith("-v1") else TASKS)


def sample_seed(seed: int, split: str, index: int) -> int:
    key = f"{seed}/{SPLIT_SEEDS[split]}/{index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def build_samples(tokenizer, n: int, context: int, seed: int = 0, split: str = "tune",
                  tasks: list[str] | None = None) -> list[Sample]:
    """``n`` documents cycling through ``tasks`` (all of the split's by default),
    deterministic per seed and split."""
    names = tasks or task_names(split)
    out = []
    for i in range(n):
        task = names[i % len(names)]
        rng = random.Random(sample_seed(seed, split, i))
        sid = f"{split}-{seed}-{i}-{task}"
        if split.endswith("-v1"):
            out.append(tasks_v1.TASKS[task](rng, tokenizer, context, sid))
        else:
            out.append(TASKS[task](rng, tokenizer, context, sid, split))
    return out
