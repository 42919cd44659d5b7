"""KVzip: score each context key by how much the model needs it to repeat the context
(Kim et al., 2025), query-agnostic."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..allocation import take_cheapest
from ..chunks import chunk_spans
from ..heads import global_heads, head_valid_or
from ..policy import Policy, QuerySet, Requirements, Stats, check_int, check_share
from ..registry import register_policy
from ..selection import edge_tokens

REPEAT = "\n\nRepeat the previous context exactly."
REPEAT_PART = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP = 8  # tokens of the previous chunk a later pass starts from
PLACEHOLDER = "@@kvzip@@"


@register_policy("kvzip")
class KVzip(Policy):
    # the rule: its card, registry/cards/kvzip.toml (also its __doc__)
    reconstruct = True
    protects = "the first `sinks` and the last `window` tokens"

    def __init__(self, tokenizer=None, sinks: int = 4, chunk: int = 2048, layerwise: bool = False,
                 question: int = 0, min_share: float = 0.0, plus: bool = False, window: int = 0):
        for name, flag in (("layerwise", layerwise), ("plus", plus)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        self.tokenizer = tokenizer
        self.sinks = check_int("sinks", sinks, 0)
        self.window = check_int("window", window, 0)
        self.chunk = check_int("chunk", chunk, 1)
        self.layerwise = layerwise
        self.per_head = not layerwise  # the paper's head-level selection, unless equal layers
        self.question = check_int("question", question, 0)
        self.min_share = check_share("min_share", min_share)
        self.plus = plus

    def requirements(self) -> Requirements:
        """With ``plus`` (KVzip+): each pass probability weighted by the key's contribution
        to the attention's output (Requirements.contribution)."""
        return dataclasses.replace(super().requirements(), contribution=self.plus)

    @property
    def queries(self) -> QuerySet:
        """The prompt's forward counts its last ``question`` tokens (none by default: the
        reconstruction passes score)."""
        return "window" if self.question else "none"

    def query_mask(self, valid: Tensor, vision: Tensor | None) -> Tensor:
        return edge_tokens(valid, 0, self.question)

    def score(self, stats: Stats) -> Tensor:
        """float [L, B, G, N]: the passes' max, or with ``question`` the larger of it and
        the attention the prompt's last ``question`` tokens gave the key (summed over them
        and the group's query heads)."""
        if stats.prompt_attn is None:
            return stats.attn
        return torch.maximum(stats.attn, stats.prompt_attn)

    def reconstruction(self, context: Tensor, chunk: int | None) -> list[tuple[int, int, Tensor]]:
        """The passes repeating context ids int64 [1, n]: (start, stop, ids [1, q]) with ids
        = the repeat request, the chat template's end of the user turn, then
        context[start:stop] teacher-forced. ``chunk`` (compress's chunk_size): the chunks
        compress reads (``chunk_spans``: a short last piece joins the chunk before it);
        None: ``self.chunk`` tokens each, the last piece whatever is left, as the paper."""
        if self.tokenizer is None:
            raise ValueError("kvzip(tokenizer=...): pass the model's tokenizer; KVzip asks the model "
                             "to repeat the context with its own chat template")
        n = context.shape[1]
        spans = (chunk_spans(n, chunk) if chunk
                 else [(a, min(a + self.chunk, n)) for a in range(0, n, self.chunk)])
        suffix = self.encode(self.turn_end())
        passes = []
        for start, stop in spans:
            if start == 0:
                head = self.encode(REPEAT)
            else:
                head = torch.cat([self.encode(REPEAT_PART), context[0, max(0, start - OVERLAP):start]])
            ids = torch.cat([head, suffix, context[0, start:stop]])[None]
            passes.append((start, stop, ids))
        return passes

    def turn_end(self) -> str:
        """The chat template's text after a user message up to the assistant's reply ("\\n"
        without a template), as kvpress splits it."""
        if not getattr(self.tokenizer, "chat_template", None):
            return "\n"
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": PLACEHOLDER}],
                                                  add_generation_prompt=True, tokenize=False,
                                                  enable_thinking=False)
        return text.split(PLACEHOLDER)[-1]

    def encode(self, text: str) -> Tensor:
        """int64 [n]: ``text``'s ids without special tokens."""
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def allocate(self, stats: Stats, total: int, floor: int) -> Tensor:
        """Layerwise: equal. Per head (``per_head``, the default without ``layerwise``): the
        paper's global top-``total`` x G entries over every layer and KV head (int64 [L, B,
        G], kvpolicy.heads.global_heads). Per layer (``per_head=False``): a global
        top-``total`` across layers with a layer's KV heads taking the same count: layer l's
        k-th token is worth the mean over its heads of each head's k-th highest score
        (protected tokens first), best first (int64 [L]). With ``min_share`` every
        layer (per head: every KV head) first takes its top ``min_share`` of an equal split
        (ours; the allocation is then no longer monotone in the total)."""
        if self.layerwise:
            return super().allocate(stats, total, floor)
        floor = min(self.room(stats), max(floor, int(self.min_share * total / stats.num_layers)))
        scores = self.score(stats)
        if self.per_head:
            return global_heads(scores, total, floor, self.protected_by_layer(stats),
                                stats.valid, stats.head_valid)
        big = 1e30
        protected = self.protected_by_layer(stats)[:, :, None, :]
        held = head_valid_or(stats.valid, stats.head_valid, scores.shape)
        key = scores.double().masked_fill(protected, big).masked_fill(~held, -big)
        ranked = key.sort(-1, descending=True).values.mean(dim=(1, 2))  # [L, N]
        return take_cheapest(-ranked.cpu(), total, floor, self.room(stats))


@register_policy("kvzip_floor")
class KVzipFloor(KVzip):
    # the rule: its card, registry/cards/kvzip_floor.toml (also its __doc__)

    def __init__(self, tokenizer=None, sinks: int = 4, chunk: int = 2048, question: int = 0,
                 min_share: float = 0.75, plus: bool = False, window: int = 8):
        super().__init__(tokenizer, sinks, chunk, False, question, min_share, plus, window)
