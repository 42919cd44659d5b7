"""Document text for the eval tasks, from two offline sources shipped with Python:
``pydoc`` (the language reference topics, ``pydoc_data.topics``) and ``stdlib`` (the
docstrings of a fixed list of standard-library modules and their public members)."""
from __future__ import annotations

import importlib
import inspect
import random
import re
from collections import Counter
from functools import lru_cache

from ..embedded import docs_topics

STDLIB_MODULES = ("argparse", "collections", "configparser", "csv", "datetime", "decimal",
                  "email.message", "fractions", "functools", "heapq", "http.client", "itertools",
                  "json", "logging", "pathlib", "shutil", "socket", "sqlite3", "string",
                  "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest",
                  "urllib.request", "zipfile")
SOURCES = ("pydoc", "stdlib")


def _stdlib_texts() -> list[str]:
    texts = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for member in sorted(getattr(module, "__all__", None) or dir(module)):
            obj = getattr(module, member, None)
            if member.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                texts.append(doc)
    return texts


@lru_cache(maxsize=None)
def corpus_lines(source: str = "pydoc") -> tuple[str, ...]:
    """A source's non-empty lines, in a fixed order."""
    texts = docs_topics() if source == "pydoc" else _stdlib_texts()
    return tuple(line for text in texts for line in text.splitlines() if line.strip())


def line_tokens(tokenizer, source: str = "pydoc") -> list[int]:
    """Token count of each line of a source (cached on the tokenizer)."""
    cache = tokenizer.__dict__.setdefault("_kvpolicy_eval_line_tokens", {})
    if source not in cache:
        cache[source] = [len(ids) for ids in
                         tokenizer(list(corpus_lines(source)), add_special_tokens=False).input_ids]
    return cache[source]


def cut_document(rng: random.Random, tokenizer, context: int, source: str = "pydoc") -> list[str]:
    """Consecutive lines of ``source`` from a random start, about ``context`` tokens in all."""
    lines, counts = corpus_lines(source), line_tokens(tokenizer, source)
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


@lru_cache(maxsize=1)
def word_counts() -> Counter:
    """How often each lower-case word occurs in the pydoc source."""
    return Counter(re.findall(r"[a-z]+", "\n".join(corpus_lines("pydoc")).lower()))
