"""Worker-side state: per-request score accumulation at prefill, the policy's plan, the
compaction into the request's own blocks, and the per-layer view of a compacted request.

Layout of a request of N prompt tokens after compaction, per layer l (block size bs):
slots [0, A) are unused by every layer and freed by the scheduler, A = floor((N - max_l n_l)
/ bs) * bs; slots [A, A + n_l) hold the layer's kept prompt rows (per KV head its own rows,
in position order); the token at position p >= N sits at slot A + n_l + (p - N). Keys are
cached rotated at their true positions, so only slots move.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvpolicy_kernels import accumulate_scores, accumulate_scores_sparsity

from ..policy import Stats
from .config import Settings

log = logging.getLogger("vllm.kvpolicy")


@dataclass
class RequestState:
    """One request on the worker. Before compaction: ``keys``/``values`` per layer the
    chunks [t, G, D] seen so far, ``attn`` per layer float32 [1, G, N], ``below`` per layer
    float32 [1, G] (tau > 0). After: ``base`` (A) and ``kept`` (n_l per layer)."""

    num_prompt: int
    max_new_tokens: int
    keys: list[list[Tensor]] = field(default_factory=list)
    values: list[list[Tensor]] = field(default_factory=list)
    attn: list[Tensor | None] = field(default_factory=list)
    below: list[Tensor | None] = field(default_factory=list)
    base: int | None = None
    kept: list[int] | None = None

    @property
    def compacted(self) -> bool:
        return self.base is not None


@dataclass
class Row:
    """A request's row in this step: its tokens [t0, t0 + q) of the packed batch sit at
    positions [start, start + q)."""

    index: int
    state: RequestState
    req_id: str
    t0: int
    q: int
    start: int


class Worker:
    """The kvpolicy state of one worker process: requests by id, the current step, and the
    compaction bases not yet reported to the scheduler."""

    def __init__(self, config: Settings, num_layers: int, block_size: int):
        self.policy, self.budget = config.policy, config.budget
        self.num_layers, self.block_size = num_layers, block_size
        self.requests: dict[str, RequestState] = {}
        self.unreported: dict[str, int] = {}
        self.batch: list[tuple[str, int, int]] | None = None  # (req_id, prompt, max_new)
        self.step: Step | None = None

    def publish_batch(self, rows: list[tuple[str, int, int]], live: set[str]) -> None:
        """The runner's rows for the next step; forget requests the runner dropped."""
        self.batch = rows
        for req_id in [r for r in self.requests if r not in live]:
            del self.requests[req_id]

    def begin_step(self, metadata, builder) -> None:
        """Bind this step's CPU attention metadata to the published rows (a dummy or
        profiling run without published rows passes through)."""
        batch, self.batch = self.batch, None
        if batch is None:
            self.step = None
            return
        qsl = metadata.query_start_loc.tolist()
        seq = metadata.seq_lens.tolist()
        rows = []
        for i, (req_id, prompt, max_new) in enumerate(batch):
            q = qsl[i + 1] - qsl[i]
            start = seq[i] - q
            state = self.requests.get(req_id)
            if start == 0 or state is None:
                if state is not None:
                    log.info("kvpolicy: request %s restarts from its first token (preempted): "
                             "its prompt is planned again, its new tokens recomputed over the "
                             "compacted cache", req_id)
                state = self.requests[req_id] = RequestState(prompt, max_new)
            rows.append(Row(i, state, req_id, qsl[i], q, start))
        self.step = Step(self, metadata, builder, rows)

    def take_reports(self) -> dict[str, int]:
        """Compaction bases (in tokens) computed since the last call, by request id."""
        out, self.unreported = self.unreported, {}
        return out


