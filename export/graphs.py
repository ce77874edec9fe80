"""What full.onnx, step.onnx and the step's stages compute, as the torch modules the exporter
traces, and the conversions between the model's state and the graphs' state.

The graphs' state (names and shapes: export/bundle_format.py) is two attention caches per
layer, the long-term memory and a ring position. The caches are ring buffers: slot
``(ring + i) % (span-1)`` holds the i-th oldest cached event. full.onnx returns them oldest
first (ring 0). step.onnx returns only what the event adds, the new key and value of each
layer (B, H, 1, hd+1), the new memory and ring + 1; the caller writes the new slots at
``ring`` (``next_state``; the runtime does it in place). Why: a step that returned every cache
with the new event appended would copy its user's whole state twice more per event, in the
graph and into the worker's state cache, and those copies cost more than the arithmetic.

Why the rest of the layout (a small-batch step costs ONNX Runtime's fixed overhead per graph
input, output and node more than arithmetic):

* The mask column is 0 where a slot holds an event and NEG_INF where it is empty, and the
  step's query carries a constant 1 there, so ``query . key`` already includes the mask: no
  event counter in the state and no mask nodes.
* The values' constant 1 lets the attention output carry the projection bias, and a hidden
  unit with a constant input carries the feed-forward output bias, so both residual adds are
  the C input of a Gemm (AttentionStep, FeedForwardStep).
* The relative-position bias of a slot depends on its age, ``(slot - ring) % (span-1)``: one
  small index computation per step, shared by the layers, and one Gather per layer.

Keys and values stay separate tensors: packed into one per layer, both attention products
would read the whole cache, which costs more at large batches than the saved input at batch 1.
The torch model (encoder/model.py) keeps its plain EncoderState (oldest slot first);
``to_graph_state`` and ``from_graph_state`` convert. Which function each module here is
compared with, and by which test: export/__init__.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoder.model import (
    NEG_INF,
    EncoderConfig,
    EncoderState,
    FeedForward,
    InterestEncoder,
    SlidingWindowAttention,
)
from export.bundle_format import SLOT_AXIS


def pack_cache(
    keys: torch.Tensor, values: torch.Tensor, filled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """keys, values (B,H,S-1,hd), filled (B,S-1) bool -> graph caches (B,H,S-1,hd+1) each:
    [key | 0 if filled else NEG_INF] and [value | 1] (see AttentionStep)."""
    one = torch.ones_like(keys[..., :1])
    mask = ((~filled).to(keys.dtype) * NEG_INF)[:, None, :, None] * one  # (B,H,S-1,1)
    return torch.cat([keys, mask], dim=-1), torch.cat([values, one], dim=-1)


def to_graph_state(state: EncoderState) -> list[torch.Tensor]:
    """EncoderState -> tensors in ``state_names`` order (oldest slot first: ring 0)."""
    slots = state.keys.shape[3]
    back = torch.arange(slots, 0, -1, device=state.count.device)  # slot j is slots-j events back
    filled = back[None, :] <= state.count[:, None]  # (B, S-1)
    caches = [
        t
        for i in range(state.keys.shape[1])
        for t in pack_cache(state.keys[:, i], state.values[:, i], filled)
    ]
    ring = torch.zeros(state.memory.shape[0], dtype=torch.long, device=state.memory.device)
    return [*caches, state.memory, ring]


def next_state(state: list[torch.Tensor], step_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A state and StepGraph's outputs after the vector -> the state to continue from (a new
    one): each layer's new slot written at ``ring``, the new memory and ring.

    The plain reference for the runtime's in-place update (``EncoderRuntime.step_in_place``).
    """
    *caches, _, ring = state
    *slots, memory, next_ring = step_outputs
    users = torch.arange(ring.shape[0])
    written = []
    for cache, slot in zip(caches, slots, strict=True):
        cache = cache.clone()
        cache[users, :, ring] = slot[:, :, 0]  # (B,H,w) at each user's ring slot
        written.append(cache)
    return [*written, memory, next_ring]


