"""The Faust worker: a thin agent that takes batches from the fetch sink and submits them to
the `BatchPipeline`.

Everything with logic lives in plain modules (stages, processor, scheduler, store, the
recommenders); this file only wires them to Faust: topics, consumer settings, the producer and
credentials.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import faust
from faust.types import TP, AppT, Message

from streams.events import Source
from streams.health import Readiness, serve_health
from streams.logs import logging_config
from streams.messages import RawMessage
from streams.metrics import report_assignment
from streams.model_watch import ModelWatcher, load_recommender
from streams.processor import BatchProcessor
from streams.publish import BatchPublisher, create_producer
from streams.recommend import Recommender
from streams.redis_client import connect
from streams.scheduler import BatchPipeline
from streams.settings import Settings
from streams.store import StateStore
from streams.topics import ensure_topics
from streams.transport import attach_fetch_sink

log = logging.getLogger(__name__)


def _credentials(settings: Settings) -> object | None:
    options = settings.kafka_client_options()
    if settings.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=options["sasl_plain_password"],
            mechanism=settings.sasl_mechanism,
            ssl_context=options.get("ssl_context"),
        )
    if settings.security_protocol == "SSL":
        return faust.SSLCredentials(options["ssl_context"])
    return None


def create_app(
    settings: Settings,
    datadir: Path,
    recommender: Recommender | None = None,
    readiness: Readiness | None = None,
) -> AppT:
    """The faust app with its one agent. ``readiness`` (the health port's) is set while the
    agent runs."""
    readiness = readiness or Readiness()
    app = faust.App(
        settings.group_id,
        # Consumed through the fetch sink attached below (streams/transport.py).
        broker=f"kafka://{settings.bootstrap_servers}",
        broker_credentials=_credentials(settings),
        datadir=str(datadir),
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.kafka_session_timeout_seconds,
        broker_max_poll_interval=settings.kafka_max_poll_interval_seconds,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        # A fetch is the fetch sink's unit of delivery, and the group drops a member that has
        # not polled within the poll interval. Bounding a fetch to two batches keeps polls
        # frequent even when processing is slow.
        broker_max_poll_records=settings.batch_size * 2,
        web_enabled=False,
        key_serializer="raw",
        value_serializer="raw",
    )
    sink = attach_fetch_sink(
        app,
        settings.input_topics,
        # The consumer reads ahead at most one fetch's worth (two batches): more held
        # messages only mean more consumer work competing with the batches for the GIL.
        max_messages=app.conf.broker_max_poll_records,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
    )
    source_topic = app.topic(*settings.input_topics, key_type=bytes, value_type=bytes)
    watcher = ModelWatcher(settings, recommender or load_recommender(settings))
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="inference")

    @app.on_partitions_assigned.connect
    async def count_assigned(sender: AppT, assigned: set[TP], **kwargs: Any) -> None:
        # The whole new assignment (faust's rebalances are eager): what this member now owns.
        report_assignment(settings.input_topics, (tp.topic for tp in assigned))

    @app.agent(source_topic, name="interest-events")
    async def interest_events(stream: faust.StreamT) -> None:
        client = connect(settings)
        producer = create_producer(settings, client_id=f"{settings.group_id}-worker")
        await producer.start()
        publisher = BatchPublisher(producer, settings.kafka_delivery_timeout_seconds)
        processor = BatchProcessor(
            settings, StateStore(client, settings), watcher.current, publisher, executor
        )

        def raw(messages: Sequence[Message]) -> list[RawMessage]:
            return [
                RawMessage(m.key, m.value, Source(m.topic, m.partition, m.offset, _ms(m)))
                for m in messages
            ]

        pipeline = BatchPipeline(processor, on_committed=sink.ack, on_fatal=exit_unacked)
        watching = asyncio.create_task(watcher.watch())  # loads rolled-out bundles
        readiness.model_version = watcher.current.model_version
        readiness.ready = True
        try:
            # Up to three batches in flight, a stage apart (BatchPipeline); the consumer
            # meanwhile fetches into the sink's bounded queue. The agent's stream is never
            # iterated: the sink is its source.
            while True:
                # Room first, then take: what arrives while the pipeline is full joins the next
                # batch. While no batch is being computed, take what is there at once rather
                # than wait for a batch to fill.
                if sink.rebalanced():
                    # Partitions moved: drop every cached user once no batch uses the caches.
                    await pipeline.drain()
                    processor.drop_caches()
                await pipeline.wait_for_room()
                messages = await sink.take(
                    settings.batch_size,
                    settings.batch_within_seconds,
                    flush=pipeline.computing_idle,
                )
                # Between batches: pick up a rolled-out model once it has loaded. Batches
                # already in flight may then be recommended by it too; recommendation events
                # carry the version that made them, and a state of another version is rebuilt.
                processor.recommender = watcher.refresh()
                readiness.model_version = processor.recommender.model_version
                try:
                    await pipeline.submit(raw(messages), messages)
                except Exception:
                    exit_unacked()
                del messages  # unacked messages are weakly tracked
        finally:
            # Shutting down mid-batch: unacked events replay on restart.
            readiness.ready = False
            watching.cancel()
            watcher.close()
            pipeline.cancel()
            await producer.stop()
            await client.aclose()

    return app


def _ms(message: Message) -> int | None:
    """The record's Kafka timestamp in epoch ms (faust gives seconds; None without one)."""
    return round(message.timestamp * 1000) if message.timestamp else None


def exit_unacked() -> NoReturn:
    """Exit at once, acking nothing: the unapplied batch replays on restart.

    Why not raise: faust would log the crash and go on consuming, and acking later batches
    would commit the offsets of this one, which was never applied.
    """
    log.exception("unexpected error; exiting so the batch is replayed")
    logging.shutdown()
    os._exit(70)


# Collect the youngest generation every 50,000 net allocations instead of 700 (see tune_gc).
GC_THRESHOLDS = (50_000, 10, 100)


def tune_gc() -> None:
    """Fewer, larger cyclic-GC passes, and none over what was loaded at startup.

    Why: the worker keeps many long-lived objects (per-user caches) and allocates many
    short-lived ones per event, and CPython's default thresholds (700, 10, 10) rescan the
    long-lived ones over and over, each full pass a pause on the hot path (`bench/batch.py
    --default-gc` compares). Reference counting still frees everything at once; the cycle
    collector only has to find cycles, which the hot path rarely makes. Startup objects
    (modules, the model) are frozen out of every pass.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def create_worker(app: AppT, settings: Settings) -> faust.Worker:
    worker = faust.Worker(
        app, loglevel=settings.log_level, logging_config=logging_config(settings), quiet=True
    )
    # faust's terminal spinner sets the root logger to DEBUG so that every record turns it:
    # every log.debug in aiokafka (one per message sent) then builds a LogRecord that the
    # handlers drop, a visible share of the worker's time under load.
    worker.spinner = None
    return worker


def run_worker(settings: Settings) -> None:
    """Block running the worker until SIGINT/SIGTERM (Faust shuts down gracefully)."""
    readiness = Readiness()
    if settings.metrics_port:
        serve_health(settings.metrics_port, readiness)
    ensure_topics(settings)
    datadir = Path(tempfile.mkdtemp(prefix="interest-worker-"))
    try:
        app = create_app(settings, datadir, readiness=readiness)
        worker = create_worker(app, settings)
        tune_gc()
        worker.execute_from_commandline()
    finally:
        shutil.rmtree(datadir, ignore_errors=True)
