"""``kvpolicy eval``: task accuracy, agreement with the full cache and KL divergence of
policies x budgets on retrieval tasks built from the Python docs, in the natural chat
format (question at the end of the user turn) or with an answer prefix, query-aware or
query-agnostic (document compressed before the question)."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import json
import os
import platform
import time

import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from kvpolicy import Memory, available_policies

from .metrics import score_answer
from .report import format_table, kvpress_runs, summarize
from .runner import MODES, Runner, load_model
from .tasks import SPLIT_SEEDS, build_samples, task_names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (the embedded GGUF model) or a path / hub id (default: smollm2)")
    p.add_argument("--policies", default="all",
                   help="'all' or a comma list; NAME:KEY=VALUE[:KEY=VALUE] sets parameters, e.g. "
                        "spankv:observe=16 (default: all)")
    p.add_argument("--budgets", default="0.05,0.1,0.2,0.5",
                   help="comma list of budgets: F keeps the fraction F of the prompt's tokens in the "
                        "model's dtype, F@BITS the fraction F with rows in BITS (8, 4, 2) bits, memF "
                        "at most the fraction F of the full cache's bytes (kvpolicy.Memory: bits and "
                        "tokens chosen by its rule) (default: 0.05,0.1,0.2,0.5)")
    p.add_argument("--samples", type=int, default=8,
                   help="documents per seed, two questions each; the tasks take turns (default: 8)")
    p.add_argument("--tasks", default="all",
                   help="'all' or a comma list of the split's tasks: needle, key_value, word_fact "
                        "(-v1 splits: needle, multi_needle, key_value, doc_sentence)")
    p.add_argument("--context", type=int, default=1024,
                   help="document tokens per prompt, up to 8000: the prompt adds ~100 (default: 1024)")
    p.add_argument("--max-new-tokens", type=int, default=24,
                   help="answer length cap: replies often restate the question first (default: 24)")
    p.add_argument("--seed", type=parse_seeds, default=[0],
                   help="sample seed, or a comma list of seeds whose draws are pooled into one "
                        "report (--samples documents each), e.g. 0,1 (default: 0)")
    p.add_argument("--split", choices=sorted(SPLIT_SEEDS), default="tune",
                   help="disjoint sample streams with disjoint wordings: tune policies on one, report "
                        "the other; -v1: the earlier one-question tasks (default: tune)")
    p.add_argument("--mode", choices=MODES, default="query-aware",
                   help="query-aware: document and question compressed together; query-agnostic: "
                        "the document compressed alone (kvpolicy.compress), each question asked "
                        "from a copy of its cache (default: query-aware)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="prefill the compressed part in chunks of this many tokens (default: whole)")
    p.add_argument("--answer-prefix", action="store_true",
                   help="end each prompt inside the reply with the start of the answer (the "
                        "format of the -v1 numbers) instead of the generation prompt")
    p.add_argument("--kvpress", metavar="JSON", help="kvpress answers to score alongside (see docs/guide.md)")
    p.add_argument("--out", default="kvpolicy-eval", help="output folder (default: kvpolicy-eval)")


def parse_list(text: str, allowed: list[str], what: str) -> list[str]:
    if text == "all":
        return list(allowed)
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in allowed]
    if unknown:
        raise SystemExit(f"kvpolicy eval: unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return items


def parse_seeds(text: str) -> list[int]:
    """--seed: one seed or a comma list of distinct seeds."""
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write a seed or a comma list of seeds, e.g. 0,1") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: write distinct seeds, e.g. 0,1")
    return seeds


def parse_budgets(text: str) -> list[tuple[str, float, object, dict]]:
    """(label suffix, number, budget, extra apply parameters) per entry of --budgets: F,
    F@BITS (bits=BITS) or memF (kvpolicy.Memory(F)); refused by name otherwise."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            if item.startswith("mem"):
                f = float(item[3:])
                out.append((" [mem]", f, Memory(f), {}))
            elif "@" in item:
                f, bits = item.split("@")
                out.append((f" [{int(bits)} bits]", float(f), float(f), {"bits": int(bits)}))
            else:
                out.append(("", float(item), float(item), {}))
        except ValueError as exc:
            raise SystemExit(f"kvpolicy eval: budget {item!r}: write F (a kept fraction), F@BITS "
                             f"(8, 4 or 2 bits) or memF (a fraction of the bytes) ({exc})") from None
    return out


