"""The monitor's /metrics: the latest snapshot in kafka_exporter's names and labels.

Why kafka_exporter's names: dashboards and alert rules written for it (the usual way to watch
Kafka consumer lag in Prometheus) work against this monitor unchanged, and ours in deploy/ work
against kafka_exporter. Added beside them: the lag in seconds and each partition's status.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from streams.monitor.status import STATUSES

PARTITION_LABELS = ["consumergroup", "topic", "partition"]


class SnapshotMetrics(Collector):
    """Gauges read from whatever snapshot ``latest`` returns at scrape time."""

    def __init__(self, latest: Callable[[], dict[str, Any] | None]) -> None:
        self.latest = latest

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self.latest()
        if snapshot is None:
            return
        families = {
            "current": GaugeMetricFamily(
                "kafka_consumergroup_current_offset",
                "Committed offset of a consumer group in a partition",
                labels=PARTITION_LABELS,
            ),
            "lag": GaugeMetricFamily(
                "kafka_consumergroup_lag",
                "Messages of a partition not yet committed by the group",
                labels=PARTITION_LABELS,
            ),
            "seconds": GaugeMetricFamily(
                "kafka_consumergroup_lag_seconds",
                "Age of the oldest message of a partition not yet committed by the group",
                labels=PARTITION_LABELS,
            ),
            "status": GaugeMetricFamily(
                "interest_partition_status",
                "1 for the partition's current status (OK, WARN, STALL, STOP, ERR), else 0",
                labels=[*PARTITION_LABELS, "status"],
            ),
        }
        lag_sum = GaugeMetricFamily(
            "kafka_consumergroup_lag_sum",
            "Messages not yet committed by the group, per topic",
            labels=["consumergroup", "topic"],
        )
        members = GaugeMetricFamily(
            "kafka_consumergroup_members", "Members of the group", labels=["consumergroup"]
        )
        ends: dict[tuple[str, str], int] = {}
        for group in snapshot["groups"]:
            name = group["group"]
            if group["members"] is not None:
                members.add_metric([name], group["members"])
            sums: dict[str, int] = {}
            for p in group["partitions"]:
                _partition_metrics(families, name, p)
                sums[p["topic"]] = sums.get(p["topic"], 0) + p["lag"]
                ends[(p["topic"], str(p["partition"]))] = p["end"]
            for topic, lag in sums.items():
                lag_sum.add_metric([name, topic], lag)
        yield from families.values()
        yield lag_sum
        yield members
        yield from _topic_metrics(ends)


def _partition_metrics(
    families: dict[str, GaugeMetricFamily], group: str, p: dict[str, Any]
) -> None:
    labels = [group, p["topic"], str(p["partition"])]
    if p["committed"] is not None:
        families["current"].add_metric(labels, p["committed"])
    families["lag"].add_metric(labels, p["lag"])
    if p["lag_seconds"] is not None:
        families["seconds"].add_metric(labels, p["lag_seconds"])
    for status in STATUSES:
        families["status"].add_metric([*labels, status], 1.0 if p["status"] == status else 0.0)


def _topic_metrics(ends: dict[tuple[str, str], int]) -> Iterator[GaugeMetricFamily]:
    offsets = GaugeMetricFamily(
        "kafka_topic_partition_current_offset",
        "End offset of a partition",
        labels=["topic", "partition"],
    )
    partitions = GaugeMetricFamily(
        "kafka_topic_partitions", "Partitions of a topic", labels=["topic"]
    )
    counts: dict[str, int] = {}
    for (topic, partition), end in sorted(ends.items()):
        offsets.add_metric([topic, partition], end)
        counts[topic] = counts.get(topic, 0) + 1
    for topic, count in counts.items():
        partitions.add_metric([topic], count)
    yield offsets
    yield partitions


def monitor_registry(
    latest: Callable[[], dict[str, Any] | None],
) -> tuple[CollectorRegistry, Counter]:
    """A registry of its own (not the process's default: the monitor is not a worker), and the
    counter of failed collections."""
    registry = CollectorRegistry()
    registry.register(SnapshotMetrics(latest))
    errors = Counter(
        "interest_monitor_collect_errors",
        "Collections that failed (Kafka or Redis unreachable)",
        registry=registry,
    )
    return registry, errors
