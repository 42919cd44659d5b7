"""The bytes-vs-accuracy figure of docs/quality.md: accuracy (over the full cache's) against
the bytes held for the prompt (over the full cache's K/V), one series per way of spending
them: tokens only (a token budget, rows in the model's dtype), bits only (every token kept,
in fewer bits: ``F@BITS`` budgets at 1, and transformers' ``QuantizedCache``), and the mix
(``kvpolicy.Memory``). Runs in the project's venv with the eval extra (matplotlib):

    python docs/bytes_curve.py out.png --title "..." results.json[=SERIES] [...] \
        [--policy kvzip] [--answers qc.json --samples results.json]

``results.json``: ``kvpolicy eval`` runs on the same questions (their summary rows give
``bytes``, ``bits`` and accuracy, the full cache's accuracy the reference; rows without
``bytes``, from runs before the eval recorded them, are left out); ``=SERIES`` puts a
file's rows in a series of that name; ``--policy`` keeps the rows of one policy; ``--answers``:
files of docs/quantized_cache_answers.py (keyed by their bytes), scored here with the eval's
``score_answer`` against the questions of ``--samples``.
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kvpolicy.tools.eval.metrics import score_answer  # noqa: E402


def way(row: dict) -> str:
    """The series of a summary row: mix (Memory), bits only (budget 1 below 16 bits), tokens only."""
    if str(row["policy"]).endswith("[mem]"):
        return "mix: kvpolicy.Memory"
    if row.get("bits", 16) < 16 and row["budget"] >= 1:
        return "bits only: every token, fewer bits"
    return "tokens only: 16 bits"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("results", nargs="+")
    p.add_argument("--answers", nargs="*", default=[])
    p.add_argument("--samples", help="results.json whose questions the answers files answered")
    p.add_argument("--title", default="")
    p.add_argument("--policy", help="keep the rows whose policy starts with this name")
    args = p.parse_args()
    points: dict[str, list[tuple[float, float, str]]] = {}
    full = None
    for spec in args.results:
        path, _, series = spec.partition("=")
        with open(path) as f:
            results = json.load(f)
        full = full or results["full"]["accuracy"]
        for row in results["summary"]:
            if row.get("bytes") is None or not str(row["policy"]).startswith(args.policy or ""):
                continue
            points.setdefault(series or way(row), []).append((row["bytes"], row["accuracy"], row["policy"]))
    if args.answers:
        with open(args.samples) as f:
            expected = {s["id"]: s["answers"] for s in json.load(f)["samples"]}
    for path in args.answers:
        with open(path) as f:
            answers = json.load(f)
        for name, by_bytes in answers.items():
            if name.startswith("_"):
                continue
            for held, by_sample in by_bytes.items():
                acc = sum(score_answer(a, expected[s]) for s, a in by_sample.items()) / len(by_sample)
                points.setdefault("bits only: transformers QuantizedCache", []).append(
                    (float(held), acc, name))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, pts in sorted(points.items()):
        pts.sort()
        ax.plot([b for b, _, _ in pts], [a / full for _, a, _ in pts], marker="o", label=label)
        for b, a, name in pts:
            ax.annotate(name, (b, a / full), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, color="black", linestyle=":", label="full cache")
    ax.set(xscale="log", xlabel="bytes held for the prompt / the full cache's K/V",
           ylabel="accuracy / the full cache's", ylim=(-0.03, 1.2), title=args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
