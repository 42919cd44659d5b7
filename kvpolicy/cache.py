"""PolicyCache: the compressed cache of one conversation, and the one owner of the state of
the generation in progress on it.

The engine (kvpolicy.hooks, driven by generate, a hand-written forward loop or
kvpolicy.compress) calls four methods and writes nothing else:

- ``begin_call(ids, new_tokens, ...)``: a generate call starts; whether it continues a
  finished call (a new chat turn) or is the first prompt is known here;
- ``begin_forward(...)``: a forward starts: a multi-token one opens every layer and a
  kvpolicy.prefill.PromptObserver; a one-token one is a decode step;
- ``end_forward()``: plan (kvpolicy.planning) and compact a multi-token forward, or count a
  decode step of a deferred compaction (``Deferral``);
- ``end_call(sequences)``: a generate call ended (a deferred compaction still waiting runs).

Each layer's buffers and decode step are kvpolicy.layer.KVLayer.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from .budget import Budget
from .compaction import compact_layers_into
from .layer import KVLayer
from .pipeline import Observation, ScoreTally
from .planning import at_slots, plan_forward, slots_wide
from .policy import Plan, Policy
from .prefill import Observed, PromptObserver
from .quantized import Scratch, check_bits
from .reconstruction import PassObserver


@dataclass
class Deferral:
    """A multi-token forward whose compaction waits for ``steps`` decode steps: every slot
    is kept meanwhile, and ``observed.tally`` (fp32 [B, G, C] per scored layer, aligned on
    the slots) adds the decode steps' attention to the forward's."""

    steps: int
    observed: Observed
    decoded: int = 0


class PolicyCache(Cache):
    """The compressed cache of one conversation under ``policy`` at ``budget``.

    layer_windows: per decoder layer the sliding window its cache keeps (None = full
    attention; kvpolicy.models.layer_windows), or the layer count. max_new_tokens: decode
    steps planned until a generate call says otherwise (sizes append buffers and the fixed
    size of evicting layers); bucket: round append buffers up to a multiple of this (fewer
    torch.compile shapes); recompress: whether a new turn (a call continuing a finished
    call) is compressed again so that each layer keeps ``budget`` of everything seen (else
    it is appended). The chunks of one call's prompt are always compressed. rotary: a
    kvpolicy.rotary.CacheRotary for policies with positions="cache". chunk_size: the
    prompt chunk a reconstructing policy (``Requirements.reconstruct``) scores and compacts
    at a time, one pass per chunk (None: the whole first prompt, in passes of the policy's
    own length).
    query_rotary: the model's rotary (kvpolicy.rotary.CacheRotary) for policies that ask for
    query statistics or future positions (``Requirements.query_stats``, ``future_positions``).
    bits: 16 keeps the prompt rows in the model's dtype; 8, 4 or 2 quantizes them at each
    compaction (kvpolicy.quantized; append policies only; sliding layers stay unquantized).
    """

    def __init__(self, layer_windows: list[int | None] | int, policy: Policy, budget: Budget,
                 max_new_tokens: int = 0, bucket: int = 1, recompress: bool = True,
                 rotary=None, chunk_size: int | None = None, query_rotary=None, bits: int = 16):
        if isinstance(layer_windows, int):
            layer_windows = [None] * layer_windows
        kind = "evict" if policy.requirements().decode == "evict" else "append"
        bits = check_bits(bits, policy)
        scratch = Scratch()  # eager decode's dequantized rows, one layer at a time
        super().__init__(layers=[KVLayer(kind, policy, w, bits, scratch) for w in layer_windows])
        self.policy, self.budget, self.bucket, self.recompress = policy, budget, bucket, recompress
        self.rotary = rotary
        for layer in self.layers:
            layer.rotary = rotary
        self._new_tokens = max_new_tokens  # decode steps of the call in progress
        self._defer_steps = 0  # decode steps the call's next multi-token forward waits
        self._call_sized = False  # a call of known length runs: its buffers hold its decode steps
        self._continues = False  # the call in progress continues a finished call
        self._compileable = True
        self._history: Tensor | None = None  # ids [B, n] of the calls finished so far
        self._owner: str | None = None  # the model class this cache was filled by
        self._observer: PromptObserver | None = None
        self._deferral: Deferral | None = None
        self._plan: Plan | None = None
        self._call_ids: Tensor | None = None  # ids [B, n] of the call in progress
        self._chunk_size = chunk_size
        self._query_rotary = query_rotary
        self._unscored: Observed | None = None  # a first prompt awaiting reconstruction passes
        self._pass: PassObserver | None = None
        self._pass_span: tuple[int, int] | None = None
        self._held: list[tuple] = []
        self._pass_tally: ScoreTally | None = None
        self._pass_scores: list[Tensor | None] | None = None  # per layer, by position (chunks)

    # ---- what the cache tells ----------------------------------------------------------
    @property
    def is_compileable(self) -> bool:
        """Whether generate may compile decode steps with this cache (and so pre-build 4-D
        masks): only on a model patched by ``apply``, whose mask function serves it."""
        return self._compileable

    @property
    def compacted(self) -> bool:
        """True once a prompt has been processed (the cache holds closed buffers)."""
        first = self.layers[0]
        return first.keys is not None and not first.is_open

    @property
    def plan(self) -> Plan | None:
        """The policy's Plan of the scored layers at the last compaction."""
        return self._plan

    @property
    def kept(self) -> list[float]:
        """Prompt tokens kept per scored layer by the last plan, per KV head: a per-head
        plan's mean over its heads (of the batch row keeping most)."""
        if self._plan is None:
            raise RuntimeError("PolicyCache.kept: no prompt has been processed yet (run a forward "
                               "or generate with this cache first)")
        if self._plan.counts is None:
            return self._plan.kept
        return [float(c.sum(-1).max()) / c.shape[-1] for c in self._plan.counts]

    @property
    def pending(self) -> Deferral | None:
        """The compaction waiting for decode steps, if any."""
        return self._deferral

    @property
    def tokens(self) -> Tensor | None:
        """ids [B, n] of the generate calls (or the compress) finished so far."""
        return self._history

    @property
    def max_new_tokens(self) -> int:
        """Decode steps planned by the call in progress."""
        return self._new_tokens

    @property
    def defer_steps(self) -> int:
        """Decode steps the call's next multi-token forward waits before compacting."""
        return self._defer_steps

    # ---- a generate call -----------------------------------------------------------
    def begin_call(self, ids: Tensor | None, new_tokens: int | None, *, defer: bool,
                   compileable: bool) -> None:
        """A call of ``new_tokens`` decode steps (None: as many as the cache was sized for)
        on prompt ids int [B, n] (None: given as embeddings) starts; defer: whether the
        policy's deferred compaction runs in it. Refuses, before anything changes, ids that
        do not continue what the cache saw."""
        seen = self._history
        if seen is not None and ids is not None and ids.dim() == 2 and not ids.is_floating_point():
            n = min(seen.shape[1], ids.shape[1])
            if seen.shape[0] != ids.shape[0] or not torch.equal(seen[:, :n].to(ids.device), ids[:, :n]):
                raise ValueError("kvpolicy: input_ids do not continue the conversation this cache "
                                 "holds (pass the ids it was filled with, followed by the new ones)")
            if ids.shape[1] <= seen.shape[1]:
                raise ValueError(f"kvpolicy: this cache already holds {seen.shape[1]} tokens; "
                                 f"input_ids must continue them with at least one new token "
                                 f"(got {ids.shape[1]})")
        self._continues = seen is not None
        self._compileable = compileable
        if self.policy.requirements().reconstruct and seen is None and ids is not None:
            self._call_ids = self._reconstruction_ids(ids)
        if new_tokens is None:
            return
        self._new_tokens, self._call_sized = new_tokens, True
        self._defer_steps = min(self.policy.requirements().defer, max(0, new_tokens - 1)) if defer else 0
        if self.compacted:
            self.reserve(new_tokens + 1)

    def end_call(self, sequences: Tensor | None) -> None:
        """The call ended with ``sequences`` int [B, n] (prompt and new tokens): a deferred
        compaction still waiting runs now, and forwards from here on (a hand-written loop,
        or the next call) continue a finished call."""
        self.settle()
        self._call_sized = False
        if sequences is not None:
            self._history = sequences
            self._continues = True

    # ---- reconstruction passes (Requirements.reconstruct) -------------------------
    def _reconstruction_ids(self, ids: Tensor) -> Tensor | None:
        """The first call's prompt ids [1, n], which the reconstruction passes repeat (None
        for a prompt given as embeddings: refused once it is observed)."""
        name = self.policy.name
        if ids.dim() != 2 or ids.is_floating_point():
            return None
        if ids.shape[0] != 1:
            raise ValueError(f"kvpolicy {name}: reconstruction passes score one context at a time; "
                             f"pass a batch of one sequence (got {ids.shape[0]})")
        return ids

    @property
    def reconstruction_due(self) -> bool:
        """Whether a prompt waits for its reconstruction passes: the whole first prompt, or
        with ``chunk_size`` its last chunk."""
        return (self._unscored is not None and self._pass_tally is None
                and (self._chunk_size is not None
                     or int(self.layers[0].seen) >= self._call_ids.shape[1]))

    def reconstruction_passes(self) -> tuple[int, list[tuple[int, int, Tensor]]]:
        """(n, passes): the tokens seen, after which the passes are placed, and the
        policy's passes (start, stop, ids [1, q]) over the context positions due: the
        whole first prompt, or with ``chunk_size`` the chunk just read."""
        self._pass_tally = ScoreTally(len(self.layers))
        n = int(self.layers[0].seen)
        passes = self.policy.reconstruction(self._call_ids[:, :n], self._chunk_size)
        new_pos = self._unscored.new_pos
        first = 0 if self._chunk_size is None else int(new_pos[new_pos >= 0].min())
        return n, [p for p in passes if p[1] > first]

    def begin_pass(self, start: int, stop: int) -> None:
        """The next forward is a reconstruction pass scoring context positions [start, stop)
        (and the policy's sinks)."""
        self._pass_span = (start, stop)

    def end_reconstruction(self) -> None:
        """Plan the first prompt (with ``chunk_size``: every slot held) with the passes'
        max scores and compact it."""
        unscored, tally = self._unscored, self._pass_tally
        self._unscored = self._pass_tally = None
        self._expand()
        pos = next(layer for layer in self.layers if layer.scored).pos[:, 0]  # [1, C]
        if self._chunk_size is not None:
            self._remember_scores(tally)
        counted = self.policy.requirements().queries != "none"
        observed = Observed(tally, torch.zeros_like(pos, dtype=torch.bool), None,
                            unscored.new_pos, self.layers[0].next_pos.clone(),
                            unscored.continued, unscored.heads_per_group,
                            prompt_tally=unscored.tally if counted else None)
        self._compact(observed, True, self._new_tokens)

    def _remember_scores(self, tally: ScoreTally) -> None:
        """A chunk's passes scored its slots (and the sinks): keep each slot's score by
        position (fp32 [B, G, n] per scored layer over the first prompt's n positions),
        the max of every pass that scored it, and give every held slot (of an earlier
        chunk: none of this chunk's passes scored it) its score in ``tally``."""
        n = self._call_ids.shape[1]
        if self._pass_scores is None:
            self._pass_scores = [None] * len(self.layers)
        for l, layer in enumerate(self.layers):
            if not layer.scored or tally.layer(l) is None:
                continue
            B, G, S = layer.pos.shape
            if self._pass_scores[l] is None:
                self._pass_scores[l] = torch.zeros(B, G, n, device=layer.pos.device)
            table, pos = self._pass_scores[l], layer.pos
            b, g, s = (pos >= 0).nonzero(as_tuple=True)
            at = pos[b, g, s]
            merged = torch.zeros(B, G, S, device=pos.device)
            merged[b, g, s] = torch.maximum(table[b, g, at], tally.layer(l)[b, g, s])
            table[b, g, at] = merged[b, g, s]
            tally.set(l, Observation(merged))
        if int(self.layers[0].seen) >= n:
            self._pass_scores = None

    # ---- a forward -----------------------------------------------------------------
    def begin_forward(self, owner: str, windows: list[int | None], new_valid: Tensor,
                      vision: Tensor | None, decode: bool, positions: Tensor | None = None) -> None:
        """A forward of model class ``owner`` (layer windows ``windows``) over new tokens
        with padding mask new_valid bool [B, q] and vision mask bool [B, q] | None; decode:
        a one-token step on a compacted cache; positions int64 [B, q]: the positions a
        positions="cache" policy rotates at. Refuses a cache of another model or batch."""
        if self._owner is not None and self._owner != owner:
            raise ValueError(f"this PolicyCache was filled by a {self._owner}, not this {owner}")
        if [layer.cache_window for layer in self.layers] != windows:
            raise ValueError(f"this PolicyCache's {len(self.layers)} layers were shaped for another "
                             f"model than this {owner}")
        held = self.layers[0].next_pos
        if held is not None and held.shape[0] != new_valid.shape[0]:
            raise ValueError(f"this PolicyCache holds {held.shape[0]} sequences; a continuation "
                             f"must keep the batch size (got {new_valid.shape[0]})")
        self._owner = owner
        for layer in self.layers:
            layer.given = positions
        if decode:
            if not self._call_sized:  # a hand-written loop: one more slot (reads ``used``)
                self.reserve(1)
            return
        self.settle()  # a deferred compaction runs before the next forward opens
        if self._pass_span is not None:
            (start, stop), self._pass_span = self._pass_span, None
            self._expand()  # the rows the pass attends are the ones it gives back: no copy
            self._held = [layer.held() for layer in self.layers]
            self._pass = PassObserver(self.layers, new_valid.shape[1], start, stop,
                                      self.policy.sinks, self._pass_tally,
                                      self.policy.requirements().contribution)
            for layer in self.layers:
                layer.open(self._pass.new_pos, transient=True)
            return
        self._observer = PromptObserver(self.policy, self.budget, self.layers, new_valid, vision,
                                        self._query_rotary)
        for layer in self.layers:
            layer.open(self._observer.new_pos)

    def note_attention_input(self, layer_idx: int, hidden: Tensor) -> None:
        """A reconstruction pass's attention input at layer ``layer_idx`` (hidden [B, q, d]),
        for KVzip+'s weights (``Requirements.contribution``)."""
        if self._pass is not None:
            self._pass.note_input(layer_idx, hidden)

    def attend(self, module, query: Tensor, key: Tensor, value: Tensor, scaling: float,
               window: int | None, softcap: float | None, sinks: Tensor | None) -> Tensor:
        """One layer's attention in this forward: query [B, H, q, D], key/value as the
        layer's ``update`` returned them -> out [B, q, H, Dv]."""
        l = module.layer_idx
        layer = self.layers[l]
        layer.adopt_window(window)
        if self._pass is not None:
            return self._pass.attend(l, layer, module, query, key, value, scaling, softcap, sinks)
        if self._observer is not None:
            if layer.rotary is not None:
                query, key = layer.rotary.place(query, key, layer.pos[:, 0], self._observer.new_pos,
                                                layer.given)
            return self._observer.attend(l, layer, module, query, key, value, scaling, softcap, sinks)
        deferred = self._deferral is not None and layer.scored
        out, probs = layer.attend(query, scaling, window, softcap, sinks, observe=deferred)
        if deferred:
            self._deferral.observed.tally.add(l, Observation(probs))
        return out

    def end_forward(self) -> None:
        """After a forward: plan and compact a multi-token one (a first prompt of a
        reconstructing policy is kept whole until its passes); count a deferred step; put
        back the context a reconstruction pass attended."""
        if self._pass is not None:
            if len(self._pass.attended) != len(self.layers):
                raise RuntimeError("kvpolicy: a reconstruction pass did not reach every layer")
            self._pass = None
            for layer, held in zip(self.layers, self._held):
                layer.rewind(held)
            self._held = []
        elif self._observer is not None:
            observer, self._observer = self._observer, None
            observed = observer.finish(len(self.layers))
            fresh = not self._continues  # else a new turn of a finished call
            needs = self.policy.requirements()
            compress = fresh or self.recompress or needs.decode == "evict"
            planned = any(layer.scored for layer in self.layers)  # else only windows are kept
            if needs.reconstruct and planned:
                self._await_reconstruction(observed, fresh)
            elif compress and self._defer_steps and planned:
                self._compact(observed, compress=False, new_tokens=self._new_tokens,
                              defer=self._defer_steps)
            else:
                self._compact(observed, compress, self._new_tokens)
        elif self._deferral is not None:
            self._deferral.decoded += 1
            if self._deferral.decoded >= self._deferral.steps:
                self.settle()

    def _await_reconstruction(self, observed: Observed, fresh: bool) -> None:
        """Keep every slot of a reconstructing policy's forward: a first prompt's waits for
        its passes (``reconstruction_due``), closed where it lies when every layer is planned
        (else a keep-all compaction trims the sliding layers); a later turn is appended,
        never re-scored. Of a chunked prompt without ``chunk_size``, the last
        chunk's observation is kept (its queries see every slot)."""
        if fresh and self._call_ids is None:
            raise ValueError(f"kvpolicy {self.policy.name}: its reconstruction passes repeat the "
                             f"prompt's token ids; run it through model.generate(input_ids) or "
                             f"kvpolicy.compress (not inputs_embeds or a hand-written forward)")
        if fresh and all(layer.scored for layer in self.layers):
            for layer in self.layers:  # no copy of the context
                layer.close_as_held(observed.rows_seen.clone())
        else:
            self._compact(observed, False, self._new_tokens, quantize=not fresh)
        if fresh:
            self._unscored = observed

    def settle(self) -> None:
        """Plan and compact a deferred forward now, with its counted prompt queries and the
        decoded tokens as queries (a generate call that ended first, or the k-th step)."""
        deferral, self._deferral = self._deferral, None
        if deferral is None:
            return
        seen = deferral.observed
        pos = next(layer for layer in self.layers if layer.scored).pos[:, 0]  # [B, C]
        queries = at_slots(seen.queries, seen.new_pos, pos) | (pos >= seen.rows_seen[:, None])
        vision = None if seen.vision is None else at_slots(seen.vision, seen.new_pos, pos)
        observed = Observed(seen.tally, queries, vision, seen.new_pos,
                            self.layers[0].next_pos.clone(), True, seen.heads_per_group)
        self._compact(observed, True, max(0, self._new_tokens - deferral.decoded))

    def _expand(self) -> None:
        """Every layer's rows in the layout [B, G, C, D] (KVLayer.expand), for a plan."""
        for layer in self.layers:
            layer.expand()

    def reserve(self, new_tokens: int) -> None:
        """Make room for ``new_tokens`` decode steps in every append layer (eager)."""
        for layer in self.layers:
            if layer.keys is not None and not layer.is_open:
                layer.grow(new_tokens)

    # ---- compaction ----------------------------------------------------------------
    def _scores(self, observed: Observed) -> dict[int, Tensor]:
        """Per scored layer fp32 [B, G, S]: what the forward observed on its slots, plus the
        running scores an evicting layer carries (zero for the forward's new tokens; with
        running "last" the forward's observation replaces them)."""
        out = {}
        for l, layer in enumerate(self.layers):
            if not layer.scored:
                continue
            attn = observed.tally.layer(l)
            if attn is not None and attn.shape[-1] < layer.keys.shape[2]:
                attn = slots_wide(attn, layer)  # a deferred tally before the slots grew
            if layer.scores is not None and (attn is None or layer.running == "sum"):
                attn = layer.scores if attn is None else attn + layer.scores
            out[l] = attn
        return out

    def _compact(self, observed: Observed, compress: bool, new_tokens: int, defer: int = 0,
                 quantize: bool = True) -> None:
        """Plan every layer and compact it into new closed buffers; defer > 0 keeps every
        slot and waits for that many decode steps, carrying the scores in a Deferral.
        Quantized rows are put back in full precision first (and per-head rows unflattened),
        and quantized again at close unless a compaction follows (defer; ``quantize``
        False)."""
        self._expand()
        scores = self._scores(observed)
        plan = plan_forward(self.policy, self.budget, self.layers, observed, scores,
                            compress=compress, new_tokens=new_tokens, bucket=self.bucket)
        if plan.plan is not None:
            self._plan = plan.plan
        carried = compact_layers_into(self.layers, plan, scores, observed.rows_seen, bool(defer),
                                      quantize and not defer)
        if defer:
            self._deferral = Deferral(defer, dataclasses.replace(observed, tally=carried))

    # ---- memory and copies ---------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of all tensors the cache owns (K/V buffers, quantized rows with their
        scales and zeros, and their bookkeeping)."""
        owned = [t for layer in self.layers for t in layer.owned()]
        if self._plan is not None:
            owned += self._plan.keep
        if self._deferral is not None:
            owned += [t for t in self._deferral.observed.tally.attn if t is not None]
        return sum(t.nbytes for t in {id(t): t for t in owned}.values())

    def copy(self) -> PolicyCache:
        """An independent copy (shares no tensor), e.g. to ask several questions of one
        compressed document."""
        return copy.deepcopy(self)

    def __deepcopy__(self, memo):
        if self._observer is not None:
            raise RuntimeError("PolicyCache cannot be copied in the middle of a forward")
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        vars(new).update(copy.deepcopy(vars(self), memo))
        return new
