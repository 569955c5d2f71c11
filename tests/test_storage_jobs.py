"""Jobs, their state machine, result images, uploads, and the queries the bot makes."""

from __future__ import annotations

import hashlib
import random
import sqlite3

import pytest

from storage.db import Database
from storage.images import (
    TEMP_PREFIX, ImageStatus, image_file, input_path, job_images, put_input, save_image,
)
from generation.request import JobState
from storage.jobs import (
    _PENDING,
    IllegalTransition, UnknownJob, cancel_job, create_job, fail_job, finish_job,
    Pending, get_job, history, job_detail, jobs_by_state, mark_delivered, pending, requeue_job,
    set_message, start_job, undelivered,
)
from storage.limits import usage
from tests.fixtures.storage import ManualClock, clock, db  # noqa: F401
from tests.storage_crash_child import make_png, sample_request


async def test_created_job_round_trips(db: Database, clock: ManualClock) -> None:
    request = sample_request(width=768, height=512, count=2, steps=30)
    job = await create_job(db, request, owner_id=11, channel_id=22, guild_id=33,
                           interaction_id=44, interaction_token="tok", token_expires_at=5.0)
    stored = await get_job(db, job.id)
    assert stored == job
    assert (job.request, job.owner_id, job.channel_id, job.guild_id) == (request, 11, 22, 33)
    assert (job.interaction_id, job.interaction_token, job.token_expires_at) == (44, "tok", 5.0)
    assert job.state is JobState.QUEUED and job.created_at == clock.now
    assert job.cost == pytest.approx(2 * 30 * 768 * 512 / (512 * 512))
    assert len(job.id) == 12 and job.attempts == 0
    assert await get_job(db, "nosuchjob234") is None


async def test_job_ids_given_by_the_queue_are_kept_and_checked(db: Database) -> None:
    job = await create_job(db, sample_request(), owner_id=1, channel_id=2, job_id="abcdefgh2345")
    assert job.id == "abcdefgh2345"
    with pytest.raises(ValueError, match="12 characters a-z and 2-7"):
        await create_job(db, sample_request(), owner_id=1, channel_id=2, job_id="ABC")
    with pytest.raises(sqlite3.IntegrityError):
        await create_job(db, sample_request(), owner_id=1, channel_id=2, job_id="abcdefgh2345")


# The state machine of the issue, written out independently of storage/jobs.py.
LEGAL = {("queued", "running"), ("queued", "failed"), ("queued", "cancelled"), ("running", "done"),
         ("running", "failed"), ("running", "cancelled"), ("running", "queued")}
ACTIONS = {
    "running": lambda db, job_id: start_job(db, job_id, device="cuda:0"),
    "done": finish_job,
    "failed": lambda db, job_id: fail_job(db, job_id, "out of memory"),
    "cancelled": cancel_job,
    "queued": requeue_job,
}
PATHS = {"queued": [], "running": ["running"], "done": ["running", "done"],
         "failed": ["running", "failed"], "cancelled": ["cancelled"]}


@pytest.mark.parametrize("source", list(PATHS))
@pytest.mark.parametrize("target", list(ACTIONS))
async def test_only_legal_transitions_happen(db: Database, source: str, target: str) -> None:
    job = await create_job(db, sample_request(), owner_id=1, channel_id=2)
    for step in PATHS[source]:
        await ACTIONS[step](db, job.id)
    if (source, target) in LEGAL:
        moved = await ACTIONS[target](db, job.id)
        assert moved.state == target == (await get_job(db, job.id)).state
    else:
        with pytest.raises(IllegalTransition, match=f"job {job.id} is {source}"):
            await ACTIONS[target](db, job.id)
        assert (await get_job(db, job.id)).state == source


async def test_transitions_record_times_device_error_and_attempts(
    db: Database, clock: ManualClock
) -> None:
    job = await create_job(db, sample_request(), owner_id=1, channel_id=2)
    clock.now += 5
    running = await start_job(db, job.id, device="cuda:1")
    assert (running.started_at, running.device) == (clock.now, "cuda:1")
    requeued = await requeue_job(db, job.id)
    assert (requeued.attempts, requeued.started_at, requeued.device) == (1, None, None)
    await start_job(db, job.id, device="cuda:0")
    clock.now += 7
    failed = await fail_job(db, job.id, "CUDA out of memory")
    assert (failed.finished_at, failed.error) == (clock.now, "CUDA out of memory")
    assert failed.attempts == 1
    with pytest.raises(UnknownJob):
        await start_job(db, "nosuchjob234", device="cpu")


