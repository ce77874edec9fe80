"""The incremental step is the full computation: same vectors, same rebuilt state."""

from __future__ import annotations

import pytest
import torch

from encoder.model import EncoderConfig, InterestEncoder

TOL = 1e-4


def _model(use_memory: bool = True, span: int = 5, n_layers: int = 2) -> InterestEncoder:
    torch.manual_seed(0)
    cfg = EncoderConfig(
        n_items=50,
        d_model=16,
        n_layers=n_layers,
        n_heads=2,
        span=span,
        n_time_buckets=8,
        dropout=0.0,
        memory_decay=0.9,
        use_memory=use_memory,
    )
    model = InterestEncoder(cfg).eval()
    with torch.no_grad():  # non-trivial distance bias and non-zero type/gap tables
        for block in model.blocks:
            block.attn.rel_bias.normal_(0, 1.0)
    return model


def _history(batch: int, length: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 51, (batch, length), generator=g)
    types = torch.randint(0, 4, (batch, length), generator=g)
    gaps = torch.randint(0, 8, (batch, length), generator=g)
    return items, types, gaps


def _left_pad(t: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Keep the last lengths[b] events of row b, right-aligned, zeros before."""
    out = torch.zeros_like(t)
    for b, n in enumerate(lengths):
        if n:
            out[b, -n:] = t[b, -n:]
    return out


@pytest.mark.parametrize("use_memory", [True, False])
def test_step_equals_full_forward_beyond_receptive_field(use_memory: bool) -> None:
    model = _model(use_memory)
    T = 30  # receptive field is 2 * 4 + 1 = 9
    assert model.cfg.receptive_field == 9
    items, types, gaps = _history(3, T)
    lengths = [30, 17, 4]  # one long, one medium, one shorter than a window: left padding
    items = _left_pad(items, lengths)
    with torch.no_grad():
        full = model(items, types, gaps)  # (B,T,d)
        state = model.init_state(3)
        for t in range(T):
            vec, state = model.step(state, items[:, t], types[:, t], gaps[:, t])
            for b, n in enumerate(lengths):
                if t >= T - n:  # a real event of user b
                    diff = (vec[b] - full[b, t]).abs().max().item()
                    assert diff <= TOL, (b, t, diff)
    assert state.count.tolist() == lengths


@pytest.mark.parametrize(("use_memory", "T"), [(True, 20), (False, 20), (True, 3)])
def test_last_vectors_equal_forward_at_the_last_position(use_memory: bool, T: int) -> None:
    """The evaluation fast path (only the positions the last one depends on) ==
    forward()[:, -1], for windows longer and shorter than the receptive field (13)."""
    model = _model(use_memory, n_layers=4)
    items, types, gaps = _history(3, T)
    items = _left_pad(items, [T, min(6, T), 1])
    memory0 = torch.randn(3, model.cfg.d_model)
    with torch.no_grad():
        for m0 in (None, memory0):
            ref = model(items, types, gaps, m0)[:, -1]
            got = model.last_vectors(items, types, gaps, m0)
            assert got.shape == ref.shape
            assert (got - ref).abs().max().item() <= TOL


def test_padding_does_not_change_real_positions() -> None:
    model = _model()
    items, types, gaps = _history(1, 12)
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), items], dim=1)
    junk_types = torch.cat([torch.full((1, 7), 3), types], dim=1)
    junk_gaps = torch.cat([torch.full((1, 7), 5), gaps], dim=1)
    with torch.no_grad():
        a = model(items, types, gaps)
        b = model(padded, junk_types, junk_gaps)
    assert (a - b[:, 7:]).abs().max().item() <= TOL


def test_memory0_continues_the_history() -> None:
    """forward over a suffix with memory0 = memory after the prefix == forward over everything
    (at positions whose window lies inside the suffix)."""
    model = _model()
    items, types, gaps = _history(2, 40)
    with torch.no_grad():
        full = model.forward_with_cache(items, types, gaps)
        m_prefix = full.memory[:, 19]
        tail = model(items[:, 20:], types[:, 20:], gaps[:, 20:], memory0=m_prefix)
    rf = model.cfg.receptive_field
    assert (tail[:, rf:] - full.out[:, 20 + rf :]).abs().max().item() <= TOL


@pytest.mark.parametrize("use_memory", [True, False])
def test_rebuild_from_receptive_field_and_persisted_memory(use_memory: bool) -> None:
    model = _model(use_memory)
    rf = model.cfg.receptive_field
    items, types, gaps = _history(2, 60)
    with torch.no_grad():
        state = model.init_state(2)
        for t in range(60):
            vec, state = model.step(state, items[:, t], types[:, t], gaps[:, t])
        # the worker keeps only the last rf events plus the memory
        w = slice(60 - rf, 60)
        vec2, state2 = model.state_from_window(
            items[:, w], types[:, w], gaps[:, w], memory=state.memory
        )
        assert (vec - vec2).abs().max().item() <= TOL
        # and the rebuilt state keeps stepping exactly like the original one
        more_items, more_types, more_gaps = _history(2, 15, seed=7)
        for t in range(15):
            args = (more_items[:, t], more_types[:, t], more_gaps[:, t])
            vec, state = model.step(state, *args)
            vec2, state2 = model.step(state2, *args)
            assert (vec - vec2).abs().max().item() <= TOL


def test_rebuild_from_short_history_without_memory() -> None:
    model = _model()
    items, types, gaps = _history(2, 3)  # shorter than span - 1: cache gets left-padded
    with torch.no_grad():
        state = model.init_state(2)
        for t in range(3):
            vec, state = model.step(state, items[:, t], types[:, t], gaps[:, t])
        vec2, state2 = model.state_from_window(items, types, gaps)
        assert (vec - vec2).abs().max().item() <= TOL
        nxt = (torch.tensor([5, 6]), torch.tensor([1, 2]), torch.tensor([3, 0]))
        a, _ = model.step(state, *nxt)
        b, _ = model.step(state2, *nxt)
        assert (a - b).abs().max().item() <= TOL


def test_item_zero_leaves_state_unchanged() -> None:
    model = _model()
    items, types, gaps = _history(2, 6)
    with torch.no_grad():
        state = model.init_state(2)
        for t in range(6):
            _, state = model.step(state, items[:, t], types[:, t], gaps[:, t])
        zeros = torch.tensor([0, 0])
        _, after = model.step(state, torch.tensor([0, 9]), zeros, zeros)
    for old, new in zip(state, after, strict=True):
        assert torch.equal(old[0], new[0])
    assert after.count.tolist() == [6, 7]


def test_scores_shapes_and_padding() -> None:
    model = _model()
    items, types, gaps = _history(2, 5)
    with torch.no_grad():
        vec = model(items, types, gaps)[:, -1]
        scores = model.item_scores(vec)
    assert scores.shape == (2, 51)
    assert torch.isinf(scores[:, 0]).all()
    assert model.item_embeddings().shape == (51, 16)


def test_config_round_trip() -> None:
    cfg = EncoderConfig(n_items=10, span=7, n_layers=3)
    d = cfg.to_dict()
    assert d["receptive_field"] == 3 * 6 + 1
    assert EncoderConfig.from_dict(d) == cfg


def test_chunked_memory_scan_equals_dense_closed_form() -> None:
    model = _model()
    mem = model.memory
    assert mem is not None
    g = torch.Generator().manual_seed(3)
    e = torch.randn(3, 150, 16, generator=g)  # longer than one chunk
    valid = torch.rand(3, 150, generator=g) > 0.3
    m0 = torch.randn(3, 16, generator=g)
    assert (mem.scan(e, valid, m0) - mem.scan_dense(e, valid, m0)).abs().max().item() <= TOL


def test_attention_masks_are_the_plain_window_and_padding_rule() -> None:
    """blocked[b, 0, i, j] is False exactly when key j is in query i's window and is a real
    event, or is query i itself (a padding query sees itself only): the rule written with
    torch.eye, against the comparison the model uses so that the mask exports to ONNX."""
    model = _model(span=3)
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    blocked, dist = model._attention_masks(valid)
    T = valid.shape[1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    in_window = (i - j >= 0) & (i - j < 3)
    own = torch.eye(T, dtype=torch.bool)
    assert torch.equal(blocked, ~(in_window & (valid[:, None, :] | own))[:, None])
    assert torch.equal(dist, (i - j).clamp(0, 2))
    assert not blocked.all(dim=-1).any()  # every query sees at least itself
