"""Packing one batch's Redis write-script call: redis-py's asyncio packer (Python) against
the hiredis packer the worker's connections use (streams/store.py HiredisPacking).

    python bench/redis_pack.py [--users 500] [--rounds 3]

The call is shaped like StateStore.write_batch's for ``--users`` users (two keys and nine
arguments each, 256-byte vector and memory). Prints the median of 50 packs per round, the two
packers interleaved, and checks that they produce the same bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio

from streams.store import with_hiredis_packing


def write_call(users: int) -> list[object]:
    args: list[object] = ["EVALSHA", "a" * 40, 3 + 2 * users, "p", "e", "o"]
    args += [f"is:{kind}:{{u{u}}}" for u in range(users) for kind in ("user", "window")]
    entry = b'{"event_id":"e1","item_id":"123","event_type":"click","timestamp":1}'
    for _ in range(users):
        args += [b'{"clicks/0":1}', "append", entry, 200, b'{"clicks/0":2}']
        args += [os.urandom(256), os.urandom(256), "v1-abcdef", b'["1","2","3"]']
    return args


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    call = write_call(args.users)
    python = redis.asyncio.Connection()
    fast = with_hiredis_packing(redis.asyncio.Redis()).connection_pool.connection_class()
    assert b"".join(python.pack_command(*call)) == b"".join(fast.pack_command(*call))
    print(f"{len(call)} arguments, {sum(map(len, fast.pack_command(*call))):,} bytes")
    for r in range(args.rounds):
        row = []
        for name, conn in (("python", python), ("hiredis", fast)):
            times = []
            for _ in range(50):
                t = time.perf_counter()
                conn.pack_command(*call)
                times.append(time.perf_counter() - t)
            row.append(f"{name} {statistics.median(times) * 1000:.2f} ms")
        print(f"round {r + 1}: " + ", ".join(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