async def test_finishing_charges_cost_and_images_to_the_owner(db: Database) -> None:
    request = sample_request(count=3)
    job = await create_job(db, request, owner_id=5, channel_id=2, guild_id=9)
    await start_job(db, job.id, device="cpu")
    rng = random.Random(0)
    for index, seed in enumerate(request.seeds()):
        await save_image(db, job.id, index, seed, make_png(rng))
    await finish_job(db, job.id)
    spent = await usage(db, 5, 9, window_hours=24)
    assert (spent.cost, spent.images, spent.jobs) == (pytest.approx(request.cost), 3, 1)
    assert (await usage(db, 5, None, window_hours=24)).jobs == 0  # DMs are counted apart


async def test_set_message(db: Database) -> None:
    job = await create_job(db, sample_request(), owner_id=1, channel_id=2)
    await set_message(db, job.id, 123456789012345678)
    assert (await get_job(db, job.id)).message_id == 123456789012345678
    with pytest.raises(UnknownJob):
        await set_message(db, "nosuchjob234", 1)


async def test_history_pages_newest_first(db: Database) -> None:
    mine = [await create_job(db, sample_request(seed=n), owner_id=1, channel_id=2,
                             guild_id=None if n % 3 == 0 else 7) for n in range(7)]
    await create_job(db, sample_request(), owner_id=2, channel_id=2)
    first = await history(db, 1, limit=3)
    second = await history(db, 1, limit=3, before_seq=first[-1].seq)
    third = await history(db, 1, limit=3, before_seq=second[-1].seq)
    assert [j.id for j in first + second + third] == [j.id for j in reversed(mine)]
    in_guild = await history(db, 1, guild_id=7)
    assert [j.request.seed for j in in_guild] == [5, 4, 2, 1]
    with pytest.raises(ValueError, match="1..100"):
        await history(db, 1, limit=0)


async def test_jobs_by_state_keep_submission_order(db: Database) -> None:
    jobs = [await create_job(db, sample_request(seed=n), owner_id=n, channel_id=2)
            for n in range(5)]
    await start_job(db, jobs[1].id, device="cpu")
    await start_job(db, jobs[3].id, device="cpu")
    await cancel_job(db, jobs[4].id)
    waiting = await jobs_by_state(db, JobState.QUEUED, JobState.RUNNING)
    assert [j.id for j in waiting] == [j.id for j in jobs[:4]]
    assert [j.id for j in await jobs_by_state(db, JobState.RUNNING)] == [jobs[1].id, jobs[3].id]


async def test_pending_sums_one_owners_unfinished_jobs_in_one_place(db: Database) -> None:
    async def job(owner: int = 1, guild: int | None = 10, **fields: object) -> str:
        made = await create_job(db, sample_request(**fields), owner_id=owner, channel_id=2,
                                guild_id=guild)
        return made.id

    assert await pending(db, 1, 10) == Pending(queued=0, running=0, images=0, cost=0.0)
    await job(count=2)  # 40 units
    await start_job(db, await job(count=3, steps=10), device="cpu")  # 30 units
    await cancel_job(db, await job(count=4))
    done = await job(count=4)
    await start_job(db, done, device="cpu")
    await finish_job(db, done)  # charged by the usage ledger instead
    await job(owner=2)
    await job(guild=11)
    await job(guild=None, count=2, steps=5)  # 10 units
    assert await pending(db, 1, 10) == Pending(queued=1, running=1, images=5, cost=70.0)
    assert await pending(db, 1, None) == Pending(queued=1, running=0, images=2, cost=10.0)
    assert await pending(db, 2, 11) == Pending(queued=0, running=0, images=0, cost=0.0)


async def test_pending_reads_only_live_jobs_through_their_index(db: Database) -> None:
    """It runs at every submit inside the queue's lock: not a walk through the member's history."""
    plan = await db.fetch_all(f"EXPLAIN QUERY PLAN {_PENDING}", (1, 10))
    [step] = [row["detail"] for row in plan]
    assert "INDEX jobs_live_by_owner (owner_id=? AND guild_id=?)" in step


