"""Typed behaviour logs: the UserBehavior reader, the seen-items rule offline, type-weighted
loss, item categories, and training end to end on a tiny typed log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from encoder.data import (
    USER_BEHAVIOR_TYPES,
    eval_batch,
    inputs_without_types,
    is_user_behavior,
    load_interactions,
    seen_items,
    train_batch,
)
from encoder.evaluate import evaluate, exclusion_rule, load_model
from encoder.features import (
    EVENT_TYPES,
    event_type_index,
    excluded_type_indices,
    parse_event_types,
    time_gap_bucket,
)
from encoder.model import EncoderConfig, InterestEncoder
from encoder.train import next_item_loss, train
from tests.conftest import shared_data

TINY = {"d_model": 16, "n_heads": 2, "span": 4, "max_len": 12, "dropout": 0.0}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_user_behavior_lines_map_to_event_types_in_time_order(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "ub.csv",
        "1,10,7,pv,1511544070\n1,11,7,buy,1511544000\n1,12,8,cart,1511544100\n"
        "2,10,7,fav,1511544070\n\n1,13,9,fav,1511545100\n",
    )
    assert is_user_behavior(path)
    inter = load_interactions(path)
    assert inter.user_ids == ["1", "2"]
    assert inter.item_ids == ["10", "11", "12", "13"]
    first = inter.sequences[0]
    assert first.items.tolist() == [2, 1, 3, 4]  # sorted by time: buy, pv, cart, fav
    names = [EVENT_TYPES[t] for t in first.types.tolist()]
    assert names == ["purchase", "view", "add_to_cart", "favorite"]
    # epoch seconds, not milliseconds: 70 s, 30 s, 1000 s apart
    assert first.gaps.tolist() == [
        0,
        time_gap_bucket(70),
        time_gap_bucket(30),
        time_gap_bucket(1000),
    ]
    assert inter.item_categories == ["7", "7", "8", "9"]
    assert set(USER_BEHAVIOR_TYPES.values()) <= set(EVENT_TYPES)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1,11,7,pv", "expected 5 columns"),
        ("1,11,7,like,1511544070", "unknown behavior 'like'"),
        ("1,11,7,pv,yesterday", "bad timestamp 'yesterday'"),
        (",11,7,pv,1511544070", "empty user or item"),
    ],
)
def test_a_bad_user_behavior_line_names_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    path = _write(tmp_path, "ub.csv", f"1,10,7,pv,1511544070\n\n{line}\n")
    with pytest.raises(UserError, match=rf"ub\.csv:3: .*{message}"):
        load_interactions(path)


def test_a_csv_with_a_header_is_not_taken_for_user_behavior(tmp_path: Path) -> None:
    header = _write(tmp_path, "h.csv", "user,item,type,category\nu,a,view,c1\nu,b,purchase,c2\n")
    assert not is_user_behavior(header)
    inter = load_interactions(header)
    assert inter.sequences[0].types.tolist() == [event_type_index("view"), 1]
    assert inter.item_categories == ["c1", "c2"]
    # a headerless file whose first line is not UserBehavior: the header error says both
    bad = _write(tmp_path, "b.csv", "1,10,7,zap,1511544070\n")
    with pytest.raises(UserError, match=r"b\.csv:1: .*UserBehavior"):
        load_interactions(bad)


def test_the_taobao_dev_slice_reads_whole() -> None:
    inter = load_interactions(shared_data("taobao_userbehavior_dev.csv"))
    assert (len(inter.sequences), inter.n_events) == (407, 43_050)
    assert inter.item_categories is not None and len(inter.item_categories) == inter.n_items
    used = {EVENT_TYPES[t] for s in inter.sequences for t in np.unique(s.types).tolist()}
    assert used == {"view", "add_to_cart", "favorite", "purchase"}


def test_event_type_lists_parse_and_check_their_names() -> None:
    assert parse_event_types(" purchase, view ,purchase,") == ("purchase", "view")
    assert parse_event_types("") == ()
    with pytest.raises(ValueError, match="'buy'"):
        parse_event_types("purchase,buy")
    assert excluded_type_indices(None) is None
    assert excluded_type_indices(EVENT_TYPES) is None  # every type: the plain rule
    assert excluded_type_indices(["purchase"]) == frozenset({1})
    assert excluded_type_indices([]) == frozenset()
    assert exclusion_rule("add_to_cart,purchase") == frozenset({1, 3})
    with pytest.raises(UserError, match="exclude_seen_types"):
        exclusion_rule("buy")


def test_seen_items_follow_the_rule_by_type(tmp_path: Path) -> None:
    # u: views a, buys b, carts c, views b again, then the test event d
    path = _write(
        tmp_path,
        "ub.csv",
        "u,a,1,pv,100\nu,b,1,buy,200\nu,c,1,cart,300\nu,b,1,pv,400\nu,d,1,pv,500\n",
    )
    inter = load_interactions(path)
    users = eval_batch(inter, "test", 12, 0).users
    a, b, c = 1, 2, 3
    assert seen_items(inter, users, "test")[0].tolist() == [a, b, c]
    assert seen_items(inter, users, "test", frozenset({1}))[0].tolist() == [b]
    assert seen_items(inter, users, "test", frozenset({1, 3}))[0].tolist() == [b, c]
    assert seen_items(inter, users, "test", frozenset())[0].tolist() == []
    assert seen_items(inter, users, "valid", frozenset({2}))[0].tolist() == [a]


def test_batches_carry_target_types_and_can_drop_input_types(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "ub.csv", "u,a,1,pv,100\nu,b,1,buy,200\nu,c,1,cart,300\nu,d,1,fav,400\n"
    )
    inter = load_interactions(path)
    tr = train_batch(inter, max_len=4, prefix_len=0)
    assert tr.target_types[0, -1].item() == event_type_index("purchase")  # b, target of a
    te = eval_batch(inter, "test", 4, 0)
    assert te.target_types.tolist() == [event_type_index("favorite")]
    plain = inputs_without_types(te)
    assert plain.types.abs().sum() == 0 and plain.target_types.tolist() == te.target_types.tolist()
    assert te.types.abs().sum() > 0  # the original is left as it was


@pytest.mark.parametrize("n_negatives", [0, 8])
def test_uniform_type_weights_give_the_plain_loss(tmp_path: Path, n_negatives: int) -> None:
    inter = load_interactions(_typed_log(tmp_path / "ub.csv"))
    model = InterestEncoder(EncoderConfig(n_items=inter.n_items, **TINY)).eval()
    batch = train_batch(inter, 12, 0)
    ones = torch.ones(len(EVENT_TYPES))
    torch.manual_seed(1)
    plain = next_item_loss(model, batch, n_negatives)
    torch.manual_seed(1)
    weighted = next_item_loss(model, batch, n_negatives, type_weights=ones)
    torch.testing.assert_close(plain, weighted)


def test_categories_enter_the_item_table_the_step_and_the_scores() -> None:
    torch.manual_seed(0)
    cfg = EncoderConfig(n_items=6, n_categories=2, **TINY)
    model = InterestEncoder(cfg).eval()
    model.item_emb.category_of.copy_(torch.tensor([0, 1, 1, 2, 2, 2, 1]))
    table = model.item_embeddings()
    category = model.item_emb.category.weight
    torch.testing.assert_close(table[3], model.item_emb.weight[3] + category[2])
    assert float(table[0].detach().abs().sum()) == 0.0  # padding stays zero
    items = torch.tensor([[1, 3, 5, 2]])
    zeros = torch.zeros_like(items)
    with torch.no_grad():
        full = model(items, zeros, zeros)
        state = model.init_state(1)
        for t in range(items.shape[1]):
            vector, state = model.step(state, items[:, t], zeros[:, t], zeros[:, t])
    torch.testing.assert_close(vector, full[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.item_scores(vector)[:, 1:], vector @ table[1:].T)


def _typed_log(path: Path, users: int = 30, items: int = 24, length: int = 10) -> Path:
    """UserBehavior lines: each user walks the catalogue from a random start, every third
    step a cart and every fifth a purchase; an item's category is its number mod 4."""
    g = torch.Generator().manual_seed(0)
    lines = []
    for u in range(users):
        start = int(torch.randint(0, items, (1,), generator=g))
        for t in range(length):
            item = (start + t) % items
            kind = "buy" if t % 5 == 4 else "cart" if t % 3 == 2 else "pv"
            lines.append(f"{u},{item},{item % 4},{kind},{1_511_544_000 + 60 * t}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_training_on_a_typed_log_end_to_end(tmp_path: Path) -> None:
    data = _typed_log(tmp_path / "ub.csv")
    summary = train(
        data,
        tmp_path / "m",
        epochs=2,
        progress=False,
        type_weights={"purchase": 3.0},
        item_categories=True,
        exclude_seen_types=("purchase",),
        **TINY,
    )
    json.dumps(summary)
    assert summary["config"]["uses_event_types"] and summary["config"]["n_categories"] == 4
    assert summary["train_config"]["type_weights"] == {"purchase": 3.0}
    model, item_ids = load_model(tmp_path / "m")  # the category map travels in model.pt
    category_of = dict(zip(item_ids, model.item_emb.category_of[1:].tolist(), strict=True))
    assert len(set(category_of.values())) == 4
    assert all(category_of[i] == category_of[str(int(i) % 4)] for i in item_ids)
    result = evaluate(tmp_path / "m", data, exclude_seen_types="purchase")
    assert result["purchase_users"] == 30  # every user's tenth event is a purchase
    assert 0.0 <= result["purchase_ndcg@10"] <= result["purchase_hr@10"] <= 1.0
    cut = _write(tmp_path, "cut.csv", "".join(data.read_text().splitlines(True)[:4]))
    assert "purchase_ndcg@10" not in evaluate(tmp_path / "m", cut)  # a view is the target


def test_a_model_trained_without_types_is_evaluated_as_it_is_served(tmp_path: Path) -> None:
    data = _typed_log(tmp_path / "ub.csv")
    summary = train(data, tmp_path / "m", epochs=1, progress=False, uses_event_types=False, **TINY)
    assert summary["config"]["uses_event_types"] is False
    assert 0.0 <= evaluate(tmp_path / "m", data)["ndcg@10"] <= 1.0


def test_bad_behaviour_options_are_user_errors(tmp_path: Path) -> None:
    data = _typed_log(tmp_path / "ub.csv")
    with pytest.raises(UserError, match="type_weights"):
        train(data, tmp_path / "m", epochs=1, progress=False, type_weights={"buy": 2.0})
    with pytest.raises(UserError, match="type_weights"):
        train(data, tmp_path / "m", epochs=1, progress=False, type_weights={"purchase": 0})
    with pytest.raises(UserError, match="exclude_seen_types"):
        train(data, tmp_path / "m", epochs=1, progress=False, exclude_seen_types=("buy",))


def test_a_category_model_exports_one_item_table_the_runtime_ranks_with(tmp_path: Path) -> None:
    """The worker needs no category input: the bundle's item table already holds each item's
    category row, and the exported step (export checks it against torch) reads the same."""
    import warnings

    from export.bundle import export_bundle, save_model_dir
    from export.runtime import EncoderRuntime

    torch.manual_seed(0)
    cfg = EncoderConfig(n_items=12, n_categories=3, n_time_buckets=8, memory_decay=0.9, **TINY)
    model = InterestEncoder(cfg).eval()
    with torch.no_grad():
        model.item_emb.category_of.copy_(torch.tensor([0, *[i % 3 + 1 for i in range(12)]]))
        model.item_emb.category.weight[1:].normal_(0, 1.0)
    model_dir = save_model_dir(model, [f"i{i}" for i in range(12)], tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = export_bundle(model_dir=model_dir, out=tmp_path / "b")
    runtime = EncoderRuntime.load(bundle, device="cpu")
    np.testing.assert_allclose(
        runtime.item_embeddings, model.item_embeddings().detach().numpy(), atol=1e-6
    )
