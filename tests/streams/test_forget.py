"""Forget requests in the batch stages (no Kafka, no Redis): what a forget wipes, what it
keeps, and the events it drops, across both input topics' copies and replays."""

from __future__ import annotations

import json
from collections import Counter

import orjson

from streams.events import Forget, Source, validate
from streams.forget import forget_record
from streams.messages import RawMessage
from streams.recommend import Batch, PopularityRecommender, StoredModelState
from streams.settings import Settings
from streams.stages import Applied, Prepared, Recommended, finish, model_batch
from streams.store import FORGOTTEN, StoredUser
from streams.window import ForgetMark, UserState, WindowEntry, apply_forget
from tests.streams.test_stages import applied_batch

SETTINGS = Settings(top_k=3, window_length=4)
TOPICS = (SETTINGS.topic_clicks, SETTINGS.topic_purchases)


def event(topic: str, offset: int, user: str, item: str, ts: int) -> RawMessage:
    payload = {"event_id": f"{topic}-{offset}", "user_id": user, "item_id": item}
    payload |= {"event_type": "click", "timestamp": 1_700_000_000_000 + ts}
    return RawMessage(user.encode(), json.dumps(payload).encode(), Source(topic, 0, offset))


def forget(topic: str, offset: int, user: str, forget_id: str = "f1") -> RawMessage:
    key, value, _ = forget_record(user, forget_id)
    return RawMessage(key, value, Source(topic, 0, offset))


def stored(items: list[str], offsets: dict[str, int]) -> StoredUser:
    window = [WindowEntry(f"old-{i}", item, "click", i) for i, item in enumerate(items)]
    return StoredUser(
        UserState(window, dict(offsets)),
        raw_offsets=orjson.dumps(offsets),
        vector=b"old-vector",
        memory=b"old-memory",
        model_version="v1",
        recs=["old-rec"],
    )


def prepared_for(
    applied: Applied, carried_recs: dict[str, list[str] | None] | None = None
) -> tuple[Batch, Prepared]:
    """Stages 2 and 3 with the popularity recommender."""
    batch = model_batch(applied, {}, k=SETTINGS.top_k)
    result = PopularityRecommender().recommend(batch)
    recommended = Recommended(result, batch.stored, 0.0)
    return batch, finish(applied, recommended, carried_recs or {}, "recs")


def test_the_validator_recognises_a_forget_and_rejects_a_bad_one() -> None:
    _, value, forget_id = forget_record("u1")
    checked = validate(value, Source("clicks", 0, 1), max_id_length=64, max_event_bytes=4096)
    assert checked == Forget("u1", forget_id, Source("clicks", 0, 1))
    bad = validate(
        b'{"control": "forget", "user_id": ""}',
        Source("clicks", 0, 2),
        max_id_length=64,
        max_event_bytes=4096,
    )
    assert bad.reason == "bad_control"  # type: ignore[union-attr]


def test_a_forget_wipes_history_and_answers_earlier_events_with_a_tombstone() -> None:
    users = {"u1": stored(["a", "b"], {"clicks/0": 3}), "u2": stored(["c"], {"clicks/0": 2})}
    applied = applied_batch(
        [
            event("clicks", 10, "u1", "x", 10),  # before the forget: answered by the tombstone
            event("clicks", 11, "u2", "y", 11),
            forget("clicks", 12, "u1"),
            event("clicks", 13, "u1", "z", 13),  # after it: the start of u1's new history
        ],
        users,
        topics=TOPICS,
    )
    changes = applied.changes
    assert changes.forgotten == ("u1",) and changes.forget_ids == ("f1",)
    assert [e.item_id for e in applied.states["u1"].window] == ["z"]
    assert applied.states["u1"].offsets == {"clicks/0": 13}  # the replay guard stays
    assert applied.states["u1"].forgetting == ForgetMark(pending=(("f1", ("clicks",)),))
    assert [r.event.event_id for r in changes.requests] == ["clicks-11", "clicks-13"]
    assert applied.prior_windows["u1"] == () and applied.prior_signatures["u1"] == FORGOTTEN
    # Popularity counts are not personal data: every applied event still counts.
    assert [item for item, _ in changes.new_items] == ["x", "y", "z"]

    batch, prepared = prepared_for(applied, carried_recs={"u1": ["carried-rec"]})
    assert batch.forgotten == {"u1"} and batch.stored["u1"] == StoredModelState()
    assert [(r.key, r.value is None) for r in prepared.out[:1]] == [(b"u1", True)]
    assert [json.loads(r.value)["trigger_event_id"] for r in prepared.out[1:]] == [
        "clicks-11",
        "clicks-13",
    ]
    write = prepared.writes["u1"]
    assert write.wipe and write.mark_changed and write.replace
    assert write.vector is None  # no model update: the write deletes the stored one
    assert write.recs == prepared.last_recs["u1"] != ["carried-rec"]
    assert not prepared.writes["u2"].wipe
    # No hit counted against the old recommendation for u1's first new event.
    assert prepared.online == Counter({"events:popularity-v1": 1, "hits:popularity-v1": 0})


