"""One snapshot of the system for operators, taken every interval: the `/api/status` document.

Per group and input partition: committed and end offsets, lag in messages and in time, and a
status (streams/monitor/status.py). For the whole system: events in and recommendations out
per second (from end offsets, so every worker counts), dead letters per second by reason and
the latency through the workers (streams/monitor/tail.py), the model versions in use and their
live hit rate (the workers' online counters in Redis, over the last window). The last ten
minutes of totals are kept for the page's charts.

Blocking I/O (kafka-python, redis-py): the server runs `collect` in a thread. A failure (Kafka
or Redis unreachable) becomes the snapshot's one-line ``error``; the next interval tries again.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from kafka.errors import KafkaError

from common.errors import UserError
from streams.lag import OffsetReader, PartitionLag
from streams.monitor.status import Sample, evaluate, worst
from streams.monitor.tail import OutputTail
from streams.redis_client import client_options
from streams.settings import Settings
from streams.store import KeyLayout

HISTORY_SECONDS = 600
# Rates are taken over this span of samples: short enough to follow a change, long enough to
# smooth one slow fetch.
RATE_SECONDS = 10.0


@dataclass
class _Series:
    """Samples of a quantity over time, oldest first, bounded by age."""

    max_age_ms: int
    points: deque[tuple[int, Any]] = field(default_factory=deque)

    def add(self, at_ms: int, value: Any) -> None:
        self.points.append((at_ms, value))
        while self.points and self.points[0][0] < at_ms - self.max_age_ms:
            self.points.popleft()

    def rate(self, span_ms: float) -> float | None:
        """Per-second increase over about the last ``span_ms`` (None: too few samples)."""
        if len(self.points) < 2:
            return None
        newest_at, newest = self.points[-1]
        for at, value in self.points:
            if at >= newest_at - span_ms:
                if at == newest_at:
                    return None
                return max(0.0, (newest - value) / ((newest_at - at) / 1000))
        return None


class Collector:
    """Takes snapshots (module docstring); one instance per monitor, used from one thread."""

    def __init__(
        self,
        settings: Settings,
        groups: Sequence[str],
        interval_seconds: float,
        window: int = 10,
    ) -> None:
        self.settings = settings
        self.groups = list(groups)
        self.interval_seconds = interval_seconds
        self.window = window
        self._reader: OffsetReader | None = None
        self._tail: OutputTail | None = None
        self._redis = redis.Redis.from_url(
            settings.redis_url, socket_timeout=5, **client_options(settings)
        )
        self._online_key = KeyLayout(settings.redis_key_prefix).online
        age = HISTORY_SECONDS * 1000
        self._partitions: dict[tuple[str, str, int], deque[Sample]] = {}
        self._events_in = _Series(age)
        self._recs_out = _Series(age)
        self._online = _Series(age)
        self._history: deque[dict[str, Any]] = deque(
            maxlen=max(1, int(HISTORY_SECONDS / interval_seconds))
        )

    def close(self) -> None:
        self._drop_kafka()
        self._redis.close()

    def collect(self) -> dict[str, Any]:
        """A snapshot now (the /api/status document)."""
        now_ms = int(time.time() * 1000)
        errors: list[str] = []
        groups: list[dict[str, Any]] = []
        try:
            groups = self._groups(now_ms, errors)
            self._tail_outputs(now_ms)
        except (KafkaError, UserError, OSError) as exc:
            self._drop_kafka()
            errors.insert(0, _kafka_message(self.settings, exc))
        models = self._models(now_ms, errors)
        snapshot = {
            "generated_at": now_ms,
            "interval_seconds": self.interval_seconds,
            "bootstrap_servers": self.settings.bootstrap_servers,
            "error": "; ".join(errors) or None,
            "groups": groups,
            "rates": self._rates(),
            "latency": self._latency(),
            "models": models,
        }
        self._history.append(_history_point(snapshot))
        snapshot["history"] = _columns(self._history)
        return snapshot

    def _kafka(self) -> tuple[OffsetReader, OutputTail]:
        if self._reader is None or self._tail is None:
            self._drop_kafka()
            self._reader = OffsetReader(self.settings)
            self._tail = OutputTail(self.settings, window_seconds=60.0)
        return self._reader, self._tail

    def _drop_kafka(self) -> None:
        for client in (self._reader, self._tail):
            if client is not None:
                # Closing a client that lost its broker may fail too.
                with contextlib.suppress(Exception):
                    client.close()
        self._reader, self._tail = None, None

    def _groups(self, now_ms: int, errors: list[str]) -> list[dict[str, Any]]:
        reader, _ = self._kafka()
        out = [self._group(reader, group, now_ms, errors) for group in self.groups]
        # Every group reads the input topics' end offsets already: the first group's serve.
        self._events_in.add(now_ms, sum(p["end"] for p in out[0]["partitions"]) if out else 0)
        outputs = reader.end_offsets(reader.partitions([self.settings.topic_recommendations]))
        self._recs_out.add(now_ms, sum(outputs.values()))
        return out

    def _group(
        self, reader: OffsetReader, group: str, now_ms: int, errors: list[str]
    ) -> dict[str, Any]:
        rows = reader.group_lag(group, self.settings.input_topics)
        members = reader.members(group)
        if rows and all(row.committed is None for row in rows) and not members:
            errors.append(
                f"consumer group {group!r} has committed no offsets: an unknown group, or no"
                " worker has committed yet"
            )
        partitions = [self._partition(group, row, members, now_ms) for row in rows]
        waits = [p["lag_seconds"] for p in partitions if p["lag_seconds"] is not None]
        return {
            "group": group,
            "members": members,
            "status": worst([p["status"] for p in partitions]),
            "lag": sum(p["lag"] for p in partitions),
            "lag_seconds": max(waits, default=None),
            "partitions": partitions,
        }

    def _partition(
        self, group: str, row: PartitionLag, members: int | None, now_ms: int
    ) -> dict[str, Any]:
        history = self._partitions.setdefault(
            (group, row.topic, row.partition),
            deque(maxlen=max(self.window * 4, 2)),
        )
        # Without a commit the group would start at the oldest record kept: its position.
        position = row.committed if row.committed is not None else row.start
        history.append(Sample(now_ms, position, row.end))
        verdict = evaluate(list(history), self.window, members)
        lag_seconds = row.lag_seconds(now_ms)
        return {
            "topic": row.topic,
            "partition": row.partition,
            "committed": row.committed,
            "end": row.end,
            "lag": row.lag,
            "lag_seconds": None if lag_seconds is None else round(lag_seconds, 3),
            "status": verdict.status,
            "reason": verdict.reason,
        }

    def _tail_outputs(self, now_ms: int) -> None:
        _, tail = self._kafka()
        tail.poll(now_ms)

    def _rates(self) -> dict[str, Any]:
        # At least two intervals, so a slow interval still has an earlier sample in the span.
        span = max(RATE_SECONDS, 2.5 * self.interval_seconds) * 1000
        letters = Counter(reason for _, reason in (self._tail.dead_letters if self._tail else ()))
        window = self._tail.window_ms / 1000 if self._tail else 60.0
        return {
            "events_in_per_s": _round(self._events_in.rate(span)),
            "recommendations_out_per_s": _round(self._recs_out.rate(span)),
            "dead_letters_per_s": {r: round(n / window, 3) for r, n in sorted(letters.items())},
        }

    def _latency(self) -> dict[str, Any]:
        outputs = self._tail.outputs if self._tail else ()
        latencies = [o.latency_ms for o in outputs if o.latency_ms is not None]
        p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (None, None)
        return {
            "p50_ms": _round(p50),
            "p99_ms": _round(p99),
            "samples": len(latencies),
            "window_seconds": self._tail.window_ms / 1000 if self._tail else 60.0,
        }

    def _models(self, now_ms: int, errors: list[str]) -> list[dict[str, Any]]:
        """Versions seen in the recommendations of the window, with their share, and each
        version's online hits over the window (the workers' counters in Redis)."""
        try:
            raw = self._redis.hgetall(self._online_key)
        except redis.RedisError as exc:
            errors.append(f"cannot read Redis at {self.settings.redis_url} ({type(exc).__name__})")
            raw = None
        if raw is not None:
            self._online.add(now_ms, {k.decode(): int(v) for k, v in raw.items()})
        seen = Counter(o.model_version for o in (self._tail.outputs if self._tail else ()))
        delta = self._online_delta()
        versions = sorted(set(seen) | {name.split(":", 1)[1] for name in delta})
        total = sum(seen.values())
        rows = []
        for version in versions:
            events, hits = delta.get(f"events:{version}", 0), delta.get(f"hits:{version}", 0)
            rows.append(
                {
                    "version": version,
                    "share": round(seen[version] / total, 4) if total else None,
                    "events": events,
                    "hits": hits,
                    "hit_rate": round(hits / events, 4) if events else None,
                }
            )
        return rows

    def _online_delta(self) -> dict[str, int]:
        """Counter increases over the last minute (a counter first seen counts from zero)."""
        points = self._online.points
        if not points:
            return {}
        newest_at, newest = points[-1]
        oldest = next((v for at, v in points if at >= newest_at - 60_000), newest)
        if oldest is newest and len(points) > 1:
            oldest = points[-2][1]
        return {k: v - oldest.get(k, 0) for k, v in newest.items() if v - oldest.get(k, 0) > 0}


def _kafka_message(settings: Settings, exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    return f"cannot read Kafka at {settings.bootstrap_servers} ({type(exc).__name__}: {exc})"


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def _history_point(snapshot: dict[str, Any]) -> dict[str, Any]:
    groups = snapshot["groups"]
    waits = [g["lag_seconds"] for g in groups if g["lag_seconds"] is not None]
    return {
        "t": snapshot["generated_at"],
        "lag": sum(g["lag"] for g in groups) if groups else None,
        "lag_seconds": max(waits, default=None),
        "events_in_per_s": snapshot["rates"]["events_in_per_s"],
        "recommendations_out_per_s": snapshot["rates"]["recommendations_out_per_s"],
        "p50_ms": snapshot["latency"]["p50_ms"],
        "p99_ms": snapshot["latency"]["p99_ms"],
    }


def _columns(points: deque[dict[str, Any]]) -> dict[str, list[Any]]:
    """The history as one list per field, as the page's charts read it."""
    names = ("t", "lag", "lag_seconds", "events_in_per_s", "recommendations_out_per_s")
    names += ("p50_ms", "p99_ms")
    return {name: [point[name] for point in points] for name in names}
