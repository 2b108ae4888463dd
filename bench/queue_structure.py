"""Which Redis structure holds a priority queue's waiting jobs? (issue 12)

Two candidates, each measured by the Redis server's own CPU time per job
(``INFO commandstats``: ``usec`` of the commands each uses), which the machine's
noise hardly moves, and by wall time from one client:

* ``lists``: one list per priority level (what eventbus uses). Enqueue: ``LPUSH``
  onto the level's list. Take: a script that ``LMOVE``s up to 32 jobs into a
  processing list, most urgent level first (as ``QUEUE_TAKE``).
* ``zset``: one sorted set scored ``(max_level - level) * 2^32 + counter`` (as
  BullMQ orders priorities; a lower score is taken first). Enqueue: a script that
  ``INCR``s the counter and ``ZADD``s. Take: a script that ``ZPOPMIN``s up to 32
  and ``LPUSH``es them into a processing list.

Both then clear the processing list with one ``LREM`` per job (as acks do).
``--jobs`` (default 50,000) jobs of ~100 bytes over 3 levels, on a private
redis-server on a loopback port. Prints µs of Redis CPU per job for enqueue and
take, and wall-clock jobs/s.

    .venv/bin/python bench/queue_structure.py [--jobs N] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import redis

from eventbus.testing import RedisServer

TAKE_LISTS = """
local out = {}
for level = #KEYS, 2, -1 do
  for _ = 1, tonumber(ARGV[1]) do
    if #out >= tonumber(ARGV[1]) then break end
    local job = redis.call('LMOVE', KEYS[level], KEYS[1], 'RIGHT', 'LEFT')
    if not job then break end
    out[#out + 1] = job
  end
end
return out
"""

ENQUEUE_ZSET = """
local n = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) * 4294967296 + n, ARGV[2])
return n
"""

TAKE_ZSET = """
local popped = redis.call('ZPOPMIN', KEYS[1], tonumber(ARGV[1]))
local out = {}
for i = 1, #popped, 2 do
  redis.call('LPUSH', KEYS[2], popped[i])
  out[#out + 1] = popped[i]
end
return out
"""

LEVELS = 3
BATCH = 32


def cpu_usec(r: redis.Redis) -> float:
    stats: dict[str, Any] = r.info("commandstats")
    return float(sum(v["usec"] for v in stats.values()))


def run_lists(r: redis.Redis, jobs: list[tuple[int, bytes]]) -> tuple[float, float, float]:
    take = r.register_script(TAKE_LISTS)
    keys = ["proc"] + [f"q:{level}" for level in range(LEVELS)]
    r.config_resetstat()
    start = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for i, (level, job) in enumerate(jobs):
        pipe.lpush(f"q:{level}", job)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    enqueue_cpu = cpu_usec(r)
    taken = 0
    while True:
        got = take(keys=keys, args=[BATCH])
        if not got:
            break
        pipe = r.pipeline(transaction=False)
        for job in got:
            pipe.lrem("proc", -1, job)
        pipe.execute()
        taken += len(got)
    wall = time.perf_counter() - start
    assert taken == len(jobs), taken
    total = cpu_usec(r)
    return enqueue_cpu / len(jobs), (total - enqueue_cpu) / len(jobs), len(jobs) / wall


def run_zset(r: redis.Redis, jobs: list[tuple[int, bytes]]) -> tuple[float, float, float]:
    enqueue = r.register_script(ENQUEUE_ZSET)
    take = r.register_script(TAKE_ZSET)
    r.config_resetstat()
    start = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for i, (level, job) in enumerate(jobs):
        enqueue(keys=["z", "counter"], args=[LEVELS - 1 - level, job], client=pipe)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    enqueue_cpu = cpu_usec(r)
    taken = 0
    while True:
        got = take(keys=["z", "proc"], args=[BATCH])
        if not got:
            break
        pipe = r.pipeline(transaction=False)
        for job in got:
            pipe.lrem("proc", -1, job)
        pipe.execute()
        taken += len(got)
    wall = time.perf_counter() - start
    assert taken == len(jobs), taken
    total = cpu_usec(r)
    return enqueue_cpu / len(jobs), (total - enqueue_cpu) / len(jobs), len(jobs) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    jobs = [
        (i % LEVELS, b'{"eventbus":1,"id":"%032d","data":{"n":%d,"pad":"%s"}}' % (i, i, b"x" * 40))
        for i in range(min(opts.jobs, 1_000_000))
    ]
    results: dict[str, list[tuple[float, float, float]]] = {"lists": [], "zset": []}
    with RedisServer() as server:
        r = redis.Redis.from_url(server.url)
        for _ in range(opts.repeats):
            for name, fn in (("lists", run_lists), ("zset", run_zset)):
                r.flushall()
                results[name].append(fn(r, jobs))
        server_version = r.info("server")["redis_version"]
    print(
        f"{len(jobs)} jobs over {LEVELS} levels, redis {server_version}, medians of {opts.repeats}"
    )
    print(f"{'structure':<10} {'enqueue µs/job':>15} {'take+ack µs/job':>16} {'jobs/s (wall)':>14}")
    for name, rows in results.items():
        enq, take, rate = (statistics.median(col) for col in zip(*rows, strict=True))
        print(f"{name:<10} {enq:>15.2f} {take:>16.2f} {rate:>14,.0f}")


if __name__ == "__main__":
    main()
