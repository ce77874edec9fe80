"""The interest encoder: a sliding-window causal Transformer plus a decayed long-term memory.

One event in, one interest vector out. Two ways to run the same function:

* ``InterestEncoder.forward``: a whole (left-padded) sequence at once; used for training and as
  the reference.
* ``InterestEncoder.step``: one event per user from a fixed-size ``EncoderState``; what the
  streaming worker's exported step computes. Its cost does not depend on the history length.

export/__init__.py lists every faster form of these (the exported graphs, the worker's staged
step) with the plain reference and the test that compares the two.

Why a sliding window: every event attends to itself and the previous ``span - 1`` events only,
in every layer. Then a per-layer cache of the last ``span - 1`` keys/values is all an incremental
step needs, and the step is *exactly* the full computation (no approximation), and the state can
be rebuilt exactly from the last ``receptive_field = n_layers * (span - 1) + 1`` events.

Why item categories enter inside the item embedding (``ItemEmbedding``, off unless the
training data has categories and ``n_categories`` is set): an item's vector becomes its own row
plus its category's row, everywhere the model reads an item (input, memory, output scores). So
the exported item table already holds the sum, and the worker needs no category input: it
ranks and steps with one table as before.

Why a memory: the window forgets everything older than the receptive field. The memory is a
decayed sum over *all* past events, m_t = gamma * m_{t-1} + e(item_t), O(d) per event, persisted
next to the window. It enters only at the output (h_t + W_m LN(m_t)), so the attention caches do
not depend on it and the state rebuild stays exact.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from encoder.features import DEFAULT_TIME_BUCKETS, EVENT_TYPES

NEG_INF = -1e9  # finite: a fully masked row must give zeros, not NaN, in ONNX too


@dataclass
class EncoderConfig:
    n_items: int  # real items are 1..n_items; 0 is padding
    d_model: int = 64
    n_layers: int = 2  # interest train picks 3 layers of span 67 for dense logs (auto_depth)
    n_heads: int = 1
    span: int = 100  # each event attends to itself and the previous span-1 events
    ffn_mult: int = 2
    n_event_types: int = len(EVENT_TYPES)
    n_time_buckets: int = DEFAULT_TIME_BUCKETS  # bucket 0 = unknown gap
    dropout: float = 0.2
    memory_decay: float = 0.98  # gamma of the long-term memory
    use_memory: bool = True
    max_len: int = 200  # training/evaluation sequence length (not a model limit)
    # Whether the training data had event types / timestamps. A model trained without them
    # (SASRec-format files) only ever saw the default type and the unknown gap bucket, so
    # whoever serves it must feed those too (the streaming worker reads these flags).
    uses_event_types: bool = True
    uses_time_gaps: bool = True
    # Item categories the item embedding adds (0: none; ItemEmbedding).
    n_categories: int = 0

    @property
    def receptive_field(self) -> int:
        """Events that determine the attention part of the output (and the step state)."""
        return self.n_layers * (self.span - 1) + 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["receptive_field"] = self.receptive_field  # recorded for the worker; ignored on load
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class EncoderState(NamedTuple):
    """Per-user incremental state; plain tensors so it maps 1:1 onto ONNX inputs/outputs."""

    keys: torch.Tensor  # (B, n_layers, n_heads, span-1, head_dim), oldest slot first
    values: torch.Tensor  # (B, n_layers, n_heads, span-1, head_dim)
    count: torch.Tensor  # (B,) int64: events seen so far (slots older than that are empty)
    memory: torch.Tensor  # (B, d_model): decayed sum of item embeddings over all events


class FullOutput(NamedTuple):
    out: torch.Tensor  # (B,T,d) interest vectors
    hidden: torch.Tensor  # (B,T,d) last block output, before the memory mix and final LN
    keys: list[torch.Tensor]  # per layer (B,H,T,hd)
    values: list[torch.Tensor]  # per layer (B,H,T,hd)
    memory: torch.Tensor  # (B,T,d) memory after each event


class SlidingWindowAttention(nn.Module):
    """Causal multi-head attention over the last `span` events with a learned distance bias."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        assert cfg.d_model % cfg.n_heads == 0
        self.n_heads, self.span = cfg.n_heads, cfg.span
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        # bias[h, k]: how much head h likes an event k steps back (0 = itself)
        self.rel_bias = nn.Parameter(torch.zeros(cfg.n_heads, cfg.span))
        self.resid_drop = nn.Dropout(cfg.dropout)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (..., d) -> three (..., H, hd)
        q, k, v = self.qkv(x).split(x.shape[-1], dim=-1)
        shape = (*x.shape[:-1], self.n_heads, self.head_dim)
        return q.view(shape), k.view(shape), v.view(shape)

    def forward(
        self, x: torch.Tensor, blocked: torch.Tensor, dist: torch.Tensor, queries: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B,T,d); blocked: (B,1,T,T) True where query i may not see key j; dist: (T,T)
        query minus key position, clamped to 0..span-1. Returns output (B,Q,d) for the last
        Q = ``queries`` positions (0: all T), and k, v (B,H,T,hd)."""
        B, d = x.shape[0], x.shape[2]
        q, k, v = (t.transpose(1, 2) for t in self._split(x))  # (B,H,T,hd)
        if queries:
            q, blocked, dist = q[:, :, -queries:], blocked[:, :, -queries:], dist[-queries:]
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))  # (B,H,Q,T)
        att = (att + self.rel_bias[:, dist]).masked_fill(blocked, NEG_INF).softmax(dim=-1)
        y = att @ v  # (B,H,Q,hd); no attention dropout: it costs a (B,H,T,T) mask on CPU
        y = y.transpose(1, 2).reshape(B, q.shape[2], d)
        return self.resid_drop(self.proj(y)), k, v

    def step(
        self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One event. x: (B,d); caches (B,H,S-1,hd); count (B,). Returns y (B,d), new k, new v.

        Written for a small exported graph (batch-1 latency is ORT's per-node overhead): shapes
        are constants with -1 for the batch, so no Shape/Gather/Concat chains, and the query,
        key and value are shaped (B,H,1,hd) once, so the matmuls need no squeeze/unsqueeze.
        """
        H, hd, S = self.n_heads, self.head_dim, self.span
        q, k, v = self.qkv(x).reshape(-1, 3 * H, 1, hd).split(H, dim=1)  # 3 x (B,H,1,hd)
        keys = torch.cat([k_cache, k], dim=2)  # (B,H,S,hd), newest last
        vals = torch.cat([v_cache, v], dim=2)
        slot = torch.arange(S, device=x.device)
        dist = (S - 1) - slot  # (S,): slot S-1 is the event itself
        # only events that happened: dist <= count, written as one comparison against a
        # constant so the exported mask is two nodes (Reshape, Less), shared by the layers
        allowed = (dist - 1) < count.reshape(-1, 1, 1, 1)  # (B,1,1,S)
        att = (q @ keys.transpose(-1, -2)) * (1.0 / math.sqrt(hd))  # (B,H,1,S)
        att = att + self.rel_bias[:, None, dist]  # (H,1,S) broadcast
        att = att.masked_fill(~allowed, NEG_INF).softmax(dim=-1)
        y = (att @ vals).reshape(-1, H * hd)  # (B,H,1,hd) -> (B,d)
        return self.proj(y), keys[:, :, 1:], vals[:, :, 1:]


class FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ffn_mult * cfg.d_model)
        self.out = nn.Linear(cfg.ffn_mult * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN Transformer block."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SlidingWindowAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)

    def forward(
        self, x: torch.Tensor, blocked: torch.Tensor, dist: torch.Tensor, queries: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,T,d) -> (B,Q,d): the last Q = ``queries`` positions (0: all T)."""
        a, k, v = self.attn(self.ln1(x), blocked, dist, queries)
        x = (x[:, -queries:] if queries else x) + a
        return x + self.ffn(self.ln2(x)), k, v

    def step(
        self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, k, v = self.attn.step(self.ln1(x), k_cache, v_cache, count)
        x = x + a
        return x + self.ffn(self.ln2(x)), k, v


class DecayedMemory(nn.Module):
    """m_t = gamma * m_{t-1} + e(item_t) over real events; mixed into the output via LN + linear.

    Padding positions neither decay nor add, so a left-padded sequence with memory0 gives the
    same memory as the unpadded one.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.gamma = cfg.memory_decay
        self.ln = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def scan(self, e: torch.Tensor, valid: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
        """All m_t of the recurrence. e: (B,T,d), valid: (B,T), m0: (B,d) -> (B,T,d).

        O(T*d): inside a chunk of C events, m_t = g^{n_t} (m_start + sum_s g^{-n_s} e_s) with n
        counted from the chunk start, so one cumsum per chunk; C keeps g^{-C} small (precision).
        """
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self.scan_dense(e, valid, m0)  # the chunk loop would freeze T in a graph
        vf = valid.to(e.dtype)[..., None]  # (B,T,1)
        chunk = max(1, min(64, int(math.log(1e3) / max(-math.log(self.gamma), 1e-9))))
        m, outs = m0, []
        for s in range(0, e.shape[1], chunk):
            v = vf[:, s : s + chunk]
            n = v.cumsum(dim=1)  # (B,C,1): real events since the chunk start, inclusive
            g = torch.pow(self.gamma, n)
            c = g * (m[:, None] + (v * e[:, s : s + chunk] / g).cumsum(dim=1))  # (B,C,d)
            outs.append(c)
            m = c[:, -1]
        return torch.cat(outs, dim=1)

    def scan_dense(self, e: torch.Tensor, valid: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
        """Same as scan() as one (B,T,T) weight matrix: O(T^2), but shape-generic for export."""
        T = e.shape[1]
        vf = valid.to(e.dtype)
        n = vf.cumsum(dim=1)  # (B,T): real events up to and including t
        causal = torch.ones(T, T, dtype=torch.bool, device=e.device).tril()
        expo = (n[:, :, None] - n[:, None, :]).clamp(min=0)  # (B,T,T): decays between s and t
        w = torch.pow(self.gamma, expo) * vf[:, None, :] * causal  # (B,T,T)
        return w @ e + torch.pow(self.gamma, n)[:, :, None] * m0[:, None, :]

    def step(self, m: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.gamma * m + e

    def from_prefix(self, prefix: torch.Tensor, item_weight: torch.Tensor) -> torch.Tensor:
        """Memory after a left-padded run of items (B,P) -> (B,d), as one weighted bag."""
        P = prefix.shape[1]
        back = torch.arange(P - 1, -1, -1, device=prefix.device, dtype=item_weight.dtype)
        w = torch.pow(self.gamma, back).expand(prefix.shape[0], P)  # (B,P): gamma^(steps back)
        w = w * (prefix != 0).to(item_weight.dtype)
        return F.embedding_bag(prefix, item_weight, mode="sum", per_sample_weights=w)

    def mix(self, m: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(m))


class ItemEmbedding(nn.Embedding):
    """Item vectors: the item's own row (``weight``, the table of a model without categories,
    under the same state-dict key) plus, with categories, its category's row. ``category_of``
    maps item index -> category index (0: none; padding too), filled by training."""

    def __init__(self, n_items: int, d: int, n_categories: int) -> None:
        super().__init__(n_items + 1, d, padding_idx=0)
        self.category = nn.Embedding(n_categories + 1, d, padding_idx=0) if n_categories else None
        if n_categories:
            self.register_buffer("category_of", torch.zeros(n_items + 1, dtype=torch.long))

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        x = super().forward(items)
        if self.category is None:
            return x
        return x + self.category(self.category_of[items])

    def table(self) -> torch.Tensor:
        """(n_items + 1, d): every item's vector, row 0 (padding) zero."""
        if self.category is None:
            return self.weight
        return self.weight + self.category(self.category_of)


class InterestEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_emb = ItemEmbedding(cfg.n_items, d, cfg.n_categories)  # tied with the output
        self.type_emb = nn.Embedding(cfg.n_event_types, d)
        self.gap_emb = nn.Embedding(cfg.n_time_buckets, d)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.memory = DecayedMemory(cfg) if cfg.use_memory else None
        self.ln_f = nn.LayerNorm(d)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def _embed(self, items: torch.Tensor, types: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
        # (...,) -> (..., d); the item scale keeps items dominant over the small type/gap tables
        x = self.item_emb(items) * math.sqrt(self.cfg.d_model)
        return self.emb_drop(x + self.type_emb(types) + self.gap_emb(gaps))

    def _head(self, h: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        if self.memory is not None and m is not None:
            h = h + self.memory.mix(m)
        return self.ln_f(h)

    def forward_with_cache(
        self,
        items: torch.Tensor,
        types: torch.Tensor,
        gaps: torch.Tensor,
        memory0: torch.Tensor | None = None,
    ) -> FullOutput:
        """forward() plus what the incremental state is made of (see FullOutput)."""
        B, T = items.shape
        valid = items != 0  # (B,T)
        x = self._embed(items, types, gaps)  # (B,T,d)
        blocked, dist = self._attention_masks(valid)
        ks, vs = [], []
        for block in self.blocks:
            x, k, v = block(x, blocked, dist)
            ks.append(k)
            vs.append(v)
        if memory0 is None:
            memory0 = x.new_zeros(B, self.cfg.d_model)
        if self.memory is not None:
            m = self.memory.scan(self.item_emb(items), valid, memory0)  # (B,T,d)
        else:
            m = memory0[:, None].expand(B, T, -1)
        return FullOutput(self._head(x, m), x, ks, vs, m)

    def forward(
        self,
        items: torch.Tensor,
        types: torch.Tensor,
        gaps: torch.Tensor,
        memory0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """items/types/gaps (B,T) left-padded with item 0 -> interest vectors (B,T,d).

        memory0 (B,d) is the long-term memory before the first position (zeros if None).
        """
        return self.forward_with_cache(items, types, gaps, memory0).out

    def last_vectors(
        self,
        items: torch.Tensor,
        types: torch.Tensor,
        gaps: torch.Tensor,
        memory0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``forward(...)[:, -1]``, (B,d), computing only the positions it depends on.

        Why: evaluation (and validation every epoch) needs only the vector after each user's
        last event. The last layer needs one query; each layer below it the span-1 positions
        before those too. With 2 layers of span 100 and a 200-event window that is 100 of 200
        queries in the first layer and 1 in the second; with 3 of span 67, 133, 67 and 1.
        Reference: forward(), compared in tests/encoder/test_model.py.
        """
        B = items.shape[0]
        valid = items != 0
        x = self._embed(items, types, gaps)
        blocked, dist = self._attention_masks(valid)
        L, S = len(self.blocks), self.cfg.span
        for i, block in enumerate(self.blocks):
            n_in = x.shape[1]  # positions computed so far: the last n_in of T
            queries = min(n_in, (L - 1 - i) * (S - 1) + 1)
            x = block(x, blocked[..., -n_in:], dist[:, -n_in:], queries)[0]
        if memory0 is None:
            memory0 = x.new_zeros(B, self.cfg.d_model)
        if self.memory is None:
            return self._head(x[:, -1], memory0)
        m = self.memory.scan(self.item_emb(items), valid, memory0)[:, -1]  # (B,d)
        return self._head(x[:, -1], m)

    def _attention_masks(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """valid (B,T) -> blocked (B,1,T,T), True where query i may not see key j, and the
        query-minus-key distance (T,T) clamped to 0..span-1 (the relative-bias index)."""
        T = valid.shape[1]
        pos = torch.arange(T, device=valid.device)
        dist = pos[:, None] - pos[None, :]  # (T,T): query i minus key j
        in_window = (dist >= 0) & (dist < self.cfg.span)
        # a padding query sees itself only, so its row is never empty; real queries never see
        # pads. ``dist == 0`` is the diagonal: torch.eye(dtype=bool) would export as a bool
        # EyeLike, which ONNX Runtime has no kernel for.
        own = dist == 0
        blocked = ~(in_window & (valid[:, None, :] | own))[:, None]  # (B,1,T,T)
        return blocked, dist.clamp(0, self.cfg.span - 1)

    def memory_from_prefix(self, prefix: torch.Tensor) -> torch.Tensor:
        """Memory after the items (B,P) (left-padded, oldest first) -> memory0 (B,d)."""
        if self.memory is None:
            return self.item_emb.weight.new_zeros(prefix.shape[0], self.cfg.d_model)
        return self.memory.from_prefix(prefix, self.item_emb.table())

    def init_state(self, batch: int) -> EncoderState:
        c = self.cfg
        p = next(self.parameters())
        shape = (batch, c.n_layers, c.n_heads, c.span - 1, c.d_model // c.n_heads)
        return EncoderState(
            keys=p.new_zeros(shape),
            values=p.new_zeros(shape),
            count=torch.zeros(batch, dtype=torch.long, device=p.device),
            memory=p.new_zeros(batch, c.d_model),
        )

    def step(
        self, state: EncoderState, items: torch.Tensor, types: torch.Tensor, gaps: torch.Tensor
    ) -> tuple[torch.Tensor, EncoderState]:
        """One event per user: items/types/gaps (B,) -> (vectors (B,d), new state).

        Rows with item 0 keep their state unchanged (their vector is meaningless), so a batch may
        mix users with and without an event.
        """
        active = items != 0  # (B,)
        x = self._embed(items, types, gaps)  # (B,d)
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block.step(x, state.keys[:, i], state.values[:, i], state.count)
            new_k.append(k)
            new_v.append(v)
        keys = torch.stack(new_k, dim=1)  # (B,L,H,S-1,hd)
        values = torch.stack(new_v, dim=1)
        if self.memory is not None:
            memory = self.memory.step(state.memory, self.item_emb(items))
        else:
            memory = state.memory
        out = self._head(x, memory)
        a5 = active[:, None, None, None, None]
        new_state = EncoderState(
            keys=torch.where(a5, keys, state.keys),
            values=torch.where(a5, values, state.values),
            count=state.count + active.long(),
            memory=torch.where(active[:, None], memory, state.memory),
        )
        return out, new_state

    @torch.no_grad()
    def state_from_window(
        self,
        items: torch.Tensor,
        types: torch.Tensor,
        gaps: torch.Tensor,
        memory: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EncoderState]:
        """Rebuild (vector (B,d), state) from a user's last events (B,T), left-padded.

        Exact when the window holds at least ``receptive_field`` events (or the whole history)
        and ``memory`` (B,d) is the persisted memory *after* the last event; with memory=None the
        memory is recomputed from the window alone (exact only for a whole history).
        """
        full = self.forward_with_cache(items, types, gaps)
        T = items.shape[1]
        keep = self.cfg.span - 1

        def last_slots(t: torch.Tensor) -> torch.Tensor:  # (B,H,T,hd) -> (B,H,S-1,hd)
            return t[:, :, T - keep :] if keep <= T else F.pad(t, (0, 0, keep - T, 0))

        mem = full.memory[:, -1] if memory is None else memory
        state = EncoderState(
            keys=torch.stack([last_slots(k) for k in full.keys], dim=1),
            values=torch.stack([last_slots(v) for v in full.values], dim=1),
            count=(items != 0).sum(dim=1),
            memory=mem,
        )
        return self._head(full.hidden[:, -1], mem), state

    def item_embeddings(self) -> torch.Tensor:
        """(n_items+1, d); row 0 is padding."""
        return self.item_emb.table()

    def item_scores(self, vectors: torch.Tensor) -> torch.Tensor:
        """vectors (B,d) or (B,T,d) -> scores over all items (.., n_items+1); padding gets -inf."""
        scores = vectors @ self.item_emb.table().T
        is_pad = torch.arange(scores.shape[-1], device=scores.device) == 0
        return scores.masked_fill(is_pad, float("-inf"))
