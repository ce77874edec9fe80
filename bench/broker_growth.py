"""Does the embedded broker's CPU grow with its topic's length at a constant load?

    python bench/broker_growth.py [--rate 2000] [--seconds 40]

Produces ``--rate`` small records/s to one topic of the embedded stack (`interest up`'s
launcher) and reads them back as they arrive, and prints the broker's CPU share per 5 s window
against the records in the topic. No worker, no Redis traffic: what grows is the broker's.

Why it matters: bench/stream.py measures latency after a 150,000-event backlog and its 150,000
recommendations are in the broker, at half the worker's rate, beside the worker on two cores;
a broker whose cost per request grows with the log takes more of those cores as the run goes
on (bench/README.md has the numbers). Apache Kafka serves fetches from an offset index, so
this is a property of the embedded broker's memory storage, not of Kafka. The records go in
as many small batches, and it is their count that costs, not the records or bytes:
`bench/broker_requests.py --prefill-batches` against `--prefill`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WINDOW_SECONDS = 5.0
RECORD = b'{"event_id":"e","user_id":"u1","item_id":"1193","event_type":"click","timestamp":1}'


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(bootstrap: str, broker_pid: int, rate: float, seconds: float) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    consumer = AIOKafkaConsumer(
        "growth", bootstrap_servers=bootstrap, fetch_max_wait_ms=10, auto_offset_reset="earliest"
    )
    await producer.start()
    await consumer.start()
    read = 0

    async def reader() -> None:
        nonlocal read
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            read += sum(len(records) for records in batches.values())

    reading = asyncio.create_task(reader())
    started = mark = time.perf_counter()
    cpu_mark = cpu_seconds(broker_pid)
    sent = 0
    try:
        while (now := time.perf_counter()) - started < seconds:
            while sent < int((now - started) * rate):
                await producer.send("growth", RECORD, key=str(sent % 100).encode())
                sent += 1
            await asyncio.sleep(0.01)
            if now - mark >= WINDOW_SECONDS:
                cpu = cpu_seconds(broker_pid)
                share = 100 * (cpu - cpu_mark) / (now - mark)
                print(
                    f"t {now - started:4.0f} s: {sent:7,} records in the topic, {read:7,} read;"
                    f" broker CPU {share:5.1f}% of a core",
                    flush=True,
                )
                mark, cpu_mark = now, cpu
    finally:
        reading.cancel()
        await producer.stop()
        await consumer.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=2000, help="records per second")
    ap.add_argument("--seconds", type=float, default=40)
    args = ap.parse_args()
    from streams.stack import start_stack, stop_stack

    home = Path(tempfile.mkdtemp(prefix="broker-growth-"))
    info = start_stack(home)
    try:
        asyncio.run(measure(info.bootstrap_servers, info.broker_pid, args.rate, args.seconds))
    finally:
        stop_stack(home)


if __name__ == "__main__":
    main()
