"""`FairQueue.estimates` against the replay it replaced: the same positions and ETAs on random queues.

The oracle below is the replay as it was before estimates were made cheap (one full replay per
call, batches gathered by forking the tree for every look-ahead); it lives here, not in the app,
as the reference the faster computation must equal exactly. One change: it could loop forever when
two devices were idle while a third ran the job its owner's next one waits for (see the test
below), so an idle device now waits for the first event that frees an owner's slot, which is the
time it chose whenever it ended."""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from generation.queue import BATCH_LOOKAHEAD, Estimate, FairQueue, Job, Submission, rate_key
from generation.request import GenerationRequest, JobState
from generation.settings import QueueSettings

# -- the oracle: the replay as it was ----------------------------------------------------------


def oracle_estimates(queue: FairQueue) -> dict[str, Estimate]:
    tree = queue._tree
    result = oracle_replay(queue, tree.fork())
    held = [job for job in queue._jobs.values()
            if job.state is JobState.QUEUED and tree.is_paused(job.guild_id)]
    if held:
        resumed = tree.fork()
        for guild in resumed.paused_guilds():
            resumed.resume(guild)
        places = oracle_replay(queue, resumed)
        result.update((job.id, Estimate(places[job.id].position if job.id in places else None,
                                        None, paused=True)) for job in held)
    return result


def oracle_replay(queue: FairQueue, tree) -> dict[str, Estimate]:
    now = queue._clock()
    events = []
    for order, device in enumerate(queue._throughput):
        running = [job for job in queue._jobs.values()
                   if job.state is JobState.RUNNING and job.device == device]
        batches: dict[float | None, list[Job]] = {}
        for job in running:
            batches.setdefault(job.started_at, []).append(job)
        busy, measured = 0.0, True
        for batch in batches.values():
            seconds, known = oracle_duration(queue, device, batch)
            busy, measured = busy + seconds, measured and known
        began = min((job.started_at or now for job in running), default=now)
        events.append((max(now, began + busy), order, device, [j.owner_id for j in running], measured))
    heapq.heapify(events)
    order = len(events)
    result: dict[str, Estimate] = {}
    unplaced = Counter(job.batch_key for job in queue._jobs.values() if job.state is JobState.QUEUED)
    while events and len(result) < len(queue):
        at, _, device, freed, measured = heapq.heappop(events)
        for owner in freed:
            tree.release(owner)
        head = tree.pop()
        order += 1
        if head is None:
            # The one change: it waited for the first event (`events[0]`) and so, when that was
            # another idle device, the two woke each other forever; wait for the first that frees a slot.
            freeing = [event for event in events if event[3]]
            if not freeing:
                break
            wake = min(freeing)
            heapq.heappush(events, (wake[0], order, device, [], wake[4]))
            continue
        unplaced[head.batch_key] -= 1
        batch = oracle_gather(tree, head, queue._settings.max_batch_images, unplaced[head.batch_key])
        unplaced[head.batch_key] -= len(batch) - 1
        for job in batch:
            result[job.id] = Estimate(len(result) + 1, at - now, measured=measured)
        seconds, known = oracle_duration(queue, device, batch)
        heapq.heappush(events, (at + seconds, order, device, [j.owner_id for j in batch], measured and known))
    return result


def oracle_duration(queue: FairQueue, device: str, batch: list[Job]) -> tuple[float, bool]:
    cost = sum(job.cost for job in batch)
    rate = queue.rate(rate_key(batch))
    if rate is None:
        return cost / queue._throughput.get(device, queue._initial_throughput), False
    return cost / rate, True


def oracle_gather(tree, head: Job, max_images: int, compatible: float = math.inf) -> list[Job]:
    batch, images = [head], head.request.count
    ahead = tree.fork() if images < max_images and compatible > 0 else None
    for _ in range(BATCH_LOOKAHEAD if ahead else 0):
        job = ahead.pop()
        if job is None or images >= max_images or len(batch) > compatible:
            break
        if job.batch_key == head.batch_key and images + job.request.count <= max_images and tree.is_head(job):
            tree.take(job)
            batch.append(job)
            images += job.request.count
    return batch


# -- random queues -----------------------------------------------------------------------------

MEMBERS = [(guild, owner) for guild in (None, 1, 2, 3) for owner in range(1, 5)] + [(1, 9), (2, 9)]
# (member, role weight, steps, side, images, model): few distinct values, so that jobs batch.
jobs = st.tuples(st.sampled_from(MEMBERS), st.sampled_from([1.0, 2.0, 4.0]), st.sampled_from([10, 20, 25]),
                 st.sampled_from([512, 768]), st.integers(1, 4), st.sampled_from(["sd15", "sdxl"]))
