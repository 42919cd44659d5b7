"""Worker-side state: per-request score accumulation (through kvpolicy.pipeline), the
policy's plan, the compaction into the request's own blocks, and the per-layer view of a
compacted request.

A request of N prompt tokens whose policy defers k decode steps is planned at P = N + k
positions (k = 0: at the prompt's end): until then it keeps every token and each forward
adds its counted queries' attention to the request's ScoreTally. Layout after the plan,
per layer l (block size bs): slots [0, A) are unused by every layer and freed by the
scheduler, A = floor((P - max_l n_l) / bs) * bs; slots [A, A + n_l) hold the layer's kept
rows (per KV head its own rows, in position order); the token at position p >= P sits at
slot A + n_l + (p - P). Keys are cached rotated at their true positions, so only slots move.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..pipeline import ScoreTally, observe, plan_row
from .config import Settings

log = logging.getLogger("vllm.kvpolicy")


@dataclass
class RequestState:
    """One request on the worker. Before its plan: ``keys``/``values`` per layer the chunks
    [t, G, D] computed so far and ``tally`` their scores. After: ``base`` (A), ``kept``
    (n_l per layer) and ``planned`` (P)."""

    settings: Settings
    num_prompt: int
    max_new_tokens: int
    num_layers: int
    keys: list[list[Tensor]] = field(default_factory=list)
    values: list[list[Tensor]] = field(default_factory=list)
    tally: ScoreTally | None = None
    base: int | None = None
    kept: list[int] | None = None

    def __post_init__(self):
        self.keys = [[] for _ in range(self.num_layers)]
        self.values = [[] for _ in range(self.num_layers)]
        self.tally = ScoreTally(self.num_layers)

    @property
    def defer(self) -> int:
        return self.settings.policy.requirements().defer

    @property
    def planned(self) -> int:
        """P: the positions the plan covers (the prompt and the deferred decode steps)."""
        return self.num_prompt + self.defer

    @property
    def compacted(self) -> bool:
        return self.base is not None

    def counted(self, start: int, end: int) -> Tensor:
        """bool [1, end - start]: the policy's counted queries among positions [start, end):
        its prompt queries, and every decoded position."""
        policy = self.settings.policy
        prompt = policy.query_mask(torch.ones(1, self.num_prompt, dtype=torch.bool), None)
        decoded = torch.ones(1, max(0, end - self.num_prompt), dtype=torch.bool)
        return torch.cat([prompt, decoded], 1)[:, start:end]


@dataclass
class Row:
    """A request's row in this forward: its tokens [t0, t0 + q) of the packed batch sit at
    positions [start, start + q)."""

    index: int
    state: RequestState
    req_id: str
    t0: int
    q: int
    start: int


class Worker:
    """The kvpolicy state of one worker's attention metadata builder: the engine's settings
    (None: policy "none"), requests by id, the rows of the next forward, the plans not yet
    reported to the scheduler."""

    def __init__(self, engine_settings: Settings | None, num_layers: int, block_size: int):
        self.engine_settings = engine_settings
        self.num_layers, self.block_size = num_layers, block_size
        self.requests: dict[str, RequestState] = {}
        self.settings_of: dict[str, Settings | None] = {}  # per request id, resolved once
        self.unreported: dict[str, tuple[int, list[int]]] = {}
        self.batch: list[tuple[str, int, int, Settings | None]] | None = None

    def publish_batch(self, rows: list[tuple[str, int, int, Settings | None]], live: set[str]) -> None:
        """The runner's rows (request id, prompt length, max new tokens, settings) for the
        next forward; forget requests the runner dropped."""
        self.batch = rows
        for req_id in [r for r in self.requests if r not in live]:
            del self.requests[req_id]
        for req_id in [r for r in self.settings_of if r not in live]:
            del self.settings_of[req_id]

    def begin(self, metadata, builder) -> ForwardPass | None:
        """The forward pass over this CPU attention metadata and the published rows (None
        for a dummy or profiling run, which publishes none, or a batch without kvpolicy)."""
        batch, self.batch = self.batch, None
        if batch is None:
            return None
        qsl = metadata.query_start_loc.tolist()
        seq = metadata.seq_lens.tolist()
        rows = []
        for i, (req_id, prompt, max_new, config) in enumerate(batch):
            q = qsl[i + 1] - qsl[i]
            start = seq[i] - q
            state = self.requests.get(req_id)
            if start == 0:
                if state is not None:
                    log.info("kvpolicy: request %s restarts from its first token (preempted): "
                             "it is planned again, its new tokens recomputed over the "
                             "compacted cache", req_id)
                self.requests.pop(req_id, None)
                state = None if config is None else RequestState(config, prompt, max_new, self.num_layers)
                if state is not None:
                    self.requests[req_id] = state
            elif state is None and config is not None:
                raise RuntimeError(f"kvpolicy: request {req_id} reaches the attention at position "
                                   f"{start} without its earlier tokens observed, so it cannot be "
                                   f"planned")
            if state is not None:
                rows.append(Row(i, state, req_id, qsl[i], q, start))
        return ForwardPass(self, metadata, builder, rows) if rows else None

    def take_reports(self) -> dict[str, tuple[int, list[int]]]:
        """(base in tokens, kept per layer) of the requests planned since the last call."""
        out, self.unreported = self.unreported, {}
        return out


class ForwardPass:
    """One forward of the model: per-layer metadata and slot mappings for the compacted
    rows, score observation for the others, planning and compaction after the last layer."""

    def __init__(self, worker: Worker, metadata, builder, rows: list[Row]):
        self.worker, self.metadata, self.builder = worker, metadata, builder
        self.compacted = [r for r in rows if r.state.compacted]
        self.observing = [r for r in rows if not r.state.compacted]
        self.layers: dict[int, tuple[object, Tensor]] = {}
        self._views: dict[tuple[int, ...], tuple[object, Tensor]] = {}
        self._shifted: Tensor | None = None

    # ---- after the plan: the per-layer view of compacted requests --------------------
    def view(self, layer_idx: int, slot_mapping: Tensor | None = None):
        """(metadata, slot_mapping) of layer ``layer_idx``: compacted rows see their kept +
        later slots; the others are unchanged."""
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
            seq_lens[r.index] = n + r.start + r.q - s.planned
            logical = s.base + n + torch.arange(r.start, r.start + r.q) - s.planned
            blocks = md.block_table[r.index, logical // bs].long()
            slots[r.t0:r.t0 + r.q] = blocks * bs + logical % bs
        view = self.builder.rebuild(md, seq_lens, self._shifted, slots)
        return view, slots

    # ---- before the plan: scores, plan, compaction -------------------------------------
    def observe(self, impl, layer, layer_idx: int, kv_cache: Tensor, query: Tensor,
                key: Tensor, value: Tensor) -> None:
        """Observe the uncompacted rows' counted queries (query [T, H, D], key/value
        [T, G, D]); after the last layer, plan and compact the rows that reached P."""
        self.layers[layer_idx] = (layer, kv_cache)
        for r in self.observing:
            self._observe(r, layer_idx, impl.scale, query, key, value)
        if layer_idx == self.worker.num_layers - 1:
            for r in self.observing:
                if r.start + r.q >= r.state.planned:
                    self._compact(impl, r, query.shape[1] // key.shape[1])

    def _observe(self, r: Row, l: int, scale: float, query: Tensor, key: Tensor,
                 value: Tensor) -> None:
        s = r.state
        s.keys[l].append(key[r.t0:r.t0 + r.q].clone())
        s.values[l].append(value[r.t0:r.t0 + r.q].clone())
        if len(s.keys[l]) > 1:  # one tensor per layer, extended by each forward
            s.keys[l], s.values[l] = [torch.cat(s.keys[l])], [torch.cat(s.values[l])]
        end = r.start + r.q
        counted = s.counted(r.start, end)
        rows = counted[0].nonzero()
        if len(rows) == 0:
            return
        first = int(rows[0])  # queries from the first counted one
        k = s.keys[l][0][:end].transpose(0, 1)[None]  # [1, G, end, D]
        q = query[r.t0 + first:r.t0 + r.q].transpose(0, 1)[None]  # [1, H, q - first, D]
        s.tally.add(l, observe(s.settings.policy, q, k, scaling=scale, query_mask=counted[:, first:]))

    def _compact(self, impl, r: Row, heads_per_group: int) -> None:
        s, w = r.state, self.worker
        P, bs, policy = s.planned, w.block_size, s.settings.policy
        below = None if s.tally.below[0] is None else torch.stack(s.tally.below)
        plan = plan_row(policy, s.settings.budget, torch.stack(s.tally.attn), queries=s.counted(0, P),
                        valid=torch.ones(1, P, dtype=torch.bool), heads_per_group=heads_per_group,
                        below=below, new_tokens=max(0, s.max_new_tokens - s.defer),
                        seen=P if s.defer else None)
        kept = plan.kept
        base = (P - max(kept)) // bs * bs
        table = self.metadata.block_table[r.index].long()
        for l, keep in enumerate(plan.keep):
            layer, kv_cache = self.layers[l]
            keys, values = s.keys[l][0], s.values[l][0]
            rows = keep[0].T  # [n_l, G]
            k = torch.cat([keys.gather(0, rows[..., None].expand(-1, -1, keys.shape[-1])), keys[P:]])
            v = torch.cat([values.gather(0, rows[..., None].expand(-1, -1, values.shape[-1])), values[P:]])
            logical = base + torch.arange(k.shape[0])
            impl.write(layer, k, v, kv_cache, table[logical // bs] * bs + logical % bs)
        s.keys = s.values = []
        s.tally = None
        s.base, s.kept = base, kept
        w.unreported[r.req_id] = (base, kept)
