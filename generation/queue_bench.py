"""`atelier bench queue`: what the fair-share queue costs, and how fair a simulated day is.

1. Cost per operation with N jobs queued from U users: submit, dispatch (`next_batch` with batching
   on), finish, and the positions and ETAs of every job (`estimates`): the copy of the queue the
   event loop takes, and the replay of that copy, which the studio runs on a worker thread.
2. A simulated day (virtual clock, no GPU): heavy users who keep their queue full, light users who
   submit now and then, moderators with a 2x role weight, a few guilds of different sizes. It
   reports Jain's fairness index over users' served cost relative to their hierarchical weighted
   max-min fair share (1.0 is perfectly fair), p50/p95 wait per user class and GPU utilisation,
   for the fair queue and for first-come-first-served with the same caps, as a baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import math
import random
import statistics
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from generation.queue import FairQueue, Job, Submission
from generation.request import JobState
from generation.request import GenerationRequest
from generation.settings import QueueSettings

_STEPS = (20, 25, 30, 40)
_SIZES = ((512, 512), (512, 768), (768, 768))
_COUNTS = (1, 2, 4)


def _requests(rng: random.Random, n: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt="a bench", model="sd15", steps=rng.choice(_STEPS), guidance=7.0, seed=1,
            width=w, height=h, count=rng.choice(_COUNTS),
        )
        for w, h in (rng.choice(_SIZES) for _ in range(n))
    ]


def _micros(samples: list[float]) -> str:
    samples = sorted(samples)
    p = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] * 1e6  # noqa: E731
    return f"mean {statistics.fmean(samples) * 1e6:7.1f} us   p50 {p(0.5):7.1f} us   p99 {p(0.99):7.1f} us"


async def _operation_costs(jobs: int, users: int, guilds: int, rounds: int, rng: random.Random) -> None:
    per_user = math.ceil(jobs / users)
    settings = QueueSettings(max_queued_per_user=per_user + 1, max_queued_total=jobs + users)
    queue = FairQueue(settings, devices=("cuda:0",))
    variants = _requests(rng, 64)
    submissions = [
        Submission(rng.choice(variants), owner, owner % guilds, rng.choice((1.0, 1.0, 2.0)))
        for owner in range(users)
    ]
    for i in range(jobs):
        await queue.submit(submissions[i % users])
    submit, dispatch, finish = [], [], []
    for _ in range(rounds):  # steady state: every dispatched job is replaced
        began = time.perf_counter()
        batch = queue.next_batch("cuda:0", max_images=8)
        dispatch.append(time.perf_counter() - began)
        for job in batch:
            began = time.perf_counter()
            queue.finish(job, JobState.DONE)
            finish.append(time.perf_counter() - began)
            sub = Submission(rng.choice(variants), job.owner_id, job.guild_id, job.weight)
            began = time.perf_counter()
            await queue.submit(sub)
            submit.append(time.perf_counter() - began)
    copies, replays = [], []
    for _ in range(3):
        began = time.perf_counter()
        replay = queue.replay()
        copied = time.perf_counter()
        replay.run()
        copies.append(copied - began)
        replays.append(time.perf_counter() - copied)
    print(f"## operation cost, {len(queue):,} jobs queued from {users:,} users in {guilds} guilds")
    print(f"submit      {_micros(submit)}")
    print(f"next_batch  {_micros(dispatch)}   (batching on, up to 8 images)")
    print(f"finish      {_micros(finish)}")
    print(f"estimates   {min(copies) * 1e3:7.1f} ms on the event loop (the copy), "
          f"{min(replays) * 1e3:.1f} ms on a worker thread (the replay): every position and ETA (best of 3)")
    inline = await _longest_stall(lambda: asyncio.sleep(0, queue.estimates()))  # computed by the call
    threaded = await _longest_stall(lambda: asyncio.to_thread(queue.replay().run))
    print(f"            the event loop's longest stall meanwhile: {inline * 1e3:.1f} ms replaying on the loop, "
          f"{threaded * 1e3:.1f} ms with the replay on a worker thread (as the studio does)")


async def _longest_stall(estimate: Callable[[], Awaitable[object]]) -> float:
    """The longest gap between ticks of a 1 ms timer on the loop while `estimate` runs three times."""
    gaps, done = [], False

    async def tick() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last - 0.001)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    for _ in range(3):
        await estimate()
        await asyncio.sleep(0.005)  # the ticker measures each run on its own
    done = True
    await ticker
    return max(gaps)


# -- the simulated day --------------------------------------------------------------------------


@dataclass(frozen=True)
class _User:
    id: int
    guild: int
    kind: str  # "heavy", "light" or "moderator"
    weight: float


class _FirstComeFirstServed:
    """The baseline: one FIFO line with the same per-user caps (what most bots do)."""

    def __init__(self, settings: QueueSettings) -> None:
        self._settings, self._line, self._seq = settings, deque[Job](), 0
        self._queued, self._running = Counter[int](), Counter[int]()

    async def submit(self, sub: Submission) -> Job:
        if self._queued[sub.owner_id] >= self._settings.max_queued_per_user:
            raise ValueError("cap")
        self._seq += 1
        job = Job(str(self._seq), sub.request, sub.owner_id, sub.guild_id, sub.weight, self._seq)
        self._line.append(job)
        self._queued[sub.owner_id] += 1
        return job

    def next_batch(self, device: str, max_images: int) -> list[Job]:
        for job in self._line:
            if self._running[job.owner_id] < self._settings.max_running_per_user:
                self._line.remove(job)
                self._queued[job.owner_id] -= 1
                self._running[job.owner_id] += 1
                return [job]
        return []

    def finish(self, job: Job, state: JobState) -> None:
        self._running[job.owner_id] -= 1


def _population(guild_sizes: list[int], heavy: int, rng: random.Random) -> list[_User]:
    users, uid = [], 0
    for guild, size in enumerate(guild_sizes):
        for i in range(size):
            kind = "moderator" if i < 2 else "light"
            users.append(_User(uid, guild, kind, 2.0 if kind == "moderator" else 1.0))
            uid += 1
    for i in range(heavy):  # heavy users concentrate in the first guilds
        users.append(_User(uid, i % 2, "heavy", 1.0))
        uid += 1
    return users


async def _simulate_day(
    make_queue: Callable[[QueueSettings], object],
    users: list[_User],
    devices: int,
    throughput: float,
    hours: float,
    light_every_s: float,
    seed: int,
) -> dict:
    """Discrete-event simulation: light users submit by a Poisson process, heavy users refill their
    queue whenever one of their jobs starts; each device serves batches at `throughput` cost units
    per second (no batching speed-up assumed)."""
    rng = random.Random(seed)
    settings = QueueSettings(max_queued_per_user=5, max_running_per_user=1, max_queued_total=10_000)
    queue = make_queue(settings)
    variants = _requests(rng, 64)
    end = hours * 3600.0
    now = 0.0
    submitted_at: dict[int, float] = {}
    submitted: Counter[int] = Counter()
    waits: defaultdict[str, list[float]] = defaultdict(list)
    served: Counter[int] = Counter()
    by_id = {u.id: u for u in users}
    busy_s = 0.0
    events: list[tuple[float, int, str, object]] = []  # (time, order, what, payload)
    order = 0

    def schedule(at: float, what: str, payload: object) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (at, order, what, payload))

    async def submit(user: _User) -> bool:
        request = rng.choice(variants)
        try:
            job = await queue.submit(Submission(request, user.id, user.guild, user.weight))
        except Exception:  # refused by a cap: a real user would try later
            return False
        submitted_at[id(job)] = now
        submitted[user.id] += request.cost
        return True

    for user in users:
        if user.kind == "heavy":
            for _ in range(settings.max_queued_per_user):
                await submit(user)
        else:
            schedule(rng.expovariate(1 / light_every_s), "arrive", user)
    idle = list(range(devices))
    while True:
        while idle and (batch := queue.next_batch(f"cuda:{idle[-1]}", 8)):
            device = idle.pop()
            cost = sum(job.cost for job in batch)
            schedule(now + cost / throughput, "done", (device, batch))
            busy_s += min(cost / throughput, max(0.0, end - now))
            for job in batch:
                user = by_id[job.owner_id]
                waits[user.kind].append(now - submitted_at.pop(id(job)))
                served[user.id] += job.cost
                if user.kind == "heavy":
                    await submit(user)
        if not events or events[0][0] >= end:
            break
        now, _, what, payload = heapq.heappop(events)
        if what == "arrive":
            await submit(payload)
            schedule(now + rng.expovariate(1 / light_every_s), "arrive", payload)
        else:
            device, batch = payload
            for job in batch:
                queue.finish(job, JobState.DONE)
            idle.append(device)
    return {"waits": waits, "served": served, "submitted": submitted, "utilisation": busy_s / (devices * end)}


def _fair_shares(users: list[_User], capacity: float, demand: Counter[int]) -> dict[int, float]:
    """Hierarchical weighted max-min fair shares: guilds split `capacity` equally by water-filling
    their total demand, then each guild splits its part among its users by weight."""
    heavy = {u.id for u in users if u.kind == "heavy"}
    want = {u.id: math.inf if u.id in heavy else demand[u.id] for u in users}
    guilds: defaultdict[int, list[_User]] = defaultdict(list)
    for user in users:
        guilds[user.guild].append(user)
    guild_share = _water_fill(capacity, {g: sum(want[u.id] for u in us) for g, us in guilds.items()}, None)
    shares = {}
    for guild, members in guilds.items():
        weights = {u.id: u.weight for u in members}
        shares |= _water_fill(guild_share[guild], {u.id: want[u.id] for u in members}, weights)
    return shares


def _water_fill(capacity: float, demand: dict[int, float], weight: dict[int, float] | None) -> dict[int, float]:
    share, left = {}, dict(demand)
    while left:
        total = sum(weight[k] if weight else 1.0 for k in left)
        offer = {k: capacity * (weight[k] if weight else 1.0) / total for k in left}
        satisfied = [k for k in left if left[k] <= offer[k]]
        if not satisfied:
            return share | offer
        for k in satisfied:
            share[k] = left.pop(k)
            capacity -= share[k]
    return share


def _jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def _report_day(name: str, result: dict, users: list[_User]) -> None:
    served, capacity = result["served"], sum(result["served"].values())
    fair = _fair_shares(users, capacity, result["submitted"])
    ratio = {u.id: served[u.id] / fair[u.id] for u in users if fair[u.id] > 0}
    heavy = [ratio[u.id] for u in users if u.kind == "heavy"]
    print(
        f"{name:<24} Jain {_jain(list(ratio.values())):.4f} (all users), {_jain(heavy):.4f} (heavy users);"
        f" GPU utilisation {result['utilisation']:.1%}"
    )
    for kind in ("light", "moderator", "heavy"):
        waits = sorted(result["waits"][kind])
        if waits:
            p50, p95 = waits[len(waits) // 2], waits[min(len(waits) - 1, int(0.95 * len(waits)))]
            print(f"  {kind:<10} wait p50 {p50:8.1f} s   p95 {p95:8.1f} s   ({len(waits):,} jobs)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atelier bench queue", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs queued for the cost test")
    parser.add_argument("--users", type=int, default=1_000, help="users for the cost test")
    parser.add_argument("--guilds", type=int, default=20, help="guilds for the cost test")
    parser.add_argument("--rounds", type=int, default=2_000, help="dispatches measured")
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours of traffic")
    parser.add_argument("--devices", type=int, default=1, help="simulated GPUs")
    parser.add_argument("--throughput", type=float, default=20.0, help="cost units/s per GPU")
    parser.add_argument("--guild-sizes", default="60,25,10,5", help="light users per guild")
    parser.add_argument("--heavy", type=int, default=3, help="users who keep their queue full")
    parser.add_argument("--light-every", type=float, default=1800.0, help="mean s between a light user's jobs")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    asyncio.run(_operation_costs(args.jobs, args.users, args.guilds, args.rounds, random.Random(args.seed)))
    users = _population([int(n) for n in args.guild_sizes.split(",")], args.heavy, random.Random(args.seed))
    print(
        f"\n## a simulated {args.hours:g} h day: {len(users)} users in {len(args.guild_sizes.split(','))} "
        f"guilds ({args.heavy} heavy), {args.devices} GPU(s) at {args.throughput:g} units/s"
    )
    for name, make in (("fair queue (SFQ)", FairQueue), ("first come first served", _FirstComeFirstServed)):
        began = time.perf_counter()
        result = asyncio.run(
            _simulate_day(make, users, args.devices, args.throughput, args.hours, args.light_every, args.seed)
        )
        _report_day(name, result, users)
        print(f"  (simulated in {time.perf_counter() - began:.1f} s)")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
