"""The exported graphs' state layout and their torch wrappers vs the model (no ONNX here)."""

from __future__ import annotations

import torch

from encoder.model import InterestEncoder
from export.graphs import FullGraph, StepGraph, from_graph_state, next_state, to_graph_state

TOL = 1e-5


def _events(model: InterestEncoder, batch: int, length: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    return (
        torch.randint(1, cfg.n_items + 1, (batch, length), generator=g),
        torch.randint(0, cfg.n_event_types, (batch, length), generator=g),
        torch.randint(0, cfg.n_time_buckets, (batch, length), generator=g),
    )


def test_graph_state_round_trip(model: InterestEncoder) -> None:
    """Caches and memory survive the conversion; the count comes back capped at span-1."""
    slots = model.cfg.span - 1
    for length in (2, slots, 3 * slots):
        with torch.no_grad():
            _, state = model.state_from_window(*_events(model, 2, length, seed=length))
        back = from_graph_state(to_graph_state(state))
        assert torch.equal(back.keys, state.keys)
        assert torch.equal(back.values, state.values)
        assert torch.equal(back.memory, state.memory)
        assert back.count.tolist() == [min(length, slots)] * 2


def test_step_wrapper_matches_model_step(model: InterestEncoder) -> None:
    """StepGraph's rearranged weights (per head) and its ring-buffer caches compute
    InterestEncoder.step, from a state with empty slots and from a full one, over more steps
    than the ring has slots (so it wraps around)."""
    step = StepGraph(model).eval()
    slots = model.cfg.span - 1
    for length in (2, 3 * model.cfg.span):
        n_steps = slots + 3
        items, types, gaps = _events(model, 3, length + n_steps, seed=length)
        with torch.no_grad():
            window = (items[:, :length], types[:, :length], gaps[:, :length])
            _, ref_state = model.state_from_window(*window)
            graph_state = to_graph_state(ref_state)
            for t in range(length, length + n_steps):
                event = (items[:, t], types[:, t], gaps[:, t])
                ref_vec, ref_state = model.step(ref_state, *event)
                vec, *outputs = step(*event, *graph_state)
                graph_state = next_state(graph_state, outputs)
                assert (vec - ref_vec).abs().max() <= TOL
                got = from_graph_state(graph_state)
                assert (got.keys - ref_state.keys).abs().max() <= TOL
                assert (got.values - ref_state.values).abs().max() <= TOL
                assert (got.memory - ref_state.memory).abs().max() <= TOL
                assert got.count.tolist() == ref_state.count.clamp(max=slots).tolist()
        assert graph_state[-1].tolist() == [(n_steps) % slots] * 3  # the ring went round


def test_full_wrapper_marks_padding_as_empty(model: InterestEncoder) -> None:
    """A left-padded window gives a state that steps exactly like the unpadded one's: the
    padded positions' slots are marked empty, whatever their keys hold."""
    items, types, gaps = _events(model, 1, 4, seed=1)
    window, nxt = (items[:, :3], types[:, :3], gaps[:, :3]), (items[:, 3], types[:, 3], gaps[:, 3])
    memory, has_memory = torch.zeros(1, model.cfg.d_model), torch.tensor([False])
    pad = torch.zeros(1, 4, dtype=torch.long)
    full, step = FullGraph(model).eval(), StepGraph(model).eval()
    with torch.no_grad():
        vec, *state = full(*window, memory, has_memory)
        vec_p, *state_p = full(*(torch.cat([pad, t], dim=1) for t in window), memory, has_memory)
        after = step(*nxt, *state)[0]
        after_p = step(*nxt, *state_p)[0]
        ref = model(items, types, gaps)[:, -1]
    assert (vec - vec_p).abs().max() <= TOL
    assert from_graph_state(state_p).count.tolist() == [3]
    assert (after - ref).abs().max() <= TOL
    assert (after_p - ref).abs().max() <= TOL