def parse_policies(text: str) -> list[tuple[str, str, dict]]:
    """(label, name, params) per entry of --policies: NAME or NAME:KEY=VALUE[:KEY=VALUE],
    values parsed as Python literals where they are one (ints, floats, booleans)."""
    names = available_policies()
    if text == "all":
        return [(n, n, {}) for n in names]
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, *pairs = item.split(":")
        if name not in names:
            raise SystemExit(f"kvpolicy eval: unknown policy {name}; choose from {', '.join(names)}")
        params = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq:
                raise SystemExit(f"kvpolicy eval: {item!r}: write parameters as KEY=VALUE")
            try:
                params[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                params[key] = value
        out.append((item, name, params))
    return out


def run(args: argparse.Namespace) -> int:
    from .plot import plot_summary  # the eval extra: missing fails here, not after the runs

    policies = parse_policies(args.policies)
    tasks = parse_list(args.tasks, task_names(args.split), "task")
    budgets = parse_budgets(args.budgets)
    if not 16 <= args.context <= 8000:  # SmolLM2 has 8192 positions; template, question, answer
        raise SystemExit("kvpolicy eval: --context must be within 16..8000 tokens")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise SystemExit("kvpolicy eval: --chunk-size must be a positive number of tokens")
    started = time.perf_counter()
    hf_logging.disable_progress_bar()
    model, tokenizer = load_model(args.model)
    samples = [s for seed in args.seed
               for s in build_samples(tokenizer, args.samples, args.context, seed, args.split, tasks)]
    runner = Runner(model, tokenizer, samples, args.max_new_tokens, args.answer_prefix, args.mode,
                    args.chunk_size)

    bar = tqdm(total=len(runner.prompts) * (1 + len(policies) * len(budgets)), desc="kvpolicy eval",
               unit="run")
    bar.set_postfix_str("full cache")
    for group in runner.by_sample():
        runner.run_references(group)
        bar.update(len(group))
    full_runs = [{"policy": "full", "budget": 1.0, "sample": p.id, "task": p.sample.task,
                  "score": score_answer(p.reference_answer, p.answers), "answer": p.reference_answer,
                  "agreement": 1.0, "kl": 0.0,
                  "kl_first": 0.0, "kept": 1.0, "bytes": 1.0, "bits": 16,
                  "seconds": p.reference.seconds} for p in runner.prompts]
    meta = {"model": args.model, "context": args.context, "samples": args.samples, "tasks": tasks,
            "split": args.split,
            "seed": args.seed[0] if len(args.seed) == 1 else args.seed, "max_new_tokens": args.max_new_tokens,
            "mode": args.mode, "chunk_size": args.chunk_size, "answer_prefix": args.answer_prefix,
            "questions": len(runner.prompts),
            "policies": [label for label, _, _ in policies], "budgets": args.budgets.split(","),
            "date": datetime.date.today().isoformat(), "machine": _machine()}
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for suffix, number, budget, extra in budgets:  # budget-major: an interrupted run compares every policy
        for label, policy, params in policies:
            bar.set_postfix_str(f"{label}{suffix} {number:g}")
            done = runner.run_config(policy, budget, on_sample=bar.update, **params, **extra)
            runs += [dict(dataclasses.asdict(r), policy=label + suffix, budget=number) for r in done]
            meta["wall_seconds"] = round(time.perf_counter() - started, 1)
            write_results(args.out, meta, runner, full_runs, runs, complete=False)  # kept if interrupted
    bar.close()
    if args.kvpress:
        runs += kvpress_runs(args.kvpress, {p.id: p for p in runner.prompts})
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)
    full, summary = write_results(args.out, meta, runner, full_runs, runs, complete=True)
    plot_summary(summary, full["accuracy"], os.path.join(args.out, "quality.png"),
                 f"{args.model}, {args.context}-token documents, {len(runner.prompts)} questions "
                 f"({args.split}, {args.mode}{', chunks of %d' % args.chunk_size if args.chunk_size else ''})")
    print(format_table(summary, full))
    errors = [r for r in runs if r.get("error")]
    for r in errors[:5]:
        print(f"error: {r['policy']} {r['budget']:g} {r['sample']}: {r['error']}")
    print(f"{len(runs)} runs in {meta['wall_seconds']:.0f} s; results in {args.out}/results.json "
          f"and {args.out}/quality.png")
    return 1 if errors else 0


def write_results(out: str, meta: dict, runner: Runner, full_runs: list[dict], runs: list[dict],
                  complete: bool) -> tuple[dict, list[dict]]:
    """Write results.json (also after each configuration); returns (full row, summary)."""
    full, = summarize(full_runs)
    summary = summarize(runs, full_runs)
    samples = [dict(id=p.id, task=p.sample.task, source=p.sample.source, answers=p.answers,
                    depth=p.sample.questions[p.question].depth, context_ids=p.context_ids[0].tolist(),
                    rest_ids=p.rest_ids[0].tolist(), reference=p.reference_answer)
               for p in runner.prompts]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": dict(meta, complete=complete), "full": full, "summary": summary,
                   "samples": samples, "runs": full_runs + runs}, f, indent=1)
    return full, summary


def _machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {device}, torch {torch.__version__}"
