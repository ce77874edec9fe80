"""What a fetch costs the embedded broker, and what its fetch wait adds to latency.

    python bench/broker_requests.py [--rate 5000] [--seconds 8] [--waits 50,10,200]
                                    [--prefill 0] [--prefill-batches 0]

For each fetch wait in --waits, on a new 4-partition topic of the embedded stack (`interest
up`'s launcher): produces --rate small keyed records/s, a `send()` each, in 10 ms ticks, and
reads them back as they arrive with aiokafka at that ``fetch_max_wait_ms``; prints the fetches
per second that returned records (empty ones are not counted), records per such fetch, the
produce -> read delay (p50, p99) and the broker's CPU in cores over the producing span.
--prefill writes that many records to the topic first, in large batches (does a longer log cost
more per fetch?); --prefill-batches writes that many one-record batches first, spread over the
partitions (does the number of stored batches?). The second is what a latency run piles up: its
producer sends one batch per partition every 10 ms, and the worker one per partition per
micro-batch.

Why it matters: on two shared cores, every request the broker serves takes CPU from the
worker; bench/stream.py's latency run reads with a 10 ms fetch wait besides the worker's own
fetches and sends. Apache Kafka answers a fetch as soon as data arrives; what this measures is
the embedded broker's behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: streams/

from broker_growth import cpu_seconds  # bench/broker_growth.py, beside this script

TICK_SECONDS = 0.01
PARTITIONS = 4


async def measure(
    bootstrap: str,
    broker_pid: int,
    topic: str,
    wait_ms: int,
    rate: float,
    seconds: float,
    prefill: int,
    prefill_batches: int = 0,
) -> str:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    await producer.start()
    pending = []
    for i in range(prefill):
        pending.append(await producer.send(topic, b"prefill", key=str(i % 6040).encode()))
        if len(pending) >= 5000:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    pending = []
    for i in range(prefill_batches):  # one record per batch: the broker stores each apart
        batch = producer.create_batch()
        batch.append(key=b"prefill", value=b"prefill", timestamp=None)
        pending.append(await producer.send_batch(batch, topic, partition=i % PARTITIONS))
        if len(pending) >= 200:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, fetch_max_wait_ms=wait_ms, enable_auto_commit=False
    )
    await consumer.start()
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(partitions)
    await consumer.seek_to_end(*partitions)
    delays_ms: list[float] = []
    fetches = 0
    stop = asyncio.Event()

    async def reader() -> None:
        nonlocal fetches
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200)
            now_ms = 1000 * time.time()
            fetches += bool(batches)
            for records in batches.values():
                for record in records:
                    if record.value != b"prefill":  # the broker may place the end one batch early
                        delays_ms.append(now_ms - float(record.value))

    reading = asyncio.create_task(reader())
    await asyncio.sleep(1.0)
    cpu_start, started = cpu_seconds(broker_pid), time.perf_counter()
    sent = 0
    total = int(rate * seconds)
    while sent < total:
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        while sent < due:
            value = f"{1000 * time.time():.3f}".encode()
            await producer.send(topic, value, key=str(sent % 6040).encode())
            sent += 1
        await asyncio.sleep(TICK_SECONDS)
    elapsed = time.perf_counter() - started
    cpu = (cpu_seconds(broker_pid) - cpu_start) / elapsed
    await producer.flush()
    await asyncio.sleep(0.5)
    stop.set()
    await reading
    await producer.stop()
    await consumer.stop()
    if len(delays_ms) < 2:
        return f"fetch wait {wait_ms:4d} ms: {len(delays_ms)} records read back; nothing to report"
    cuts = statistics.quantiles(delays_ms, n=100)
    return (
        f"fetch wait {wait_ms:4d} ms, prefill {prefill:,} records / {prefill_batches:,} batches:"
        f" {fetches / elapsed:5.0f} fetches/s,"
        f" {len(delays_ms) / max(fetches, 1):5.0f} records per fetch, delay p50 {cuts[49]:.1f}"
        f" / p99 {cuts[98]:.1f} ms, broker {cpu:.2f} cores"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=5000, help="records per second")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--waits", default="50,10,200", help="fetch_max_wait_ms values, in order")
    ap.add_argument("--prefill", type=int, default=0, help="records in each topic beforehand")
    ap.add_argument(
        "--prefill-batches",
        type=int,
        default=0,
        help="one-record batches in each topic beforehand",
    )
    args = ap.parse_args()
    try:
        waits = [int(w) for w in args.waits.split(",")]
    except ValueError:
        sys.exit(f"error: --waits takes integers separated by commas, not {args.waits!r}")
    from streams.stack import start_stack, stop_stack

    home = Path(tempfile.mkdtemp(prefix="broker-requests-"))
    info = start_stack(home)
    try:
        for i, wait_ms in enumerate(waits):
            line = asyncio.run(
                measure(
                    info.bootstrap_servers,
                    info.broker_pid,
                    f"requests-{i}",
                    wait_ms,
                    args.rate,
                    args.seconds,
                    args.prefill,
                    args.prefill_batches,
                )
            )
            print(line, flush=True)
    finally:
        stop_stack(home)


if __name__ == "__main__":
    main()
