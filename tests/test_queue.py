"""The fair-share queue: SFQ fairness bounds, FIFO, caps, cancellation, batching, ETA, restore."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from generation.queue import (
    BATCH_LOOKAHEAD,
    MAX_RERUNS,
    FairQueue,
    Job,
    Refused,
    Submission,
    role_weight,
)
from generation.request import GenerationRequest, JobState
from generation.settings import QueueSettings

ROOMY = QueueSettings(max_queued_per_user=10_000, max_queued_total=100_000)


def request(steps: int = 10, count: int = 1, side: int = 512, model: str = "sd15") -> GenerationRequest:
    return GenerationRequest(
        prompt="a lighthouse", model=model, steps=steps, guidance=7.0, seed=1, width=side, height=side,
        count=count,
    )


def submit(queue: FairQueue, owner: int, guild: int | None = 1, weight: float = 1.0, **kw) -> Job:
    return asyncio.run(queue.submit(Submission(request(**kw), owner, guild, weight)))


def dispatch_all(queue: FairQueue) -> list[Job]:
    """Dispatch one job at a time, finishing each at once (one device, no batching)."""
    order = []
    while batch := queue.next_batch("cpu", max_images=1):
        (job,) = batch
        order.append(job)
        queue.finish(job, JobState.DONE)
    return order


# -- fairness --------------------------------------------------------------------------------

guild_users = st.lists(  # users -> (weight, job costs as steps)
    st.tuples(st.sampled_from([0.5, 1.0, 2.0, 3.0]), st.lists(st.integers(1, 60), min_size=5, max_size=30)),
    min_size=1, max_size=3,
)
flows = st.lists(guild_users, min_size=1, max_size=3)  # guilds -> users


Flow = tuple[int, int]  # (guild, owner)


def submit_flows(queue: FairQueue, guilds: list) -> tuple[dict[Flow, list[Job]], dict[Flow, float]]:
    """Submit every user's jobs (owner g * 10 + u of guild g); their jobs and weights by flow."""
    jobs_of, weight = {}, {}
    for g, users in enumerate(guilds):
        for u, (w, steps_list) in enumerate(users):
            owner = g * 10 + u
            weight[(g, owner)] = w
            jobs_of[(g, owner)] = [submit(queue, owner, g, w, steps=s) for s in steps_list]
    return jobs_of, weight


def assert_within_sfq_bound(
    jobs_of: dict[Flow, list[Job]], weight: dict[Flow, float], left: Counter,
    served: Counter, guild_served: Counter,
) -> None:
    """SFQ's fairness theorem at one instant: two guilds with jobs left differ in served cost by
    at most one largest job of each; two such users of one guild, in cost per unit weight."""
    biggest = {flow: max(j.cost for j in jobs) for flow, jobs in jobs_of.items()}
    guild_biggest = Counter()
    for (g, _), cost in biggest.items():
        guild_biggest[g] = max(guild_biggest[g], cost)
    busy_guilds = sorted({g for (g, _), n in left.items() if n > 0})
    for a, b in itertools.combinations(busy_guilds, 2):
        assert abs(guild_served[a] - guild_served[b]) <= guild_biggest[a] + guild_biggest[b] + 1e-9
    busy = [f for f in left if left[f] > 0]
    for a, b in itertools.combinations(busy, 2):
        if a[0] == b[0]:
            bound = biggest[a] / weight[a] + biggest[b] / weight[b]
            assert abs(served[a] - served[b]) <= bound + 1e-9


@settings(max_examples=40, deadline=None)
@given(flows)
def test_backlogged_flows_get_weighted_shares_within_the_sfq_bound(guilds):
    """SFQ's fairness theorem, at every dispatch: for two flows backlogged so far, the served
    cost per unit weight differs by at most one largest job of each (guilds weight 1, users
    their weight, measured within the guild)."""
    queue = FairQueue(ROOMY)
    jobs_of, weight = submit_flows(queue, guilds)
    left = Counter({flow: len(jobs) for flow, jobs in jobs_of.items()})
    served, guild_served = Counter(), Counter()
    while batch := queue.next_batch("cpu", max_images=1):
        (job,) = batch
        flow = (job.guild_id, job.owner_id)
        served[flow] += job.cost / weight[flow]
        guild_served[job.guild_id] += job.cost
        left[flow] -= 1
        queue.finish(job, JobState.DONE)
        assert_within_sfq_bound(jobs_of, weight, left, served, guild_served)



