"""`atelier bench storage`: write rates and history latency through the real storage API.

A benchmark, not a test: it prints figures for docs/PERFORMANCE.md and asserts nothing. The big
table is bulk-filled in one transaction (executemany) so that a million rows take seconds; the
measured operations then go through `create_job`, `start_job`/`finish_job` and `history`,
each one a committed (fsynced) transaction as in the bot.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from generation.request import GenerationRequest, new_job_id
from storage.db import Database
from storage.jobs import create_job, finish_job, history, start_job
from storage.settings import StorageSettings

_REQUEST = GenerationRequest(prompt="a lighthouse at dusk, oil painting", model="sd15", steps=25,
                             guidance=7.0, seed=1, width=512, height=512)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atelier bench storage", description=__doc__)
    parser.add_argument("--jobs", type=int, default=1_000_000,
                        help="jobs in the database while measuring (default 1,000,000)")
    parser.add_argument("--users", type=int, default=10_000, help="distinct job owners")
    parser.add_argument("--writes", type=int, default=1_000,
                        help="jobs created and then run through start/finish")
    parser.add_argument("--queries", type=int, default=1_000, help="history queries timed")
    parser.add_argument("--dir", type=Path, default=None,
                        help="folder for the throw-away database (default: the system temp dir)")
    args = parser.parse_args(argv)
    for name in ("jobs", "users", "writes", "queries"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    with tempfile.TemporaryDirectory(prefix="atelier-bench-", dir=args.dir) as folder:
        rows = asyncio.run(_measure(StorageSettings(data_dir=Path(folder)), args))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


async def _measure(settings: StorageSettings, args: argparse.Namespace) -> list[tuple[str, str]]:
    rng = random.Random(0)
    async with Database.open(settings) as db:
        started = time.perf_counter()
        await _bulk_fill(db, args.jobs, args.users)
        fill_s = time.perf_counter() - started

        started = time.perf_counter()
        jobs = [await create_job(db, _REQUEST, owner_id=rng.randrange(args.users), channel_id=1,
                                 guild_id=1) for _ in range(args.writes)]
        insert_s = time.perf_counter() - started

        started = time.perf_counter()
        for job in jobs:
            await start_job(db, job.id, device="cuda:0")
            await finish_job(db, job.id)
        update_s = time.perf_counter() - started

        latencies_ms = []
        for _ in range(args.queries):
            started = time.perf_counter()
            await history(db, rng.randrange(args.users), limit=20)
            latencies_ms.append((time.perf_counter() - started) * 1000)
    p50, p95 = (statistics.quantiles(latencies_ms, n=100)[q - 1] for q in (50, 95))
    return [
        ("jobs in database", f"{args.jobs + args.writes:,} ({args.users:,} owners)"),
        ("bulk fill (one transaction)", f"{fill_s:.1f} s"),
        ("create_job, sequential", f"{args.writes / insert_s:,.0f} jobs/s"),
        ("start_job + finish_job", f"{2 * args.writes / update_s:,.0f} state updates/s"),
        ("history page of 20", f"p50 {p50:.2f} ms, p95 {p95:.2f} ms ({args.queries} queries)"),
    ]


async def _bulk_fill(db: Database, count: int, users: int) -> None:
    request_json = _REQUEST.model_dump_json()
    now = db.now()

    def rows() -> Iterator[tuple[object, ...]]:
        rng = random.Random(1)
        for n in range(count):
            at = now - (count - n)  # one job a second, oldest first
            yield (new_job_id(), request_json, rng.randrange(users), 1, 1, at, at, at + 1,
                   _REQUEST.cost)

    async with db.writing() as connection:
        await connection.executemany(
            "INSERT INTO jobs (id, request, owner_id, guild_id, channel_id, state, created_at,"
            " started_at, finished_at, cost, device) VALUES (?, ?, ?, ?, ?, 'done', ?, ?, ?, ?,"
            " 'cuda:0')", rows())