async def test_job_detail_has_images_and_lineage(db: Database) -> None:
    root = await create_job(db, sample_request(count=2), owner_id=1, channel_id=2)
    rng = random.Random(1)
    pngs = [make_png(rng), make_png(rng, width=48)]
    for index, png in enumerate(pngs):
        await save_image(db, root.id, index, 42 + index, png)
    upscale = await create_job(db, sample_request(), owner_id=1, channel_id=2,
                               parent_job_id=root.id, parent_index=1)
    variation = await create_job(db, sample_request(), owner_id=3, channel_id=2,
                                 parent_job_id=root.id, parent_index=0)
    grandchild = await create_job(db, sample_request(), owner_id=1, channel_id=2,
                                  parent_job_id=upscale.id, parent_index=0)
    detail = await job_detail(db, grandchild.id)
    assert [p.id for p in detail.parents] == [upscale.id, root.id]
    assert detail.children == [] and detail.images == []
    top = await job_detail(db, root.id)
    assert [c.id for c in top.children] == [upscale.id, variation.id] and top.parents == []
    assert [(i.index, i.seed, i.sha256) for i in top.images] == [
        (n, 42 + n, hashlib.sha256(png).hexdigest()) for n, png in enumerate(pngs)]
    assert await job_detail(db, "nosuchjob234") is None


async def test_saved_image_is_named_by_content_and_complete(db: Database) -> None:
    job = await create_job(db, sample_request(), owner_id=1, channel_id=2)
    png = make_png(random.Random(2), width=40, height=16, parameters="a cat, Steps: 20")
    image = await save_image(db, job.id, 0, 42, png)
    sha = hashlib.sha256(png).hexdigest()
    assert image.path == f"{sha[:2]}/{sha}.png"
    assert image_file(db, image).read_bytes() == png  # stored as given, chunk and all
    assert (image.width, image.height, image.bytes) == (40, 16, len(png))
    assert image.status is ImageStatus.OK
    assert not list(db.images_dir.rglob(f"{TEMP_PREFIX}*"))
    # A re-run after a restart stores index 0 again: it replaces the row, it does not add one.
    again = make_png(random.Random(3))
    await save_image(db, job.id, 0, 42, again)
    assert [i.sha256 for i in await job_images(db, job.id)] == [hashlib.sha256(again).hexdigest()]


async def test_non_png_results_are_refused(db: Database) -> None:
    job = await create_job(db, sample_request(), owner_id=1, channel_id=2)
    with pytest.raises(ValueError, match="PNG-encoded"):
        await save_image(db, job.id, 0, 42, b"\xff\xd8\xff\xe0 a jpeg")
    assert await job_images(db, job.id) == []


async def test_inputs_are_stored_by_hash(db: Database, clock: ManualClock) -> None:
    data = b"any uploaded bytes \x00\x01"
    sha = await put_input(db, data)
    assert sha == hashlib.sha256(data).hexdigest()
    path = await input_path(db, sha)
    assert path.read_bytes() == data and path.is_relative_to(db.images_dir)
    clock.now += 60
    assert await put_input(db, data) == sha  # the same upload again is the same input
    row = await db.fetch_one("SELECT created_at, last_used_at FROM inputs WHERE sha256 = ?", (sha,))
    assert (row["last_used_at"] - row["created_at"]) == 60
    with pytest.raises(LookupError, match="upload it again"):
        await input_path(db, "0" * 64)


async def test_finished_jobs_wait_to_be_delivered_once(db: Database, clock: ManualClock) -> None:
    old, done, failed, queued = [await create_job(db, sample_request(), owner_id=1, channel_id=2) for _ in range(4)]
    for job in (old, done):
        await start_job(db, job.id, device="cpu")
        await finish_job(db, job.id)
        clock.now += 100
    await fail_job(db, failed.id, "bad input")
    assert [j.id for j in await undelivered(db, finished_since=0)] == [old.id, done.id, failed.id]
    assert [j.id for j in await undelivered(db, finished_since=old.created_at + 50)] == [done.id, failed.id]
    await mark_delivered(db, done.id)
    told = (await get_job(db, done.id)).delivered_at
    await mark_delivered(db, done.id)  # once told, the first time stays
    assert (await get_job(db, done.id)).delivered_at == told == clock.now
    assert [j.id for j in await undelivered(db, finished_since=0)] == [old.id, failed.id]
    assert queued.delivered_at is None  # not finished: not waiting for delivery either