def test_shares_converge_to_role_weights_hierarchically():
    """Two guilds split the GPU evenly even though one has three users; inside it, a 2x member
    gets twice the others' share."""
    queue = FairQueue(ROOMY)
    for _ in range(200):
        submit(queue, 1, guild=1, steps=20)
        for owner, w in ((2, 2.0), (3, 1.0), (4, 1.0)):
            submit(queue, owner, guild=2, weight=w, steps=20)
    served = Counter()
    for _ in range(400):
        (job,) = queue.next_batch("cpu", 1)
        served[job.owner_id] += job.cost
        queue.finish(job, JobState.DONE)
    total = sum(served.values())
    assert served[1] / total == pytest.approx(0.5, abs=0.01)
    assert served[2] / total == pytest.approx(0.25, abs=0.01)
    assert served[3] / total == pytest.approx(0.125, abs=0.01)
    assert served[4] / total == pytest.approx(0.125, abs=0.01)


def test_role_weight_takes_the_largest_listed_role():
    weights = {"moderator": 2.0, "supporter": 1.5, "muted": 0.5}
    assert role_weight(weights, ["supporter", "moderator", "everyone"]) == 2.0
    assert role_weight(weights, ["muted"]) == 0.5
    assert role_weight(weights, ["everyone"]) == 1.0


# -- starvation and idle credit ---------------------------------------------------------------

@pytest.mark.parametrize("light_guild", [1, 2], ids=["same guild", "other guild"])
def test_one_job_waits_at_most_one_job_behind_fifty(light_guild):
    queue = FairQueue(ROOMY)
    for _ in range(50):
        submit(queue, 1, guild=1, steps=50)
    first = queue.next_batch("cpu", 1)
    light = submit(queue, 2, guild=light_guild, steps=50)
    queue.finish(first[0], JobState.DONE)
    assert queue.next_batch("cpu", 1) == [light]


@pytest.mark.parametrize("newcomer_guild", [1, 2], ids=["same guild", "other guild"])
def test_a_flow_that_was_idle_gets_no_credit_for_it(newcomer_guild):
    queue = FairQueue(ROOMY)
    for _ in range(100):
        submit(queue, 1, steps=10)
    for _ in range(60):  # user 1 alone for a long time
        (job,) = queue.next_batch("cpu", 1)
        queue.finish(job, JobState.DONE)
    for _ in range(30):
        submit(queue, 2, guild=newcomer_guild, steps=10)
    owners = [j.owner_id for j in dispatch_all(queue)[:20]]
    assert max(len(list(run)) for _, run in itertools.groupby(owners)) == 1  # they alternate


# -- FIFO, caps, cancellation: random operation sequences ---------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(0, 5), st.integers(1, 40)),
        st.tuples(st.just("dispatch"), st.integers(1, 4), st.just(0)),
        st.tuples(st.just("finish"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("cancel"), st.integers(0, 200), st.booleans()),
    ),
    max_size=80,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations, st.integers(1, 2))
