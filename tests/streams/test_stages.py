"""The batch stages of streams/stages.py as plain functions: no Kafka, no Redis."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

import orjson

from streams.events import Source
from streams.messages import RawMessage
from streams.recommend import (
    ModelUpdate,
    PopularityRecommender,
    Recommendation,
    Result,
    StoredModelState,
)
from streams.settings import Settings
from streams.stages import (
    Applied,
    Recommended,
    apply_batch,
    carried_users,
    check_messages,
    finish,
    model_batch,
)
from streams.store import BatchRead, StoredUser
from streams.window import UserState, WindowPolicy

SETTINGS = Settings(top_k=3, window_length=4)


def message(offset: int, user: str, item: str, ts: int, key: str | None = None) -> RawMessage:
    ts += 1_700_000_000_000
    event = {"event_id": f"e{offset}", "user_id": user, "item_id": item, "timestamp": ts}
    event["event_type"] = "click"
    raw_key = (key if key is not None else user).encode()
    return RawMessage(raw_key, json.dumps(event).encode(), Source("clicks", 0, offset))


def applied_batch(
    messages: list[RawMessage],
    users: dict[str, StoredUser],
    earlier: Sequence[Applied] = (),
    topics: tuple[str, ...] = (),
) -> Applied:
    """Stage 1 as `BatchProcessor.apply` runs it, with ``users`` standing in for the read."""
    checked = check_messages(messages, SETTINGS)
    carried = carried_users(checked.events, earlier)
    for event in checked.events:
        if event.user_id not in carried:
            users.setdefault(event.user_id, StoredUser(UserState()))
    read = BatchRead(users, [("p1", 3.0), ("p2", 2.0), ("p3", 1.0), ("p4", 0.5)], None)
    policy = WindowPolicy(SETTINGS.window_length, input_topics=topics)
    return apply_batch(checked, read, earlier, carried, policy, lambda popular, _, __: popular)


def test_a_bad_or_mis_keyed_message_becomes_a_dead_letter_and_nothing_else() -> None:
    checked = check_messages(
        [
            message(0, "u1", "i1", 1_000),
            RawMessage(b"u2", b"{not json", Source("clicks", 0, 1)),
            message(2, "u3", "i3", 1_000, key="someone-else"),
        ],
        SETTINGS,
    )
    assert [e.event_id for e in checked.events] == ["e0"]
    assert checked.rejected == Counter({("clicks", "not_json"): 1, ("clicks", "key_mismatch"): 1})
    letters = [orjson.loads(r.value) for r in checked.dead_letters]
    assert [r.topic for r in checked.dead_letters] == [SETTINGS.topic_dlq] * 2
    assert [letter["offset"] for letter in letters] == [1, 2]
    assert "key" in letters[1]["error"]
    assert [letter["reason"] for letter in letters] == ["not_json", "key_mismatch"]


def test_apply_events_counts_replays_and_marks_out_of_order_users_for_rewrite() -> None:
    applied = applied_batch(
        [
            message(0, "u1", "i1", 2_000),
            message(1, "u1", "i2", 1_000),  # older than u1's newest: inserted
            message(0, "u1", "i1", 2_000),  # the same message again: a replay
            message(2, "u2", "i3", 5_000),
        ],
        {},
    )
    changes = applied.changes
    assert changes.duplicates == 1
    assert changes.touched == {"u1", "u2"}
    assert changes.rewritten == {"u1"}
    assert [e.item_id for e in changes.appended["u2"]] == ["i3"]
    assert [r.appended for r in changes.requests] == [True, False, True]
    assert [e.item_id for e in applied.states["u1"].window] == ["i2", "i1"]
    assert changes.outcomes == Counter({("clicks", "applied"): 3, ("clicks", "duplicate"): 1})


def test_users_of_an_uncommitted_batch_are_carried_from_the_newest_one() -> None:
    first = applied_batch([message(0, "u1", "i1", 1_000)], {})
    second = applied_batch([message(1, "u1", "i2", 2_000)], {}, earlier=[first])
    assert second.carried_from == {"u1": 0}
    assert [e.item_id for e in second.states["u1"].window] == ["i1", "i2"]
    assert second.prior_signatures["u1"] == first.final_signatures["u1"]
    third = applied_batch(
        [message(2, "u1", "i3", 3_000), message(3, "u2", "i3", 3_000)], {}, [first, second]
    )
    assert third.carried_from == {"u1": 1}  # the newest batch that touched u1
    assert [e.item_id for e in third.states["u1"].window] == ["i1", "i2", "i3"]
    # Each batch changed a copy of its own: the earlier ones are as they were.
    assert [e.item_id for e in first.states["u1"].window] == ["i1"]
    assert [e.item_id for e in second.states["u1"].window] == ["i1", "i2"]


def test_finish_publishes_one_recommendation_per_event_and_writes_each_touched_user() -> None:
    stored = StoredUser(UserState(), raw_offsets=b"{}", recs=["i1", "i7"])
    applied = applied_batch(
        [
            message(0, "u1", "i1", 1_000),
            RawMessage(b"u2", b"{not json", Source("clicks", 0, 1)),
            message(2, "u1", "i2", 2_000),
        ],
        {"u1": stored},
    )
    batch = model_batch(applied, {}, k=SETTINGS.top_k)
    result = PopularityRecommender().recommend(batch)
    update = ModelUpdate(b"v", b"m", "model-1")
    result = Result(result.recommendations, {"u1": update})
    prepared = finish(applied, Recommended(result, batch.stored, 0.0), {}, "recs")

    assert [r.topic for r in prepared.out] == [SETTINGS.topic_dlq, "recs", "recs"]
    payloads = [orjson.loads(r.value) for r in prepared.out[1:]]
    assert [p["trigger_event_id"] for p in payloads] == ["e0", "e2"]
    assert prepared.result.applied == 2 and prepared.result.rejected == 1
    # The first event was in the recommendation stored before it: one hit of one.
    version = PopularityRecommender.model_version
    assert prepared.online == Counter({f"events:{version}": 2, f"hits:{version}": 1})
    write = prepared.writes["u1"]
    assert write.read_offsets == b"{}" and write.vector == b"v"
    assert write.recs == [item["item_id"] for item in payloads[-1]["items"]]
    assert write.recs  # the popular items u1 has not seen
    assert prepared.recs_after("u1") == write.recs
    assert prepared.outcomes[("clicks", "rejected")] == 1


def test_carried_model_states_and_recommendations_replace_what_was_read() -> None:
    applied = applied_batch([message(0, "u1", "i1", 1_000)], {})
    carried = StoredModelState(b"vec", b"mem", "model-1")
    batch = model_batch(applied, {"u1": carried}, k=2)
    assert batch.stored["u1"] == carried
    assert Recommended(Result([]), batch.stored, 0.0).model_after("u1") == carried
    recommendation = Recommendation(["i5"], [1.0], "model-1", "encoder")
    prepared = finish(
        applied, Recommended(Result([recommendation]), batch.stored, 0.0), {"u1": ["i1"]}, "r"
    )
    assert prepared.online == Counter({"events:model-1": 1, "hits:model-1": 1})
