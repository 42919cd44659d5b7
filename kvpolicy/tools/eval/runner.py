"""Run policies x budgets over prompts. The full cache runs once per prompt; each
configuration then answers every prompt and is compared with it.

Modes: ``query-aware`` runs ``model.generate`` on the whole prompt (document and
question) under ``apply``, as users call it (greedy). ``query-agnostic`` compresses each
document alone with ``kvpolicy.compress`` and asks each of its questions with
``model.generate`` from a copy of that cache (the question is appended, not compressed
again: the cache's ``recompress`` is turned off after ``compress``, whose chunks are
compressed). ``chunk_size`` feeds the compressed part in chunks, compressing after each
one.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import kvpolicy
from kvpolicy.memory import held_fraction
from kvpolicy.models import CACHE_ARG

from ..embedded import load_smollm2
from ..params import tokenizer_for
from .metrics import kl_divergence, prefix_agreement, score_answer, shared_prefix
from .tasks import Sample

MODES = ("query-aware", "query-agnostic")


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


@dataclass
class Prompt:
    """One question of a sample: its tokens split into the document part and the rest, and,
    once run, the full-cache reference."""

    sample: Sample
    question: int
    context_ids: Tensor  # [1, Nc]: template start and document
    rest_ids: Tensor  # [1, Nq]: question, end of turn, generation prompt (or answer prefix)
    reference: Generation | None = None
    reference_answer: str = ""

    @property
    def id(self) -> str:
        return f"{self.sample.id}/q{self.question}"

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.context_ids, self.rest_ids], -1)

    @property
    def answers(self) -> list[str]:
        return self.sample.questions[self.question].answers


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
    bytes: float = 0.0  # the kept prompt rows' bytes over the full cache's (kvpolicy.memory)
    bits: int = 16
    seconds: float = 0.0
    answer: str = ""
    error: str = ""


class Runner:
    """Holds the model, the tokenized prompts and their full-cache references."""

    def __init__(self, model, tokenizer, samples: list[Sample], max_new_tokens: int,
                 answer_prefix: bool = False, mode: str = "query-aware", chunk_size: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.mode, self.chunk_size = mode, chunk_size
        self.prompts = []
        for s in samples:
            for q in range(len(s.questions)):
                ctx, rest = s.split_ids(tokenizer, q, answer_prefix)
                self.prompts.append(Prompt(s, q, torch.tensor([ctx]), torch.tensor([rest])))
        eos = model.generation_config.eos_token_id
        self.stop = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}

    # ---- decoding ---------------------------------------------------------------------
    @torch.no_grad()
    def _step(self, ids: Tensor, cache) -> Tensor:
        return self.model(input_ids=ids, use_cache=True, logits_to_keep=1,
                          **{CACHE_ARG: cache}).logits[0, -1].float()

    def _greedy(self, ids: Tensor, cache) -> tuple[Generation, object]:
        """The full cache's reply: feed ``ids`` (a question after the document in a
        DynamicCache) then decode greedily; also returns a copy of the cache after the feed."""
        start = time.perf_counter()
        logits = [self._step(ids, cache)]
        after_prefill = copy.deepcopy(cache)
        tokens = [int(logits[0].argmax())]
        while len(tokens) < self.max_new_tokens and tokens[-1] not in self.stop:
            logits.append(self._step(torch.tensor([[tokens[-1]]]), cache))
            tokens.append(int(logits[-1].argmax()))
        return Generation(tokens, torch.stack(logits), time.perf_counter() - start), after_prefill

    @torch.no_grad()
    def _generate(self, ids: Tensor, cache, chunk: int | None = None) -> tuple[Generation, object]:
        """``model.generate`` (greedy; prefilled in chunks of ``chunk`` tokens as
        ``prefill_chunk_size``) on ``ids`` with ``cache`` (a fresh one: the policy's work
        runs inside the prefill, reconstruction passes and compaction; or a compressed
        document's copy, continued by the question); also returns a copy of the cache after
        the prefill's last forward. Forward hooks count generate's own forwards (depth 0),
        not those run inside them (reconstruction passes run in kvpolicy's hook); the copy
        is taken after kvpolicy's hook, which was registered first."""
        prefill_forwards = 1 if chunk is None else -(-ids.shape[1] // chunk)
        depth, ended, after_prefill = [0], [0], []

        def enter(module, args, kwargs):
            depth[0] += 1

        def leave(module, args, kwargs, output):
            depth[0] -= 1
            if depth[0] == 0:
                ended[0] += 1
                if ended[0] == prefill_forwards:
                    after_prefill.append(copy.deepcopy(cache))

        hooks = [self.model.register_forward_pre_hook(enter, with_kwargs=True),
                 self.model.register_forward_hook(leave, with_kwargs=True)]
        start = time.perf_counter()
        try:
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **{CACHE_ARG: cache},
                                      max_new_tokens=self.max_new_tokens, do_sample=False,
                                      prefill_chunk_size=chunk,
                                      eos_token_id=sorted(self.stop), pad_token_id=min(self.stop),
                                      output_logits=True, return_dict_in_generate=True)
        finally:
            for hook in hooks:
                hook.remove()
        tokens = out.sequences[0, ids.shape[1]:].tolist()
        logits = torch.stack([step[0].float() for step in out.logits])
        return Generation(tokens, logits, time.perf_counter() - start), after_prefill[0]

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
    def run_references(self, prompts: list[Prompt]) -> None:
        """Full-cache answers of one sample's questions: its document prefilled once into a
        DynamicCache, each question continued from a copy."""
        context = DynamicCache(config=self.model.config)
        start = time.perf_counter()
        self._step(prompts[0].context_ids, context)
        seconds = (time.perf_counter() - start) / len(prompts)
        for p in prompts:
            gen, _ = self._greedy(p.rest_ids, copy.deepcopy(context))
            gen.seconds += seconds
            p.reference, p.reference_answer = gen, self.decode(gen.tokens)

    def _compare(self, run: Run, prompt: Prompt, gen: Generation, after_prefill) -> Run:
        """Score ``gen`` and compare it with the reference (KL teacher-forced on divergence)."""
        ref = prompt.reference
        T = len(ref.tokens)
        if shared_prefix(gen.tokens, ref.tokens) >= T - 1 and len(gen.tokens) >= T:
            logits = gen.logits[:T]  # every position saw the reference's history
        else:  # diverged: score the reference continuation from the cache after prefill
            logits = self._teacher_forced(after_prefill, gen.logits[0], ref.tokens)
        kl = kl_divergence(ref.logits, logits)
        run.answer = self.decode(gen.tokens)
        run.score = score_answer(run.answer, prompt.answers)
        run.agreement = prefix_agreement(gen.tokens, ref.tokens)
        run.kl, run.kl_first = float(kl.mean()), float(kl[0])
        run.seconds = gen.seconds
        return run

    def run_policy(self, prompt: Prompt, handle) -> Run:
        """Query-aware: ``model.generate`` on the whole prompt under ``handle``'s policy."""
        run = Run(handle.policy.name, handle.budget.value, prompt.id, prompt.sample.task)
        cache = handle.new_cache(self.max_new_tokens)
        gen, after_prefill = self._generate(prompt.input_ids, cache, self.chunk_size)
        # a deferred plan ran over the prompt and the decode steps it waited for
        planned = prompt.input_ids.shape[1] + min(cache.defer_steps, len(gen.tokens) - 1)
        run.kept = sum(cache.kept) / (len(cache.kept) * planned)
        run.bytes, run.bits = held_fraction(cache, planned), handle.bits
        return self._compare(run, prompt, gen, after_prefill)

    def run_agnostic(self, prompts: list[Prompt], policy: str, budget, **params) -> list[Run]:
        """Query-agnostic: one sample's document compressed once, each question from a copy."""
        context = prompts[0].context_ids
        assert all(torch.equal(p.context_ids, context) for p in prompts)
        start = time.perf_counter()
        longest = max(p.rest_ids.shape[1] for p in prompts)
        cache = kvpolicy.compress(self.model, context, policy, budget=budget, chunk_size=self.chunk_size,
                                  max_new_tokens=longest + self.max_new_tokens,
                                  recompress=False,  # chunks compressed; questions appended
                                  **params)
        seconds = time.perf_counter() - start
        kept = sum(cache.kept) / (len(cache.kept) * context.shape[1])
        held, bits = held_fraction(cache, context.shape[1]), cache.layers[0].bits
        runs = []
        for p in prompts:
            gen, after_prefill = self._generate(p.input_ids, cache.copy())  # generate feeds the question
            run = Run(cache.policy.name, budget, p.id, p.sample.task, kept=kept, bytes=held, bits=bits)
            runs.append(self._compare(run, p, gen, after_prefill))
            run.seconds += seconds / len(prompts)
        return runs

    def run_config(self, policy: str, budget, on_sample=lambda: None, **params) -> list[Run]:
        """All prompts under one policy and budget (errors are recorded, not raised); a
        policy with a ``tokenizer`` parameter (kvzip) gets the model's unless one is given."""
        params = {**tokenizer_for(policy, self.tokenizer), **params}
        runs = []
        try:
            if self.mode == "query-aware":
                with kvpolicy.apply(self.model, policy, budget=budget, **params) as handle:
                    for prompt in self.prompts:
                        runs.append(self.run_policy(prompt, handle))
                        on_sample()
            else:
                for group in self.by_sample():
                    runs += self.run_agnostic(group, policy, budget, **params)
                    for _ in group:
                        on_sample()
        except Exception as exc:  # one broken configuration must not end a long evaluation
            done = {r.sample for r in runs}
            runs += [Run(policy, budget, p.id, p.sample.task, error=f"{type(exc).__name__}: {exc}")
                     for p in self.prompts if p.id not in done]
        finally:
            kvpolicy.detach(self.model)
        return runs

    def by_sample(self) -> list[list[Prompt]]:
        groups: dict[str, list[Prompt]] = {}
        for p in self.prompts:
            groups.setdefault(p.sample.id, []).append(p)
        return list(groups.values())