def test_random_operations_keep_caps_fifo_and_dispatch_each_job_once(ops, running_cap):
    caps = QueueSettings(max_queued_per_user=3, max_running_per_user=running_cap, max_queued_total=8)

    async def scenario() -> None:
        queue = FairQueue(caps, devices=("cuda:0", "cuda:1"))
        accepted: list[Job] = []
        cancelled: set[str] = set()
        dispatched: list[Job] = []
        running: list[Job] = []
        for op, a, b in ops:
            if op == "submit":
                before = len(queue)
                try:
                    accepted.append(await queue.submit(Submission(request(steps=b), a, a % 2)))
                except Refused as refusal:
                    assert len(queue) == before and str(refusal)
            elif op == "dispatch":
                batch = queue.next_batch(f"cuda:{a % 2}", max_images=a)
                dispatched += batch
                running += batch
            elif op == "finish" and running:
                queue.finish(running.pop(a % len(running)), JobState.DONE)
            elif op == "cancel" and accepted:
                job = accepted[a % len(accepted)]
                if queue.get(job.id) is not None:
                    queue.cancel(job.id, by=job.owner_id + (0 if b else 100), moderator=not b)
                    if job.state is JobState.CANCELLED:
                        cancelled.add(job.id)
            queued = Counter(j.owner_id for j in accepted if j.state is JobState.QUEUED)
            active = Counter(j.owner_id for j in running)
            assert all(n <= caps.max_queued_per_user for n in queued.values())
            assert all(n <= running_cap for n in active.values())
            assert queued.total() == len(queue) <= caps.max_queued_total
        while running:  # then everything drains
            queue.finish(running.pop(), JobState.DONE)
        rest = dispatch_all(queue)
        dispatched += rest
        ids = [j.id for j in dispatched]
        assert len(ids) == len(set(ids))
        assert set(ids) == {j.id for j in accepted} - cancelled
        assert not set(ids) & cancelled
        for owner in {j.owner_id for j in accepted}:
            mine = [j.seq for j in dispatched if j.owner_id == owner]
            assert mine == sorted(mine)

    asyncio.run(scenario())


def test_refusals_say_what_was_wrong_and_change_nothing():
    queue = FairQueue(QueueSettings(max_queued_per_user=2, max_queued_total=3))
    submit(queue, 1)
    submit(queue, 1)
    with pytest.raises(Refused, match=r"you already have 2 jobs queued \(the limit is 2\); wait"):
        submit(queue, 1)
    submit(queue, 2)
    with pytest.raises(Refused, match=r"the queue is full \(3 jobs waiting"):
        submit(queue, 3)
    assert len(queue) == 3
    queue.drain()
    with pytest.raises(Refused, match="takes no new jobs"):
        submit(queue, 4)


async def test_the_queues_caps_and_the_moderators_limits_are_told_together():
    async def limits(sub: Submission) -> list[str]:
        return ["Your limit here is 15 steps; you asked for 20.",
                "Your limit here is 1 images per request; you asked for 2."] if sub.request.count > 1 else []

    queue = FairQueue(QueueSettings(max_queued_per_user=1, max_queued_total=1), limits=limits)
    await queue.submit(Submission(request(), 1, 1))
    with pytest.raises(Refused) as refused:
        await queue.submit(Submission(request(count=2), 1, 1))
    assert str(refused.value) == (
        "This request cannot run here, for 4 reasons:\n"
        "- You already have 1 jobs queued (the limit is 1); wait for one to finish or cancel one\n"
        "- The queue is full (1 jobs waiting, the limit); try again in a few minutes\n"
        "- Your limit here is 15 steps; you asked for 20.\n"
        "- Your limit here is 1 images per request; you asked for 2.")
    assert len(refused.value.reasons) == 4 and len(queue) == 1


async def test_moderator_limits_and_persistence_plug_in():
    persisted, seen = [], []

    async def limits(sub: Submission) -> list[str]:
        seen.append(sub)
        return ["you used your 100 images for today (the limit is 100)"] if sub.owner_id == 9 else []

    async def persist(job: Job) -> None:
        persisted.append(job.id)
        if job.owner_id == 8:
            raise OSError("disk full")

    queue = FairQueue(ROOMY, limits=limits, persist=persist)
    with pytest.raises(Refused, match="100 images"):
        await queue.submit(Submission(request(), 9, 1, role_ids=(5,)))
    with pytest.raises(OSError):
        await queue.submit(Submission(request(), 8, 1))
    assert len(queue) == 0 and seen[0].role_ids == (5,)
    job = await queue.submit(Submission(request(), 7, 1))
    assert persisted[-1] == job.id and queue.get(job.id) is job and len(queue) == 1


