"""Aggregate runs into per-(policy, budget) rows, print them, read kvpress answers."""
from __future__ import annotations

import json
from collections import defaultdict
from statistics import mean

from .metrics import of_full, score_answer


def summarize(runs: list[dict], full_runs: list[dict] | None = None) -> list[dict]:
    """One row per (policy, budget): means over its samples, and accuracy per task; with
    ``full_runs`` (the full cache's, one per sample), also ``of_full``: the accuracy as a
    fraction of the full cache's on the same samples, and ``of_full_ci95``: its paired
    bootstrap interval (metrics.of_full), both None when the full cache answers none."""
    full_score = {r["sample"]: r["score"] for r in full_runs or [] if not r.get("error")}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["policy"], r["budget"]].append(r)
    rows = []
    for (policy, budget), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.get("error")]
        row = {"policy": policy, "budget": budget, "samples": len(ok), "errors": len(rs) - len(ok)}
        if ok:
            row["accuracy"] = mean(r["score"] for r in ok)
            for key in ("agreement", "kl", "kl_first", "kept", "bytes", "bits"):
                values = [r[key] for r in ok if r.get(key) is not None]
                row[key] = mean(values) if values else None
            by_task = defaultdict(list)
            for r in ok:
                by_task[r["task"]].append(r["score"])
            row["by_task"] = {t: mean(s) for t, s in sorted(by_task.items())}
            paired = [(r["score"], full_score[r["sample"]]) for r in ok if r["sample"] in full_score]
            if paired:
                ratio = of_full(*map(list, zip(*paired)))
                row["of_full"] = None if ratio is None else ratio[0]
                row["of_full_ci95"] = None if ratio is None else list(ratio[1:])
        rows.append(row)
    return rows


def format_table(rows: list[dict], full: dict) -> str:
    """A plain-text table: the full cache first, then each policy by budget."""
    tasks = sorted(full["by_task"])
    head = f"{'policy':<22}{'budget':>7}{'bytes':>7}{'kept':>7}{'bits':>5}{'acc':>6}{'of full [95%]':>20}" \
        f"{'agree':>7}{'KL':>8}  " + \
        " ".join(f"{t[:12]:>12}" for t in tasks)
    lines = [head, "-" * len(head), _line("full cache", 1.0, full, tasks)]
    lines += [_line(r["policy"], r["budget"], r, tasks) for r in rows]
    return "\n".join(lines)


def _line(name: str, budget: float, row: dict, tasks: list[str]) -> str:
    if not row.get("samples"):
        return f"{name:<22}{budget:>7g}  all {row.get('errors', 0)} samples failed"
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    by_task = row.get("by_task", {})
    return (f"{name:<22}{budget:>7g}{fmt(row.get('bytes'), '>7.3f')}{fmt(row.get('kept'), '>7.3f')}"
            f"{fmt(row.get('bits'), '>5.0f')}{row['accuracy']:>6.2f}{_of_full(row):>20}"
            f"{fmt(row.get('agreement'), '>7.2f')}{fmt(row.get('kl'), '>8.3f')}  "
            + " ".join(f"{fmt(by_task.get(t), '>12.2f')}" for t in tasks))


def _of_full(row: dict) -> str:
    """"0.50 [0.25, 0.80]": the row's accuracy as a fraction of the full cache's and its
    interval ("-" without them)."""
    if row.get("of_full") is None:
        return "-"
    low, high = row["of_full_ci95"]
    return f"{row['of_full']:.2f} [{low:.2f}, {high:.2f}]"


def kvpress_runs(path: str, prompts: dict) -> list[dict]:
    """Runs from a kvpress answers file: {press: {kept fraction: {prompt id: answer}}}
    (written by docs/kvpress_answers.py, or docs/quantized_cache_answers.py, whose
    ``_meta.label`` "transformers" names its rows); ``prompts``: prompt id ->
    runner.Prompt. Scored like ours, without KL or agreement."""
    with open(path) as f:
        answers = json.load(f)
    label = answers.get("_meta", {}).get("label", "kvpress")
    runs = []
    for press, by_budget in answers.items():
        if press.startswith("_"):  # "_meta": versions and mode
            continue
        for budget, by_sample in by_budget.items():
            for sid, answer in by_sample.items():
                if sid in prompts:
                    p = prompts[sid]
                    runs.append({"policy": f"{label}:{press}", "budget": float(budget), "sample": sid,
                                 "task": p.sample.task, "score": score_answer(answer, p.answers),
                                 "answer": answer, "agreement": None, "kl": None, "kl_first": None,
                                 "kept": None})
    return runs