# What happens to the queue, in any order: a submission, a batch dispatched on a device, the oldest
# running batch ends (and its batch rate may be measured), a few batches are served start to end
# (virtual time moves on), a queued job is cancelled, a guild is paused or resumed, time passes.
events = st.one_of(
    st.tuples(st.just("submit"), jobs),
    st.tuples(st.just("serve"), st.integers(1, 6)),
    st.tuples(st.just("dispatch"), st.integers(0, 2), st.integers(1, 8)),
    st.tuples(st.just("finish"), st.floats(0.1, 30.0), st.booleans()),
    st.tuples(st.just("cancel"), st.integers(0, 200)),
    st.tuples(st.just("pause"), st.sampled_from([1, 2, 3]), st.sampled_from([True, True, False])),
    st.tuples(st.just("wait"), st.floats(0.0, 20.0)),
)


def run(coroutine):
    return asyncio.run(coroutine)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    submitted=st.lists(jobs, min_size=3, max_size=40),
    happened=st.lists(events, max_size=60),
    devices=st.integers(1, 3),
    running_cap=st.integers(1, 3),
    max_batch=st.integers(1, 8),
    in_flight=st.lists(st.integers(0, 2), max_size=3),
    operator_hold=st.booleans(),
)
def test_estimates_equal_the_full_replay_on_random_queues(
    submitted, happened, devices, running_cap, max_batch, in_flight, operator_hold
):
    """`in_flight`: devices that take one more batch at the end and are still running it."""
    now = [1000.0]
    queue_settings = QueueSettings(max_queued_per_user=1000, max_queued_total=10_000,
                                   max_running_per_user=running_cap, max_batch_images=max_batch)
    names = [f"cuda:{i}" for i in range(devices)]
    queue = FairQueue(queue_settings, names, initial_throughput=7.0, clock=lambda: now[0])

    def submit(job) -> None:
        (guild, owner), weight, steps, side, count, model = job
        request = GenerationRequest(prompt="a bench", model=model, steps=steps, guidance=7.0, seed=1,
                                    width=side, height=side, count=count)
        run(queue.submit(Submission(request, owner, guild, weight)))

    for job in submitted:
        submit(job)
    running: list[tuple[str, list[Job], float]] = []
    for event in happened:
        match event:
            case ("submit", job):
                submit(job)
            case ("dispatch", device, images):
                if batch := queue.next_batch(names[device % devices], images):
                    running.append((names[device % devices], batch, now[0]))
            case ("finish", seconds, measured) if running:
                device, batch, began = running.pop(0)
                now[0] = max(now[0], began + seconds)
                if measured:
                    run(queue.record_batch(device, batch, seconds))
                for job in batch:
                    queue.finish(job, JobState.DONE)
            case ("serve", batches):
                for _ in range(batches):
                    for job in queue.next_batch(names[0], max_batch):
                        queue.finish(job, JobState.DONE)
            case ("cancel", index):
                waiting = [job for job in queue._jobs.values() if job.state is JobState.QUEUED]
                if waiting:
                    job = waiting[index % len(waiting)]
                    queue.cancel(job.id, by=job.owner_id)
            case ("pause", guild, paused):
                (queue.pause if paused else queue.resume)(guild)
            case ("wait", seconds):
                now[0] += seconds
    for device in in_flight:
        queue.next_batch(names[device % devices], max_batch)
    if operator_hold:
        queue.pause()
    expected = oracle_estimates(queue)
    assert queue.estimates() == expected
    assert len(expected) == len(queue)


def test_two_idle_devices_wait_for_the_busy_one_whose_owner_is_next():
    """The old replay looped forever here: the only waiting job's owner runs a job on cuda:0, so
    cuda:1 and cuda:2 find nothing to start and each waited for the first event, the other one."""
    queue = FairQueue(QueueSettings(), ("cuda:0", "cuda:1", "cuda:2"), initial_throughput=10.0,
                      clock=lambda: 0.0)
    request = GenerationRequest(prompt="a lighthouse", model="sd15", steps=20, guidance=7.0, seed=1,
                               width=512, height=512)
    first, second = (run(queue.submit(Submission(request, 1, 7))) for _ in range(2))
    assert queue.next_batch("cuda:0", 1) == [first]
    assert queue.estimates() == {second.id: Estimate(1, first.cost / 10.0)}