def test_submissions_are_serialized_across_the_limit_check():
    """Two concurrent submits while the limit check awaits cannot both pass the per-user cap."""

    async def slow_limits(sub: Submission) -> list[str]:
        await asyncio.sleep(0.01)
        return []

    async def scenario() -> list:
        queue = FairQueue(QueueSettings(max_queued_per_user=1), limits=slow_limits)
        return await asyncio.gather(
            *(queue.submit(Submission(request(), 1, 1)) for _ in range(3)), return_exceptions=True
        )

    outcomes = asyncio.run(scenario())
    assert sum(isinstance(o, Job) for o in outcomes) == 1
    assert sum(isinstance(o, Refused) for o in outcomes) == 2


def test_cancel_by_owner_or_moderator_only():
    queue = FairQueue(ROOMY)
    queued, running = submit(queue, 1), submit(queue, 2)
    queue.pause()
    with pytest.raises(Refused, match="only the member who asked"):
        queue.cancel(queued.id, by=2)
    queue.resume()
    (head,) = queue.next_batch("cpu", 1)
    assert head is queued
    other = submit(queue, 3)
    assert queue.cancel(other.id, by=3).state is JobState.CANCELLED and len(queue) == 1
    cancelled = queue.cancel(head.id, by=42, moderator=True)
    assert cancelled.state is JobState.RUNNING and cancelled.cancel_reason == "cancelled by a moderator"
    queue.finish(head, JobState.CANCELLED)
    with pytest.raises(Refused, match="no queued or running job"):
        queue.cancel(head.id, by=1)
    with pytest.raises(ValueError, match="cannot finish twice"):
        queue.finish(head, JobState.DONE)
    assert [j.id for j in dispatch_all(queue)] == [running.id]


async def test_pause_holds_dispatch_but_accepts_and_drain_finishes_the_queue():
    queue = FairQueue(ROOMY)
    queue.pause()
    job = await queue.submit(Submission(request(), 1, 1))
    assert queue.next_batch("cpu", 4) == []
    waiter = asyncio.create_task(queue.wait_batch("cpu", 4))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    queue.drain()
    queue.resume()
    assert await asyncio.wait_for(waiter, 1) == [job]
    idle = asyncio.create_task(queue.wait_idle())
    await asyncio.sleep(0.01)
    assert not idle.done()
    queue.finish(job, JobState.DONE)
    await asyncio.wait_for(idle, 1)


# -- pausing one guild -------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(
    st.lists(guild_users, min_size=2, max_size=3), st.integers(0, 60), st.lists(st.integers(0, 999), max_size=6)
)
def test_a_paused_guild_yields_to_the_others_and_resumes_without_catch_up_credit(guilds, held, cancels):
    """Guild 0 paused for `held` dispatches: only the others' jobs run, and its queued jobs can be
    cancelled. Resumed, it competes as a newly active flow: from then on every two backlogged
    guilds stay within SFQ's bound (a burst of credit for the pause would break it), and inside
    each guild users keep their weighted shares and their submission order throughout."""
    queue = FairQueue(ROOMY)
    jobs_of, weight = submit_flows(queue, guilds)
    queue.pause(0)
    assert queue.is_paused(0) and not queue.is_paused(1) and not queue.is_paused()
    paused_jobs = [j for (g, _), jobs in jobs_of.items() if g == 0 for j in jobs]
    cancelled = {paused_jobs[i % len(paused_jobs)] for i in cancels}
    for job in cancelled:
        assert queue.cancel(job.id, by=job.owner_id).state is JobState.CANCELLED
    left = Counter({flow: sum(j not in cancelled for j in jobs) for flow, jobs in jobs_of.items()})
    served, guild_served, dispatched = Counter(), Counter(), []

    def dispatch() -> Job | None:
        batch = queue.next_batch("cpu", max_images=1)
        if not batch:
            return None
        (job,) = batch
        flow = (job.guild_id, job.owner_id)
        served[flow] += job.cost / weight[flow]
        left[flow] -= 1
        dispatched.append(job)
        queue.finish(job, JobState.DONE)
        return job

    for _ in range(held):
        job = dispatch()
        if job is None:
            break
        assert job.guild_id != 0
    queue.resume(0)
    while job := dispatch():
        guild_served[job.guild_id] += job.cost
        assert_within_sfq_bound(jobs_of, weight, left, served, guild_served)
    for flow, jobs in jobs_of.items():  # each job not cancelled runs once, in submission order
        mine = [j for j in dispatched if (j.guild_id, j.owner_id) == flow]
        assert mine == [j for j in jobs if j not in cancelled]


