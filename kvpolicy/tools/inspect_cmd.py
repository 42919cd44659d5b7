"""``kvpolicy inspect``: which prompt positions each layer keeps, drawn as a heatmap, and how
much of a marked span (e.g. a needle) every layer retained."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from kvpolicy import Plan, apply, models

from .embedded import load_smollm2
from .params import tokenizer_for
from .eval.tasks import build_samples


def kept_fraction(plan: Plan, num_positions: int, row: int = 0) -> Tensor:
    """float32 [L, N]: for sequence ``row``, the share of KV heads keeping each position
    (a per-head plan's heads: their own counts)."""
    out = torch.zeros(len(plan.keep), num_positions)
    for l, (keep, counts) in enumerate(zip(plan.keep, plan.entries)):
        heads = keep[row].cpu()  # [G, n_l]
        own = torch.arange(heads.shape[1]) < counts[row].cpu()[:, None]
        out[l].index_add_(0, heads[own], torch.full((int(own.sum()),), 1.0 / heads.shape[0]))
    return out


def span_retention(kept: Tensor, start: int, stop: int) -> Tensor:
    """float32 [L]: mean kept share over positions [start, stop)."""
    return kept[:, start:stop].mean(-1)


def answer_span(tokenizer, input_ids: list[int], answer: str) -> tuple[int, int]:
    """[start, stop) token positions of the first occurrence of ``answer`` in the prompt."""
    text = tokenizer.decode(input_ids)
    at = text.find(answer)
    if at < 0:
        raise ValueError(f"answer {answer!r} does not occur in the prompt")
    # Position of the first token whose decoded prefix reaches the answer's characters.
    prefix_len = [len(tokenizer.decode(input_ids[:i + 1])) for i in range(len(input_ids))]
    start = next(i for i, n in enumerate(prefix_len) if n > at)
    stop = next(i for i, n in enumerate(prefix_len) if n >= at + len(answer)) + 1
    return start, stop


def heatmap(kept: Tensor, span: tuple[int, int] | None, path: Path, title: str) -> None:
    """Save a layers x positions PNG of ``kept`` with the span marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4))
    ax.imshow(kept.numpy(), aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1)
    if span is not None:
        for x in span:
            ax.axvline(x - 0.5, color="red", linewidth=0.8)
    ax.set_xlabel("prompt position")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default="snapkv")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="policy parameter (JSON value), repeatable")
    parser.add_argument("--task", default="needle", help="eval task that provides the prompt")
    parser.add_argument("--context", type=int, default=1500, help="document tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", type=int, default=0, help="sample index within the seed")
    parser.add_argument("--out", type=Path, default=Path("inspect.png"))


def run(args: argparse.Namespace) -> int:
    model, tok = load_smollm2()
    params = {**tokenizer_for(args.policy, tok),
              **{k: json.loads(v) for k, v in (p.split("=", 1) for p in args.param)}}
    sample = build_samples(tok, args.index + 1, args.context, args.seed, tasks=[args.task])[-1]
    context, rest = sample.split_ids(tok, 0)  # the document and its first question
    ids, answer = context + rest, sample.questions[0].answers[0]
    span = answer_span(tok, ids, answer)
    input_ids = torch.tensor([ids])
    with apply(model, args.policy, budget=args.budget, **params), torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    plan = models.output_cache(out).plan
    kept = kept_fraction(plan, len(ids))
    kept_span = span_retention(kept, *span)
    reply = tok.decode(out.sequences[0, len(ids):], skip_special_tokens=True)
    print(f"{args.policy} budget={args.budget} prompt={len(ids)} tokens, span {span} "
          f"({answer!r}); reply: {reply.strip()!r}")
    print("span kept per layer: " + " ".join(f"{x:.2f}" for x in kept_span.tolist()))
    print(f"mean over layers: {kept_span.mean():.3f}; layers keeping all of it: "
          f"{int((kept_span > 0.999).sum())}/{len(kept_span)}")
    heatmap(kept, span, args.out, f"{args.policy} @ {args.budget}: kept positions (span in red)")
    print(f"heatmap: {args.out}")
    return 0