def oldest_first(cache: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
    """(B,H,S-1,w) ring-ordered cache -> oldest slot first."""
    slots = cache.shape[SLOT_AXIS]
    order = (ring[:, None] + torch.arange(slots)) % slots  # (B,S-1)
    return torch.take_along_dim(cache, order[:, None, :, None], dim=SLOT_AXIS)


def from_graph_state(tensors: list[torch.Tensor]) -> EncoderState:
    """Tensors in ``state_names`` order -> EncoderState (oldest slot first).

    The graph state knows the event count only up to span-1 (the filled slots), which is all
    the step depends on; ``count`` comes back capped there.
    """
    *caches, memory, ring = tensors
    caches = [oldest_first(c, ring) for c in caches]
    keys = torch.stack([k[..., :-1] for k in caches[0::2]], dim=1)
    values = torch.stack([v[..., :-1] for v in caches[1::2]], dim=1)
    count = (caches[0][:, 0, :, -1] == 0).sum(dim=1)
    return EncoderState(keys, values, count, memory)


class FullGraph(nn.Module):
    """(items, types, gaps (B,T), memory_in (B,d), has_memory (B,)) -> (vector, *state).

    Same function as ``InterestEncoder.state_from_window``, written so the window length and a
    per-user "no persisted memory" flag stay dynamic in the graph (state_from_window branches
    on T and on memory being None in Python, which tracing would freeze). Only the memory
    after the last event is needed, so it is one weighted sum over the window instead of the
    model's per-position scan (whose Python chunk loop tracing would also freeze).
    """

    def __init__(self, model: InterestEncoder) -> None:
        super().__init__()
        self.model = model
        self.keep = model.cfg.span - 1

    def window_memory(self, items: torch.Tensor) -> torch.Tensor:
        """Memory after the left-padded window, from zero: sum_t gamma^(T-1-t) e(item_t)."""
        m = self.model
        if m.memory is None:
            return m.item_emb.weight.new_zeros(items.shape[0], m.cfg.d_model)
        T = items.shape[1]
        back = torch.arange(T - 1, -1, -1, device=items.device).to(m.item_emb.weight.dtype)
        w = torch.pow(m.memory.gamma, back)[None, :] * (items != 0).to(back.dtype)  # (B,T)
        return (w[:, :, None] * m.item_emb(items)).sum(dim=1)  # (B,d)

    def forward(
        self,
        items: torch.Tensor,
        types: torch.Tensor,
        gaps: torch.Tensor,
        memory_in: torch.Tensor,
        has_memory: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        full = self.model.forward_with_cache(items, types, gaps)  # .out/.memory unused: pruned

        def last_slots(t: torch.Tensor) -> torch.Tensor:  # (B,...,T,hd) -> (B,...,S-1,hd)
            return F.pad(t, (0, 0, self.keep, 0))[..., -self.keep :, :]

        filled = last_slots((items != 0).to(torch.float32)[..., None])[..., 0] > 0  # (B,S-1)
        mem = torch.where(has_memory[:, None], memory_in, self.window_memory(items))  # (B,d)
        vector = self.model._head(full.hidden[:, -1], mem)
        caches = [
            t
            for k, v in zip(full.keys, full.values, strict=True)
            for t in pack_cache(last_slots(k), last_slots(v), filled)
        ]
        ring = torch.zeros_like(items[:, 0])  # oldest slot first
        return (vector, *caches, mem, ring)


class AttentionStep(nn.Module):
    """``x + SlidingWindowAttention.step(ln1(x))`` on the ring-buffer caches, weights
    rearranged.

    qkv emits, per head, the query [q / sqrt(hd) | 1], the key [k | 0] and the value [v | 1].
    The values' constant 1 comes out of the attention as exactly the sum of the weights, 1,
    so the output projection's bias rides in that column, and the residual add is the Gemm's
    C input: one Gemm for ``x + proj(y)``. The new event is attended to beside the caches,
    not appended to them (that would copy them).
    """

    def __init__(self, cfg: EncoderConfig, attn: SlidingWindowAttention) -> None:
        super().__init__()
        H, d = cfg.n_heads, cfg.d_model
        hd = d // H
        self.n_heads, self.width = H, hd + 1
        scale = 1.0 / math.sqrt(hd)
        w = attn.qkv.weight.detach().reshape(3, H, hd, d).clone()  # query/key/value, head, col
        b = attn.qkv.bias.detach().reshape(3, H, hd).clone()
        w[0], b[0] = w[0] * scale, b[0] * scale
        w = F.pad(w, (0, 0, 0, 1))  # (3,H,hd+1,d): the extra column gets no input ...
        b = F.pad(b, (0, 1))
        b[0, :, hd] = b[2, :, hd] = 1.0  # ... and a constant: 1 in query and value, 0 in key
        self.qkv = nn.Linear(d, 3 * H * self.width)
        self.qkv.weight.data, self.qkv.bias.data = w.reshape(-1, d), b.reshape(-1)
        wo = F.pad(attn.proj.weight.detach().reshape(d, H, hd), (0, 1))  # (d,H,hd+1)
        wo[:, :, hd] = attn.proj.bias.detach()[:, None] / H  # every head's column holds 1
        self.register_buffer("proj_t", wo.reshape(d, -1).T.contiguous())  # (H*w, d)
        rel_bias = attn.rel_bias.detach()  # (H,S): bias of an event k steps back
        self.register_buffer("bias_by_age", rel_bias.T.contiguous())  # (S,H)
        self.register_buffer("bias_self", rel_bias[:, 0].reshape(1, H, 1, 1).clone())

    def forward(
        self,
        x: torch.Tensor,
        x_ln: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        back: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x and ln1(x) (B,d), caches (B,H,S-1,w), back (B,S-1): how many events back each
        slot is -> x + attention (B,d), and the event's key and value (B,H,1,w)."""
        H, w = self.n_heads, self.width
        q, k, v = self.qkv(x_ln).reshape(-1, 3 * H, 1, w).split(H, dim=1)  # 3 x (B,H,1,w)
        bias = F.embedding(back, self.bias_by_age).permute(0, 2, 1).unsqueeze(2)  # (B,H,1,S-1)
        cached = q @ k_cache.transpose(-1, -2) + bias  # (B,H,1,S-1); empty slots ~ -inf
        itself = (q * k).sum(dim=-1, keepdim=True) + self.bias_self  # (B,H,1,1)
        att = torch.cat([cached, itself], dim=-1).softmax(dim=-1)  # (B,H,1,S)
        y = att[..., :-1] @ v_cache + att[..., -1:] * v  # (B,H,1,w)
        return torch.addmm(x, y.reshape(-1, H * w), self.proj_t), k, v


class FeedForwardStep(nn.Module):
    """``x + FeedForward(ln2(x)) + extra_bias`` with the residual add and the output bias in
    one Gemm: one more hidden unit gets the constant input GELU_CONSTANT (GELU keeps it:
    gelu(10) == 10 in float32) and carries the bias in its output column."""

    GELU_CONSTANT = 10.0

    def __init__(self, ffn: FeedForward, extra_bias: torch.Tensor | None = None) -> None:
        super().__init__()
        fc_w, fc_b = ffn.fc.weight.detach(), ffn.fc.bias.detach()  # (h,d), (h,)
        self.fc = nn.Linear(fc_w.shape[1], fc_w.shape[0] + 1)
        self.fc.weight.data = F.pad(fc_w, (0, 0, 0, 1))
        self.fc.bias.data = F.pad(fc_b, (0, 1), value=self.GELU_CONSTANT)
        bias = ffn.out.bias.detach() + (0 if extra_bias is None else extra_bias.detach())
        out = torch.cat([ffn.out.weight.detach(), bias[:, None] / self.GELU_CONSTANT], dim=1)
        self.register_buffer("out_t", out.T.contiguous())  # (h+1, d)

    def forward(self, x: torch.Tensor, x_ln: torch.Tensor) -> torch.Tensor:
        return torch.addmm(x, F.gelu(self.fc(x_ln)), self.out_t)


class StepGraph(nn.Module):
    """(items, types, gaps (B,), *state) -> (vector, new key and value per layer (B,H,1,w),
    memory, ring + 1) for users who all have an event: ``InterestEncoder.step`` without its
    per-row "item 0 keeps the state" select (the runtime sends known items only).

    The caller writes the new slots at ``ring`` (``next_state``). Reference:
    InterestEncoder.step, compared in tests/export/test_graphs.py and test_parity.py.
    """

    def __init__(self, model: InterestEncoder) -> None:
        super().__init__()
        self.model = model
        cfg = model.cfg
        self.attention = nn.ModuleList(AttentionStep(cfg, b.attn) for b in model.blocks)
        # the memory mix's bias joins the last block's output bias (both are added to x)
        mix_bias = model.memory.out.bias if model.memory is not None else None
        last = len(model.blocks) - 1
        self.ffn = nn.ModuleList(
            FeedForwardStep(b.ffn, mix_bias if i == last else None)
            for i, b in enumerate(model.blocks)
        )
        if model.memory is not None:
            self.register_buffer("mix_t", model.memory.out.weight.detach().T.contiguous())

    def forward(
        self, items: torch.Tensor, types: torch.Tensor, gaps: torch.Tensor, *state: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        m = self.model
        *caches, memory, ring = state
        slots = m.cfg.span - 1
        # events back of each slot: the oldest (at ring) is span-1 back, the newest 1
        back = slots - (torch.arange(slots, device=ring.device) - ring[:, None]) % slots
        x = m._embed(items, types, gaps)  # (B,d)
        new_slots: list[torch.Tensor] = []
        layers = zip(m.blocks, self.attention, self.ffn, strict=True)
        for i, (block, attention, ffn) in enumerate(layers):
            x, k, v = attention(x, block.ln1(x), caches[2 * i], caches[2 * i + 1], back)
            x = ffn(x, block.ln2(x))
            new_slots += [k, v]
        if m.memory is not None:
            memory = m.memory.step(memory, m.item_emb(items))
            x = torch.addmm(x, m.memory.ln(memory), self.mix_t)  # + W_m LN(m); bias folded above
        return (m.ln_f(x), *new_slots, memory, (ring + 1) % slots)


class StepStage(nn.Module):
    """One stage of ``StepGraph`` cut at its attention reads, so that the caches can be read
    where they lie (export/slab_attention.py) instead of gathered into a batch for the graph.

    Why: in the worker the caches of a batch's users lie scattered over a slab of cached
    users; gathering them for step.onnx would move every byte twice more than the attention
    itself reads. The stages hold everything but the attention's reads of the caches:

    * stage 0 of L: (items, types, gaps (B,)) -> x (B,d) and layer 0's query, key and value
      (B,H,w), as AttentionStep makes them;
    * stage i, 0 < i < L: (x, y) with y (B,H,w) layer i-1's attention output (over the cached
      events and the event itself) -> layer i-1 finished, and layer i's x, query, key, value;
    * stage L: (x, y, memory (B,d), items) -> the vector (B,d) and the new memory.

    Reference: StepGraph (step.onnx); tests/export/test_parity.py compares the stages plus
    the kernel against it.
    """

    def __init__(self, step: StepGraph, index: int) -> None:
        super().__init__()
        self.step, self.index = step, index
        self.n_layers = len(step.attention)

    def _finish_layer(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        i = self.index - 1
        attention, block = self.step.attention[i], self.step.model.blocks[i]
        x = torch.addmm(x, y.reshape(y.shape[0], -1), attention.proj_t)
        return self.step.ffn[i](x, block.ln2(x))

    def _query_key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        attention, block = self.step.attention[self.index], self.step.model.blocks[self.index]
        H, w = attention.n_heads, attention.width
        q, k, v = attention.qkv(block.ln1(x)).reshape(-1, 3 * H, w).split(H, dim=1)
        return x, q, k, v  # (B,d), 3 x (B,H,w)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.step.model
        if self.index == 0:
            items, types, gaps = inputs
            return self._query_key_value(m._embed(items, types, gaps))
        if self.index < self.n_layers:
            x, y = inputs
            return self._query_key_value(self._finish_layer(x, y))
        x, y, memory, items = inputs
        x = self._finish_layer(x, y)
        if m.memory is not None:
            memory = m.memory.step(memory, m.item_emb(items))
            x = torch.addmm(x, m.memory.ln(memory), self.step.mix_t)
        return m.ln_f(x), memory


def attention_biases(step: StepGraph) -> np.ndarray:
    """(L, span, H) float32: per layer, the bias of an event k steps back (k = 0: itself),
    what the in-place attention adds to each score (export/slab_attention.py)."""
    return np.stack([a.bias_by_age.numpy() for a in step.attention]).astype(np.float32)