def test_a_resumed_guild_alternates_with_the_busy_one_instead_of_catching_up():
    queue = FairQueue(ROOMY)
    for _ in range(50):
        submit(queue, 1, guild=1, steps=10)
        submit(queue, 2, guild=2, steps=10)
    queue.pause(1)
    held = []
    for _ in range(30):
        (job,) = queue.next_batch("cpu", 1)
        held.append(job.guild_id)
        queue.finish(job, JobState.DONE)
    assert held == [2] * 30
    queue.resume(1)
    guilds = [j.guild_id for j in dispatch_all(queue)[:40]]
    assert max(len(list(run)) for _, run in itertools.groupby(guilds)) == 1  # they alternate


async def test_a_guild_pause_and_the_operators_hold_are_lifted_separately():
    queue = FairQueue(ROOMY)
    queue.pause(1)
    mine = await queue.submit(Submission(request(), 1, 1))  # submissions are still accepted
    waiter = asyncio.create_task(queue.wait_batch("cpu", 4))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    queue.pause()
    queue.resume(1)
    await asyncio.sleep(0.01)
    assert not waiter.done() and queue.is_paused() and not queue.is_paused(1)
    queue.pause(1)
    queue.resume()  # ending the hold leaves guild 1 paused
    await asyncio.sleep(0.01)
    assert not waiter.done() and queue.is_paused(1)
    queue.resume(1)
    assert await asyncio.wait_for(waiter, 1) == [mine]


def test_estimates_leave_out_a_paused_guild_as_if_its_jobs_were_not_there():
    """Positions and ETAs of the other guilds equal those of a queue that never had guild 1's
    jobs; guild 1's queued jobs are estimated as paused, with the places they would have on resume
    but no start time, and the snapshot marks them paused."""

    def fill(queue: FairQueue, with_guild_1: bool) -> tuple[list[Job], list[Job]]:
        others, mine = [], []
        for i in range(6):
            if with_guild_1:
                mine.append(submit(queue, 1, guild=1, steps=30 + i))
            others.append(submit(queue, 2 + i % 2, guild=2, steps=10 + 5 * i))
            others.append(submit(queue, 4, guild=None, steps=20))
        return others, mine

    paused, plain, running = (FairQueue(ROOMY, clock=lambda: 0.0) for _ in range(3))
    paused.pause(1)
    running.pause(1)
    (others, mine), (expected_others, _) = fill(paused, True), fill(plain, False)
    _, mine_running = fill(running, True)
    running.resume(1)
    estimates, expected, unpaused = paused.estimates(), plain.estimates(), running.estimates()
    assert len(estimates) == len(paused) == 18
    assert [estimates[j.id] for j in others] == [expected[j.id] for j in expected_others]
    # Guild 1's jobs have the places they would have if its moderators resumed now, and no time;
    # the pause itself stays (the replay resumed a fork).
    held_places = [estimates[j.id].position for j in mine]
    assert held_places == [unpaused[j.id].position for j in mine_running]
    assert all(estimates[j.id].paused and estimates[j.id].starts_in_s is None for j in mine)
    snap = paused.snapshot()
    held = [v for v in snap.queued if v.guild_id == 1]
    assert len(held) == 6 and all(v.paused and v.starts_in_s is None for v in held)
    assert [v.position for v in held] == sorted(held_places)
    assert not snap.paused and not any(v.paused for v in snap.queued if v.guild_id != 1)
    assert [v.guild_id for v in snap.queued[-6:]] == [1] * 6  # listed after every job that can start
    assert paused.is_paused(1) and paused.next_batch("cpu", 8)[0].guild_id != 1


# -- batching --------------------------------------------------------------------------------

