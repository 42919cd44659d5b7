"""Run policies x budgets over samples. The full cache runs once per sample; each
configuration then prefills through ``kvpolicy.apply``'s cache and is compared with it."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import kvpolicy

from ..embedded import load_smollm2
from .metrics import kl_divergence, prefix_agreement, score_answer, shared_prefix
from .tasks import Sample


def load_model(name: str = "smollm2"):
    """(model, tokenizer): ``smollm2`` is the embedded GGUF model; anything else is a local
    path or hub id for ``from_pretrained``."""
    if name == "smollm2":
        return load_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(name)
    return AutoModelForCausalLM.from_pretrained(name).eval(), tokenizer


@dataclass
class Generation:
    """Greedy tokens of one prompt with the logits that chose them ([T, V])."""

    tokens: list[int]
    logits: Tensor
    seconds: float
    kept: float = 1.0  # kept fraction of the prompt's KV entries


@dataclass
class Prompt:
    """A sample with its tokens and, once run, the full-cache reference."""

    sample: Sample
    input_ids: Tensor  # [1, N]
    reference: Generation | None = None
    reference_answer: str = ""


@dataclass
class Run:
    policy: str
    budget: float
    sample: str
    task: str
    score: float = 0.0
    agreement: float = 0.0
    kl: float = 0.0
    kl_first: float = 0.0
    kept: float = 0.0
    seconds: float = 0.0
    answer: str = ""
    error: str = ""


class Runner:
    """Holds the model, the tokenized prompts and their full-cache references."""

    def __init__(self, model, tokenizer, samples: list[Sample], max_new_tokens: int):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.prompts = [Prompt(s, torch.tensor([s.input_ids(tokenizer)])) for s in samples]
        eos = model.generation_config.eos_token_id
        self.stop = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}

    # ---- decoding ---------------------------------------------------------------------
    @torch.no_grad()
    def _step(self, ids: Tensor, cache) -> Tensor:
        return self.model(input_ids=ids, past_key_values=cache, use_cache=True,
                          logits_to_keep=1).logits[0, -1].float()

    def _greedy(self, input_ids: Tensor, cache) -> tuple[Generation, object]:
        """Prefill then decode greedily; also returns a copy of the cache after prefill."""
        start = time.perf_counter()
        logits = [self._step(input_ids, cache)]
        after_prefill = copy.deepcopy(cache)
        tokens = [int(logits[0].argmax())]
        while len(tokens) < self.max_new_tokens and tokens[-1] not in self.stop:
            logits.append(self._step(torch.tensor([[tokens[-1]]]), cache))
            tokens.append(int(logits[-1].argmax()))
        return Generation(tokens, torch.stack(logits), time.perf_counter() - start), after_prefill

    def _teacher_forced(self, cache, first: Tensor, tokens: list[int]) -> Tensor:
        """[T, V] logits predicting each of ``tokens`` given the ones before (``first``: the
        prefill's logits; ``cache``: the cache right after prefill)."""
        logits = [first]
        for tok in tokens[:-1]:
            logits.append(self._step(torch.tensor([[tok]]), cache))
        return torch.stack(logits)

    def decode(self, text_ids: list[int]) -> str:
        return self.tokenizer.decode(text_ids, skip_special_tokens=True)

    # ---- the full cache and one configuration ----------------------------------------
    def run_reference(self, prompt: Prompt) -> None:
        gen, _ = self._greedy(prompt.input_ids, DynamicCache(config=self.model.config))
        prompt.reference, prompt.reference_answer = gen, self.decode(gen.tokens)

    def run_policy(self, prompt: Prompt, handle) -> Run:
        """Greedy answer under ``handle``'s policy, scored and compared with the reference."""
        sample, ref = prompt.sample, prompt.reference
        run = Run(handle.policy.name, handle.budget.value, sample.id, sample.task)
        cache = handle.new_cache(self.max_new_tokens)
        gen, after_prefill = self._greedy(prompt.input_ids, cache)
        T = len(ref.tokens)
        if shared_prefix(gen.tokens, ref.tokens) >= T - 1 and len(gen.tokens) >= T:
            logits = gen.logits[:T]  # every position saw the reference's history
        else:  # diverged: score the reference continuation from the cache after prefill
            logits = self._teacher_forced(after_prefill, gen.logits[0], ref.tokens)
        kl = kl_divergence(ref.logits, logits)
        run.answer = self.decode(gen.tokens)
        run.score = score_answer(run.answer, sample.answers)
        run.agreement = prefix_agreement(gen.tokens, ref.tokens)
        run.kl, run.kl_first = float(kl.mean()), float(kl[0])
        run.kept = sum(cache.kept) / (len(cache.kept) * prompt.input_ids.shape[1])
        run.seconds = gen.seconds
        return run

    def run_config(self, policy: str, budget: float, on_sample=lambda: None, **params) -> list[Run]:
        """All prompts under one policy and budget (errors are recorded, not raised)."""
        runs = []
        try:
            with kvpolicy.apply(self.model, policy, budget=budget, **params) as handle:
                for prompt in self.prompts:
                    runs.append(self.run_policy(prompt, handle))
                    on_sample()
        except Exception as exc:  # one broken configuration must not end a long evaluation
            done = {r.sample for r in runs}
            runs += [Run(policy, budget, p.sample.id, p.sample.task, error=f"{type(exc).__name__}: {exc}")
                     for p in self.prompts if p.sample.id not in done]
        return runs