class Step:
    """One forward step: per-layer metadata and slot mappings for the compacted rows, score
    accumulation for the prefilling rows, planning and compaction after the last layer."""

    def __init__(self, worker: Worker, metadata, builder, rows: list[Row]):
        self.worker, self.metadata, self.builder, self.rows = worker, metadata, builder, rows
        self.compacted = [r for r in rows if r.state.compacted]
        self.prefilling = [r for r in rows if not r.state.compacted]
        self.layers: dict[int, tuple[object, Tensor]] = {}
        self._views: dict[tuple[int, ...], tuple[object, Tensor]] = {}
        self._shifted: Tensor | None = None

    # ---- decode: the per-layer view of compacted requests ----------------------------
    def view(self, layer_idx: int, slot_mapping: Tensor | None = None):
        """(metadata, slot_mapping) of layer ``layer_idx``: compacted rows see their kept +
        generated slots; the others are unchanged."""
        if not self.compacted:
            return self.metadata, slot_mapping if slot_mapping is not None else self.metadata.slot_mapping
        key = tuple(r.state.kept[layer_idx] for r in self.compacted)
        if key not in self._views:
            self._views[key] = self._build_view(key)
        return self._views[key]

    def _build_view(self, kept: tuple[int, ...]):
        md, bs = self.metadata, self.worker.block_size
        if self._shifted is None:
            self._shifted = md.block_table.clone()
            for r in self.compacted:
                skip = r.state.base // bs
                width = md.block_table.shape[1] - skip
                self._shifted[r.index, :width] = md.block_table[r.index, skip:]
        seq_lens = md.seq_lens.clone()
        slots = md.slot_mapping.clone()
        for r, n in zip(self.compacted, kept):
            s = r.state
            seq_lens[r.index] = n + r.start + r.q - s.num_prompt
            logical = s.base + n + torch.arange(r.start, r.start + r.q) - s.num_prompt
            blocks = md.block_table[r.index, logical // bs].long()
            slots[r.t0:r.t0 + r.q] = blocks * bs + logical % bs
        view = self.builder.rebuild(md, seq_lens, self._shifted, slots)
        return view, slots

    # ---- prefill: scores, plan, compaction -------------------------------------------
    def observe(self, impl, layer, layer_idx: int, kv_cache: Tensor, query: Tensor,
                key: Tensor, value: Tensor) -> None:
        """Accumulate the prefilling rows' scores (query [T, H, D], key/value [T, G, D]);
        after the last layer, plan and compact the rows whose prompt is complete."""
        self.layers[layer_idx] = (layer, kv_cache)
        for r in self.prefilling:
            self._accumulate(r, layer_idx, impl.scale, query, key, value)
        if layer_idx == self.worker.num_layers - 1:
            for r in self.prefilling:
                if r.start + r.q >= r.state.num_prompt:
                    self._compact(impl, r, query.shape[1] // key.shape[1])

    def _accumulate(self, r: Row, l: int, scale: float, query: Tensor, key: Tensor,
                    value: Tensor) -> None:
        s, policy = r.state, self.worker.policy
        if len(s.keys) == l:
            s.keys.append([]), s.values.append([]), s.attn.append(None), s.below.append(None)
        s.keys[l].append(key[r.t0:r.t0 + r.q].clone())
        s.values[l].append(value[r.t0:r.t0 + r.q].clone())
        N = s.num_prompt
        counted = min(r.start + r.q, N) - r.start  # this chunk's prompt queries
        if counted <= 0:
            return
        valid = torch.ones(1, N, dtype=torch.bool)
        qmask = policy.query_mask(valid, None)[:, r.start:r.start + counted]
        if s.attn[l] is None:
            G = key.shape[1]
            s.attn[l] = torch.zeros(1, G, N)
            s.below[l] = torch.zeros(1, G) if policy.tau > 0 else None
        rows = qmask[0].nonzero()
        if len(rows) == 0:
            return
        first, end = int(rows[0]), r.start + counted  # queries from the first counted one
        qmask = qmask[:, first:]
        k = torch.cat(s.keys[l])[:end].transpose(0, 1)[None]  # [1, G, end, D]
        q = query[r.t0 + first:r.t0 + counted].transpose(0, 1)[None]  # [1, H, counted - first, D]
        if policy.tau > 0:
            attn, below = accumulate_scores_sparsity(q, k, scaling=scale, tau=policy.tau,
                                                     query_mask=qmask)
            s.below[l] += below
        else:
            attn = accumulate_scores(q, k, scaling=scale, query_mask=qmask)
        s.attn[l][..., :end] += attn

    def _compact(self, impl, r: Row, heads_per_group: int) -> None:
        s, w = r.state, self.worker
        N, bs = s.num_prompt, w.block_size
        below = None if s.below[0] is None else torch.stack(s.below)
        stats = Stats(torch.stack(s.attn), w.policy.query_mask(torch.ones(1, N, dtype=torch.bool), None),
                      torch.ones(1, N, dtype=torch.bool), heads_per_group, None, below,
                      s.max_new_tokens)
        plan = w.policy.plan(stats, w.budget)
        kept = plan.kept
        base = (N - max(kept)) // bs * bs
        table = self.metadata.block_table[r.index].long()
        for l, keep in enumerate(plan.keep):
            layer, kv_cache = self.layers[l]
            keys, values = torch.cat(s.keys[l]), torch.cat(s.values[l])
            rows = keep[0].T  # [n_l, G]
            k = torch.cat([keys.gather(0, rows[..., None].expand(-1, -1, keys.shape[-1])), keys[N:]])
            v = torch.cat([values.gather(0, rows[..., None].expand(-1, -1, values.shape[-1])), values[N:]])
            logical = base + torch.arange(k.shape[0])
            impl.write(layer, k, v, kv_cache, table[logical // bs] * bs + logical % bs)
        s.keys = s.values = s.attn = s.below = []
        s.base, s.kept = base, kept
        w.unreported[r.req_id] = base
