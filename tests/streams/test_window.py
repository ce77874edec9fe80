from hypothesis import given, settings
from hypothesis import strategies as st

from streams.events import Event, Source
from streams.window import UserState, WindowEntry, WindowPolicy, apply_event, trim


def make(
    offset: int,
    ts: int,
    event_id: str | None = None,
    item: str | None = None,
    topic: str = "clicks",
    partition: int = 0,
) -> Event:
    return Event(
        event_id=event_id or f"e{offset}",
        user_id="u",
        item_id=item or f"i{offset}",
        event_type="click",
        timestamp_ms=ts,
        source=Source(topic, partition, offset),
    )


def test_window_keeps_last_length_events_oldest_first() -> None:
    state = UserState()
    policy = WindowPolicy(length=3)
    for offset in range(5):
        assert apply_event(state, make(offset, 1000 + offset), policy)
    assert [e.event_id for e in state.window] == ["e2", "e3", "e4"]
    assert state.offsets == {"clicks/0": 4}


def test_replayed_offset_is_not_applied_twice() -> None:
    state = UserState()
    policy = WindowPolicy(length=10)
    events = [make(offset, 1000 + offset) for offset in range(3)]
    for e in events:
        apply_event(state, e, policy)
    before = list(state.window)
    assert not any(apply_event(state, e, policy) for e in events)
    assert state.window == before


def test_retried_push_with_same_event_id_is_not_appended() -> None:
    state = UserState()
    policy = WindowPolicy(length=10)
    assert apply_event(state, make(1, 1000, event_id="same"), policy)
    assert not apply_event(state, make(2, 1001, event_id="same"), policy)
    assert len(state.window) == 1
    assert state.offsets["clicks/0"] == 2  # the retry's offset still counts as seen


def test_out_of_order_event_from_other_topic_is_inserted_by_time() -> None:
    state = UserState()
    policy = WindowPolicy(length=10)
    apply_event(state, make(1, 1000), policy)
    apply_event(state, make(2, 3000), policy)
    apply_event(state, make(7, 2000, topic="purchases", event_id="p"), policy)
    assert [e.event_id for e in state.window] == ["e1", "p", "e2"]
    assert state.offsets == {"clicks/0": 2, "purchases/0": 7}


def test_max_age_uses_event_time_of_newest_event() -> None:
    policy = WindowPolicy(length=10, max_age_ms=1000)
    state = UserState()
    for offset, ts in enumerate([0, 500, 1200, 1600]):
        apply_event(state, make(offset, 1_000_000 + ts), policy)
    assert [e.event_id for e in state.window] == ["e2", "e3"]
    assert trim(state.window, policy) == state.window


def test_seen_items() -> None:
    state = UserState()
    apply_event(state, make(1, 1, item="a"), WindowPolicy(5))
    apply_event(state, make(2, 2, item="b"), WindowPolicy(5))
    assert state.seen_items() == {"a", "b"}


def test_window_entries_are_not_tracked_by_the_cycle_collector() -> None:
    # A worker caches millions of entries; tracked, they made every full collection slow.
    import gc

    entry = WindowEntry("e1", "i1", "click", 1_000)
    gc.collect()
    assert not gc.is_tracked(entry)


def apply_event_reference(state: UserState, event: Event, policy: WindowPolicy) -> bool:
    """`apply_event` as plainly defined: the duplicate check scans the window's ids."""
    key = f"{event.source.topic}/{event.source.partition}"
    applied = state.offsets.get(key)
    if applied is not None and event.source.offset <= applied:
        return False
    state.offsets[key] = event.source.offset
    if any(entry.event_id == event.event_id for entry in state.window):
        return False
    window = [*state.window, WindowEntry.from_event(event)]
    window.sort(key=lambda entry: entry.timestamp_ms)  # stable: ties keep arrival order
    state.window = trim(window, policy)
    return True


# (event id, timestamp, topic, copy the state before applying): few ids and times, so that
# duplicates, ties, out-of-order events and trims are all common.
steps = st.lists(
    st.tuples(
        st.integers(0, 12), st.integers(0, 40), st.sampled_from(["clicks", "buys"]), st.booleans()
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps=steps, length=st.integers(1, 6), max_age=st.one_of(st.none(), st.integers(0, 15)))
def test_apply_event_matches_the_reference(
    steps: list[tuple[int, int, str, bool]], length: int, max_age: int | None
) -> None:
    """The kept event-id set gives the same windows as scanning, across trims and the copies
    the store hands each batch."""
    policy = WindowPolicy(length, max_age)
    state, reference = UserState(), UserState()
    for offset, (event_id, ts, topic, copy) in enumerate(steps):
        if copy:
            state = state.copy()
        event = make(offset, ts, event_id=f"e{event_id}", topic=topic)
        assert apply_event(state, event, policy) == apply_event_reference(reference, event, policy)
        assert state.window == reference.window
        assert state.offsets == reference.offsets


def test_a_copy_does_not_share_the_event_ids() -> None:
    policy = WindowPolicy(length=10)
    state = UserState()
    apply_event(state, make(1, 1000), policy)
    copy = state.copy()
    assert apply_event(copy, make(2, 1001, event_id="only-in-the-copy"), policy)
    assert apply_event(state, make(2, 1001, event_id="only-in-the-copy"), policy)


def test_an_event_id_trimmed_out_of_the_window_is_applied_again() -> None:
    state = UserState()
    policy = WindowPolicy(length=2)
    for offset in range(3):
        apply_event(state, make(offset, 1000 + offset), policy)
    assert apply_event(state, make(3, 1003, event_id="e0"), policy)
    assert [e.event_id for e in state.window] == ["e2", "e0"]