def test_compatible_jobs_batch_and_incompatible_ones_wait_their_turn():
    queue = FairQueue(ROOMY)
    a = submit(queue, 1, steps=20)
    b = submit(queue, 2, steps=30)  # other step count: another batch key
    c = submit(queue, 3, steps=20)
    d = submit(queue, 4, steps=20, model="sd21")
    e = submit(queue, 5, steps=20, count=3)
    assert queue.next_batch("cpu", max_images=4) == [a, c]  # e does not fit in 4 images
    assert queue.next_batch("cpu", max_images=4) == [b]
    assert queue.next_batch("cpu", max_images=8, max_pixels=3 * 512 * 512) == [d]
    assert queue.next_batch("cpu", max_images=1) == [e]  # the head always goes, alone


def test_a_memory_bound_counts_the_work_an_x4_image_takes_not_its_input_pixels():
    queue = FairQueue(ROOMY)
    x4 = GenerationRequest.model_validate(
        request(side=256).model_dump() | {"kind": "upscale", "init_image": "ab" * 32, "upscale_factor": 4})
    jobs = [asyncio.run(queue.submit(Submission(x4, owner, 1, 1.0))) for owner in (1, 2)]
    # Two 256x256 inputs are fewer pixels than one 512x512 image, but each x4 image is the UNet work
    # of about 22 of them: the bound learned from 512x512 images lets one through at a time.
    assert len(queue.next_batch("cpu", max_images=8, max_pixels=2 * 512 * 512)) == 1
    assert len(queue.next_batch("cpu", max_images=8, max_pixels=64 * 512 * 512)) == 1  # the other
    assert {j.state for j in jobs} == {JobState.RUNNING}


def test_batching_only_reaches_a_few_fair_picks_ahead():
    queue = FairQueue(ROOMY)
    head = submit(queue, 0, steps=20)
    for owner in range(1, BATCH_LOOKAHEAD + 1):
        submit(queue, owner, steps=30)
    late = submit(queue, 99, steps=20)  # compatible, but more than the lookahead picks away
    assert queue.next_batch("cpu", max_images=8) == [head]
    assert late not in [j for _ in range(BATCH_LOOKAHEAD) for j in queue.next_batch("cpu", 1)]


def test_batching_keeps_fifo_within_a_user_and_charges_each_flow():
    queue = FairQueue(QueueSettings(max_queued_per_user=100, max_running_per_user=2))
    head = submit(queue, 1, steps=20)
    first = submit(queue, 2, steps=30)
    second = submit(queue, 2, steps=20)  # compatible, but behind user 2's own first job
    assert queue.next_batch("cpu", max_images=8) == [head]
    # Each user's flow was charged its own job: user 3 arriving now goes before user 1's next.
    for _ in range(3):
        submit(queue, 1, steps=20)
    newcomer = submit(queue, 3, steps=20)
    order = dispatch_all(queue)
    assert order.index(first) < order.index(second)
    assert order.index(newcomer) <= 2


def test_batched_jobs_are_charged_like_unbatched_ones():
    """After the same number of jobs, each flow's served cost with batching is within one batch
    of what plain SFQ serves it."""

    def backlog() -> FairQueue:
        queue = FairQueue(ROOMY)
        for _ in range(40):
            for owner in range(4):
                submit(queue, owner, guild=owner % 2, steps=20 if owner < 3 else 10)
        return queue

    batched, served, jobs = backlog(), Counter(), 0
    while jobs < 60:
        batch = batched.next_batch("cpu", max_images=4)
        assert len({j.batch_key for j in batch}) == 1
        for job in batch:
            served[job.owner_id] += job.cost
            batched.finish(job, JobState.DONE)
        jobs += len(batch)
    expected = Counter()
    for job in dispatch_all(backlog())[:jobs]:
        expected[job.owner_id] += job.cost
    for owner in range(4):
        assert abs(served[owner] - expected[owner]) <= 4 * 20


# -- position, ETA, throughput, snapshot ------------------------------------------------------

