"""Where each correct reply of a ``kvpolicy eval`` run begins its answer, in tokens.

A policy that defers its compaction (SpanKV's ``defer=8``) decodes the reply's first
``defer + 1`` tokens over the whole prompt; an answer that begins before them is partly
the full prompt's. This re-tokenizes each correct reply of one configuration with the
embedded model's tokenizer and prints the token index at which its first expected answer
begins, and how many begin at or after ``--after``:

    python docs/answer_start.py docs/results/heldout/query-aware-2000.json spankv 0.1 --after 9
"""
import argparse
import json
import re

from kvpolicy.tools.embedded import load_smollm2
from kvpolicy.tools.eval.metrics import answer_pattern


def answer_start(tokenizer, reply: str, answers: list[str]) -> int:
    """Index of the reply token in which the earliest expected answer begins, found as the
    eval scores it (``answer_pattern``; the reply's case folded, its spacing kept so that
    offsets stay the reply's)."""
    found = (re.search(answer_pattern(a), reply.lower()) for a in answers)
    first = min(m.start() for m in found if m is not None)
    ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    return next(i for i in range(len(ids)) if len(tokenizer.decode(ids[:i + 1])) > first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="results.json of a kvpolicy eval run")
    p.add_argument("policy", help="the configuration's label, e.g. spankv ('full' for the full cache)")
    p.add_argument("budget", type=float)
    p.add_argument("--after", type=int, default=9, help="count answers beginning at or after this token")
    args = p.parse_args()
    _, tokenizer = load_smollm2()
    with open(args.results) as f:
        results = json.load(f)
    answers = {s["id"]: s["answers"] for s in results["samples"]}
    starts = sorted(answer_start(tokenizer, r["answer"], answers[r["sample"]]) for r in results["runs"]
                    if r["policy"] == args.policy and abs(r["budget"] - args.budget) < 1e-9
                    and not r.get("error") and r["score"] > 0)
    print(f"{args.policy} {args.budget:g}: {len(starts)} correct replies; answer begins at token {starts}; "
          f"{sum(s >= args.after for s in starts)} at or after token {args.after}")


if __name__ == "__main__":
    main()