def test_events_sent_before_the_forget_on_the_other_topic_are_dropped_until_its_copy() -> None:
    applied = applied_batch(
        [
            forget("clicks", 5, "u1"),
            event("purchases", 7, "u1", "old", 1),  # sent before the request: dropped
            event("clicks", 6, "u1", "new", 2),
            forget("purchases", 8, "u1"),  # the second copy: nothing wiped again
            event("purchases", 9, "u1", "later", 3),
        ],
        {"u1": stored(["a"], {"clicks/0": 1})},
        topics=TOPICS,
    )
    state = applied.states["u1"]
    assert [e.item_id for e in state.window] == ["new", "later"]
    assert state.forgetting == ForgetMark(done=("f1",))  # every copy arrived
    assert state.offsets == {"clicks/0": 6, "purchases/0": 9}
    assert applied.changes.marks == {"u1": ForgetMark(done=("f1",))}
    assert applied.changes.outcomes[("purchases", "forgotten")] == 1
    assert applied.changes.outcomes[("purchases", "forget")] == 1


def test_a_replayed_forget_changes_nothing() -> None:
    state = UserState([WindowEntry("e", "new", "click", 1)], {"clicks/0": 12})
    replayed = Forget("u1", "f1", Source("clicks", 0, 12))
    assert apply_forget(state, replayed, TOPICS) == "duplicate"
    assert [e.item_id for e in state.window] == ["new"] and state.forgetting is None
    later = Forget("u1", "f2", Source("clicks", 0, 13))  # a new request: wipes again
    assert apply_forget(state, later, TOPICS) == "wiped" and state.window == []


def test_a_forget_for_an_unknown_user_is_applied_and_harmless() -> None:
    applied = applied_batch([forget("clicks", 1, "nobody")], {}, topics=TOPICS)
    assert applied.changes.forgotten == ("nobody",)
    _, prepared = prepared_for(applied)
    assert [(r.key, r.value) for r in prepared.out] == [(b"nobody", None)]
    assert prepared.writes["nobody"].state.window == []


def test_two_requests_and_a_late_retry_never_leave_a_topic_dropped() -> None:
    """Copies in the order a batch of whole fetches gives them: both requests' clicks copies,
    then both purchases copies, then a retry of the first (its id, on both topics)."""
    applied = applied_batch(
        [
            forget("clicks", 1, "u1", "f1"),
            forget("clicks", 2, "u1", "f2"),
            event("purchases", 3, "u1", "old", 1),  # before both requests: dropped
            forget("purchases", 4, "u1", "f1"),
            event("purchases", 5, "u1", "still-old", 2),  # before f2 on purchases: dropped
            forget("purchases", 6, "u1", "f2"),
            event("clicks", 7, "u1", "new", 3),
            forget("clicks", 8, "u1", "f1"),  # the retry: already done, changes nothing
            forget("purchases", 9, "u1", "f1"),
            event("purchases", 10, "u1", "newer", 4),
        ],
        {},
        topics=TOPICS,
    )
    state = applied.states["u1"]
    assert [e.item_id for e in state.window] == ["new", "newer"]
    assert state.forgetting == ForgetMark(done=("f1", "f2"))
    assert applied.changes.forgotten == ("u1", "u1")
    assert applied.changes.outcomes[("purchases", "forgotten")] == 2


def test_a_copy_that_never_comes_is_closed_by_the_next_request() -> None:
    applied = applied_batch(
        [
            forget("clicks", 1, "u1", "f1"),  # f1's purchases copy is lost
            forget("clicks", 2, "u1", "f2"),
            forget("purchases", 3, "u1", "f2"),  # sent after f1: stands for it there too
            event("purchases", 4, "u1", "new", 1),
        ],
        {},
        topics=TOPICS,
    )
    state = applied.states["u1"]
    assert state.forgetting == ForgetMark(done=("f1", "f2"))
    assert [e.item_id for e in state.window] == ["new"]


def test_a_replayed_event_is_a_duplicate_not_a_forgotten_one() -> None:
    state = UserState([], {"purchases/0": 9}, forgetting=ForgetMark(pending=(("f1", ("clicks",)),)))
    applied = applied_batch(
        [event("purchases", 7, "u1", "old", 1)],
        {"u1": StoredUser(state, raw_offsets=b"{}")},
        topics=TOPICS,
    )
    assert applied.changes.duplicates == 1
    assert applied.states["u1"].offsets == {"purchases/0": 9}  # never moved back