def test_positions_follow_the_real_dispatch_order_batches_included():
    """On one device (on two, a user's next job may wait for their running one: the ETA tests);
    jobs of equal steps batch, as the runner takes them."""
    queue = FairQueue(ROOMY)
    for owner, n, guild in ((1, 8, 1), (2, 3, 1), (3, 5, 2), (4, 1, None)):
        for i in range(n):
            submit(queue, owner, guild, weight=2.0 if owner == 3 else 1.0, steps=10 + 7 * i)
    (running,) = queue.next_batch("cpu", 1)
    estimates = queue.estimates()
    queue.finish(running, JobState.DONE)
    order, batched = [], False
    while batch := queue.next_batch("cpu", ROOMY.max_batch_images):
        order += batch
        batched |= len(batch) > 1
        for job in batch:
            queue.finish(job, JobState.DONE)
    assert len(order) == 16 and batched  # every job, the DM one (guild None) too
    assert sorted(estimates, key=lambda i: estimates[i].position) == [j.id for j in order]
    assert [estimates[j.id].position for j in order] == list(range(1, len(order) + 1))


def test_eta_is_the_cost_ahead_over_the_measured_throughput():
    now = [100.0]
    queue = FairQueue(ROOMY, clock=lambda: now[0], initial_throughput=5.0)
    queue.record_throughput("cpu", cost=40.0, seconds=2.0)  # first sample: 20 units/s
    queue.record_throughput("cpu", cost=10.0, seconds=1.0)  # 0.2 * 10 + 0.8 * 20 = 18
    assert queue.snapshot().throughput["cpu"] == pytest.approx(18.0)
    running = submit(queue, 1, steps=36)  # 36 units: 2 s at 18 units/s
    later = [submit(queue, 2, steps=s) for s in (18, 9, 27)]
    queue.next_batch("cpu", 1)
    now[0] += 0.5
    estimates = queue.estimates()
    assert [estimates[j.id].starts_in_s for j in later] == pytest.approx([1.5, 2.5, 3.0])
    assert running.id not in estimates


def test_eta_respects_the_running_cap_on_two_devices():
    """One user's three jobs run one after another even with two idle devices; another user's job
    fills the second device meanwhile."""
    queue = FairQueue(ROOMY, devices=("cuda:0", "cuda:1"), initial_throughput=10.0, clock=lambda: 0.0)
    mine = [submit(queue, 1, steps=s) for s in (20, 30, 10)]  # 2 s, 3 s, 1 s
    theirs = submit(queue, 2, steps=50)
    estimates = queue.estimates()
    assert [estimates[j.id].starts_in_s for j in mine] == pytest.approx([0.0, 2.0, 5.0])
    assert estimates[theirs.id].starts_in_s == pytest.approx(0.0)


def test_snapshot_lists_running_and_queued_with_positions_and_owners():
    queue = FairQueue(ROOMY)
    jobs = [submit(queue, owner, guild=7) for owner in (1, 2, 3)]
    queue.next_batch("cuda:0", 1)
    queue.pause()
    snap = queue.snapshot()
    assert snap.paused and not snap.draining
    assert [(v.id, v.device, v.owner_id) for v in snap.running] == [(jobs[0].id, "cuda:0", 1)]
    assert [(v.id, v.position, v.guild_id, v.cost) for v in snap.queued] == [
        (jobs[1].id, 1, 7, 10.0), (jobs[2].id, 2, 7, 10.0)
    ]


# -- restore ---------------------------------------------------------------------------------

def test_restore_keeps_submission_order_and_reruns_a_running_job_once():
    def persisted(seq: int, owner: int, state: JobState, attempts: int = 0) -> Job:
        return Job(f"job{seq}", request(), owner, 1, 1.0, seq, attempts=attempts, state=state)

    rerun, twice = persisted(3, 1, JobState.RUNNING), persisted(1, 2, JobState.RUNNING, MAX_RERUNS)
    jobs = [persisted(7, 1, JobState.QUEUED), rerun, twice, persisted(5, 1, JobState.QUEUED)]
    queue = FairQueue(ROOMY)
    assert queue.restore(jobs) == [twice]
    assert rerun.attempts == 1 and rerun.state is JobState.QUEUED
    assert [j.id for j in dispatch_all(queue)] == ["job3", "job5", "job7"]
    assert submit(queue, 1).seq == 8
    with pytest.raises(ValueError, match="only queued or running"):
        queue.restore([persisted(9, 1, JobState.DONE)])


