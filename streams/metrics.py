"""Prometheus metrics of the worker (served on INTEREST_METRICS_PORT; dashboards in deploy/)."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterable, Sequence

from prometheus_client import Counter, Gauge, Histogram

from streams.exposure import ExposureWindow
from streams.recommend import Request

EVENTS = Counter(
    "interest_events_total", "Input messages by outcome", ["topic", "outcome"]
)  # outcome: applied, duplicate, rejected
DLQ = Counter(
    "interest_dlq_total",
    "Messages sent to the dead letter topic, by reason code (streams/events.py DLQ_REASONS)",
    ["topic", "reason"],
)
RECOMMENDATIONS = Counter(
    "interest_recommendations_total", "Recommendation events published", ["source"]
)
BATCH_SECONDS = Histogram(
    "interest_batch_seconds",
    "Time in one micro-batch's stages (validate + windows, recommend, payloads, publish +"
    " state write), without waits for the batch before it; batches in flight overlap",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# The stages of a batch, in order (streams/processor.py times each).
STAGES = ("apply", "recommend", "finish", "publish", "write")
STAGE_SECONDS = Histogram(
    "interest_stage_seconds",
    "Time in one stage of a micro-batch, without waits for the batch before it: apply"
    " (validate, read, windows), recommend (the encoder or baseline), finish (payloads),"
    " publish (until the broker acks), write (Redis). Stages of one kind run one batch at a"
    " time, so the stage with the largest mean bounds the batches per second; recommend and"
    " finish share the inference thread, so their sum does too",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram(
    "interest_batch_size",
    "Messages per micro-batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
)
EVENT_LAG_SECONDS = Histogram(
    "interest_event_to_recommendation_seconds",
    "From the event's record reaching its input topic (its Kafka timestamp) to its"
    " recommendation acknowledged by the broker",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
)
RETRIES = Counter("interest_batch_retries_total", "Batches retried after an I/O error")
ONLINE_EVENTS = Counter(
    "interest_online_events_total",
    "Events of users who had a recommendation before them",
    ["model_version"],
)
ONLINE_HITS = Counter(
    "interest_online_hits_total",
    "Events whose item was in the recommendation made just before them (hit rate@K)",
    ["model_version"],
)


def observe_stage(stage: str, started: float) -> float:
    """Record a stage's duration until now (``interest_stage_seconds``) and return it."""
    seconds = time.perf_counter() - started
    STAGE_SECONDS.labels(stage).observe(seconds)
    return seconds


FORGETS = Counter(
    "interest_forgets_total",
    "Forget requests applied: a user's history wiped (a second copy of one is not counted)",
)
ASSIGNED_PARTITIONS = Gauge(
    "interest_assigned_partitions",
    "Partitions of each input topic the consumer group gave this worker at its last rebalance"
    " (several workers in one group split them; 0: an idle member)",
    ["topic"],
)


def report_assignment(input_topics: Sequence[str], assigned_topics: Iterable[str]) -> None:
    """Set ``interest_assigned_partitions`` from a rebalance's assignment, given as the topic
    of each assigned partition (other topics, such as faust's own, are left out)."""
    counts = Tally(assigned_topics)
    for topic in input_topics:
        ASSIGNED_PARTITIONS.labels(topic).set(counts[topic])


MODEL_INFO = Gauge("interest_model_info", "1 for the model version this worker serves", ["version"])
MODEL_ROLLOUT_FAILURES = Counter(
    "interest_model_rollout_failures_total",
    "Bundles that failed to load on a rollout (the previous model kept serving)",
)


def serving(version: str) -> None:
    """Point ``interest_model_info`` at the version now serving."""
    MODEL_INFO.clear()
    MODEL_INFO.labels(version).set(1)


def report_batch(
    outcomes: Tally[tuple[str, str]],
    rejected: Tally[tuple[str, str]],
    sources: Tally[str],
    online: Tally[str],
    requests: Sequence[Request],
) -> None:
    """Metrics of a committed batch, counted once per batch (a labelled inc() per event costs;
    a retried batch is reported once)."""
    for (topic, outcome), count in outcomes.items():
        EVENTS.labels(topic, outcome).inc(count)
    for (topic, reason), count in rejected.items():
        DLQ.labels(topic, reason).inc(count)
    for source, count in sources.items():
        RECOMMENDATIONS.labels(source).inc(count)
    for name, count in online.items():
        kind, version = name.split(":", 1)
        counter = ONLINE_HITS if kind == "hits" else ONLINE_EVENTS
        counter.labels(version).inc(count)
    now_ms = time.time() * 1000
    for request in requests:
        arrived_ms = request.event.source.timestamp_ms
        if arrived_ms is not None:
            EVENT_LAG_SECONDS.observe(max(0.0, now_ms - arrived_ms) / 1000)


RECOMMENDED_ITEMS = Counter(
    "interest_recommended_items_total",
    "Recommended item slots by the serving model's popularity segment: head (the most"
    " trained-on fifth of its items) or long_tail (the rest, and items outside the model);"
    " rate(long_tail) / rate(all) is the live long-tail share, summed over workers",
    ["segment"],
)
# Labelled by model version: a worker without a model has no series rather than zeros, and a
# rollout starts the new model's window afresh.
RECOMMENDATION_COVERAGE = Gauge(
    "interest_recommendation_coverage",
    "Share of the model's items this worker recommended at least once in its last"
    " INTEREST_EXPOSURE_WINDOW item slots",
    ["model_version"],
)
RECOMMENDATION_LONG_TAIL = Gauge(
    "interest_recommendation_long_tail_share",
    "Share of this worker's last INTEREST_EXPOSURE_WINDOW recommended item slots that hold a"
    " long-tail item",
    ["model_version"],
)


def report_exposure(window: ExposureWindow, head: int, tail: int) -> None:
    """The popularity-bias metrics after a committed batch's items entered ``window``."""
    RECOMMENDED_ITEMS.labels("head").inc(head)
    RECOMMENDED_ITEMS.labels("long_tail").inc(tail)
    version = window.catalogue.version
    RECOMMENDATION_COVERAGE.labels(version).set(window.coverage())
    RECOMMENDATION_LONG_TAIL.labels(version).set(window.long_tail_share())


def new_exposure_window() -> None:
    """Drop the gauges of the model that served before (its window is gone)."""
    RECOMMENDATION_COVERAGE.clear()
    RECOMMENDATION_LONG_TAIL.clear()