# -- the benchmark's own arithmetic ---------------------------------------------------------------

def test_water_filling_gives_the_max_min_fair_split():
    from generation.queue_bench import _jain, _water_fill

    # 90 units, demands 10 / 50 / unbounded, weights 1 / 1 / 2: the first is satisfied, then the
    # other two split the 80 left 1:2, which the second (50) does not exceed: 10, 26.67, 53.33.
    shares = _water_fill(90.0, {1: 10.0, 2: 50.0, 3: float("inf")}, {1: 1.0, 2: 1.0, 3: 2.0})
    assert shares == pytest.approx({1: 10.0, 2: 80 / 3, 3: 160 / 3})
    assert _jain([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert _jain([1.0, 0.0, 0.0]) == pytest.approx(1 / 3)


def test_the_queue_benchmark_runs(capsys):
    from generation.queue_bench import main

    assert main(["--jobs", "300", "--users", "30", "--rounds", "30", "--hours", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "next_batch" in out and "fair queue (SFQ)" in out and "first come first served" in out


# -- the ETA learns from the runner ----------------------------------------------------------

def stand_in_seconds(batch: list[Job]) -> float:
    """A stand-in GPU with a batching speed-up: each step costs a fixed 20 ms plus 10 ms per image,
    so a batch of n 512x512 images runs at n / (0.02 + 0.01 n) cost units per second (33, 50,
    67 for 1, 2, 4 images)."""
    images = sum(job.request.count for job in batch)
    return batch[0].request.steps * (0.02 + 0.01 * images)


def run_stand_in(queue: FairQueue, now: list[float], max_images: int = 4) -> dict[str, float]:
    """Run everything queued on one stand-in device, recording each batch; the start of each job."""
    started = {}
    while batch := queue.next_batch("cpu", max_images):
        started |= {job.id: now[0] for job in batch}
        now[0] += stand_in_seconds(batch)
        asyncio.run(queue.record_batch("cpu", batch, stand_in_seconds(batch)))
        for job in batch:
            queue.finish(job, JobState.DONE)
    return started


def test_the_eta_learns_the_rate_of_each_batch_size_and_survives_a_restart():
    now, saved = [0.0], {}

    async def save(key, rate):
        saved[key] = rate

    settings = QueueSettings(max_queued_per_user=100, max_batch_images=4)
    queue = FairQueue(settings, clock=lambda: now[0], initial_throughput=1.0, save_rate=save)
    # Learning: batches of 1 to 4 images (members' jobs batch; a member's own run in turn).
    for members in range(1, 5):
        for owner in range(1, members + 1):
            submit(queue, owner, steps=10)
        run_stand_in(queue, now)
    assert saved == pytest.approx({("sd15", 512, 512, n): n / (0.02 + 0.01 * n) for n in range(1, 5)})

    def backlog(queue: FairQueue) -> list[Job]:
        return [submit(queue, owner, steps=10) for owner in (1, 2, 3, 4, 5, 1, 2, 1)]

    jobs = backlog(queue)
    estimates = queue.estimates()
    started = run_stand_in(queue, now)
    start = min(started.values())
    expected = [started[j.id] - start for j in jobs]
    assert all(estimates[j.id].measured for j in jobs)
    assert [estimates[j.id].starts_in_s for j in jobs] == pytest.approx(expected)
    assert max(Counter(started.values()).values()) == 4  # the first batch holds four members' jobs

    # A restart: the stored rates give the same estimates at once; without them, after the first
    # batch (which starts now, on an idle device) nothing is measured.
    restarted = FairQueue(settings, clock=lambda: 0.0, rates=saved)
    fresh = FairQueue(settings, clock=lambda: 0.0)
    jobs, unknown = backlog(restarted), backlog(fresh)
    after, guessed = restarted.estimates(), fresh.estimates()
    started = run_stand_in(restarted, [0.0])
    assert [after[j.id].starts_in_s for j in jobs] == pytest.approx([started[j.id] for j in jobs])
    assert all(after[j.id].measured for j in jobs)
    assert [guessed[j.id].measured for j in unknown] == [True] * 4 + [False] * 4
