"""bot/studio.py with a real SQLite file, the real queue and runner, and a tiny checkpoint on the CPU:
jobs are stored before they are queued, finish exactly once, and survive restarts."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from bot.config import AppConfig
from bot.policy import Requester
from bot.studio import GAVE_UP, Origin, Studio
from generation.queue import Estimate, Refused
from generation.request import GenerationRequest, JobState
from generation.settings import GenerationSettings, ModelSettings, QueueSettings
from storage import jobs as stored
from storage.images import ImageRecord, image_file
from storage.limits import usage
from storage.settings import StorageSettings
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_checkpoints  # noqa: F401

ALICE, BOB = Requester(1, 10, 100), Requester(2, 10, 100)


@pytest.fixture
def config(tmp_path: Path, tiny_checkpoints: TinyCheckpoints) -> AppConfig:  # noqa: F811
    path, yaml_path = tiny_checkpoints.get("sd1")
    return AppConfig(
        generation=GenerationSettings(device="cpu", dtype="float32"),
        models=(ModelSettings(name="tiny", checkpoint=path, config=yaml_path),),
        queue=QueueSettings(shutdown_grace_s=0.0, max_queued_per_user=10),
        storage=StorageSettings(data_dir=tmp_path / "data"),
    )


def request(steps: int = 2, **changes: Any) -> GenerationRequest:
    values = dict(prompt="a lighthouse", model="tiny", sampler="euler", steps=steps, guidance=4.0, seed=5,
                  width=64, height=64, count=1)
    return GenerationRequest(**values | changes)


class Recorder:
    """A listener that remembers everything it is told."""

    def __init__(self) -> None:
        self.began: list[str] = []
        self.done: list[tuple[stored.Job, list[ImageRecord]]] = []
        self.moves: list[Mapping[str, Estimate]] = []
        self.steps: list[tuple[str, int, int]] = []
        self.any_started = asyncio.Event()

    async def queue_moved(self, estimates: Mapping[str, Estimate]) -> None:
        self.moves.append(estimates)

    async def started(self, job: stored.Job) -> None:
        assert job.state is JobState.RUNNING
        self.began.append(job.id)
        self.any_started.set()

    async def progressed(self, job_id: str, step: int, total: int, preview: Any) -> None:
        self.steps.append((job_id, step, total))

    async def finished(self, job: stored.Job, images: list[ImageRecord]) -> None:
        self.done.append((job, images))

    async def wait_finished(self, count: int, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.done) < count:
                await asyncio.sleep(0.02)


@asynccontextmanager
async def studio(config: AppConfig) -> AsyncIterator[Studio]:
    async with Studio.open(config, ("cpu",), 2**30) as opened:
        yield opened


def origin(channel: int = 100) -> Origin:
    return Origin(channel_id=channel, interaction_id=555, interaction_token="tok", token_expires_at=9e9)


async def test_job_is_stored_before_queued_then_runs_and_finishes_once_with_its_images(config: AppConfig) -> None:
    recorder = Recorder()
    async with studio(config) as opened:
        job = await opened.submit(request(count=2), ALICE, origin())
        row = await stored.get_job(opened.db, job.id)  # stored before submit returned, not yet started
        assert row is not None and row.state is JobState.QUEUED
        assert (row.owner_id, row.guild_id, row.channel_id, row.interaction_token) == (1, 10, 100, "tok")
        assert recorder.moves == []
        opened.start(recorder)
        await recorder.wait_finished(1)
        await asyncio.sleep(0.2)  # nothing else arrives late

        ((done, images),) = recorder.done
        assert done.id == job.id and done.state is JobState.DONE and recorder.began == [job.id]
        assert [(i.index, i.seed, i.width, i.height) for i in images] == [(0, 5, 64, 64), (1, 6, 64, 64)]
        for image in images:
            with Image.open(io.BytesIO(image_file(opened.db, image).read_bytes())) as png:
                assert "Seed: %d" % image.seed in png.info["parameters"]
        assert recorder.steps[-1] == (job.id, 2, 2)
        spent = await usage(opened.db, 1, 10, 24)
        assert (spent.images, spent.cost) == (2, job.cost)


async def test_restart_restores_queued_jobs_in_order_and_reruns_a_running_one_once(config: AppConfig) -> None:
    first = Recorder()
    async with studio(config) as opened:
        ids = [(await opened.submit(request(steps=40), ALICE, origin())).id]
        ids += [(await opened.submit(request(seed=s), ALICE, origin())).id for s in (1, 2)]
        opened.start(first)
        await asyncio.wait_for(first.any_started.wait(), 30)
    # Left without finishing: the first job was running, the others queued.
    assert first.done == [] and first.began == ids[:1]

    second = Recorder()
    async with studio(config) as opened:
        rows = {r.id: r for r in await stored.jobs_by_state(opened.db, JobState.QUEUED)}
        assert set(rows) == set(ids) and rows[ids[0]].attempts == 1
        opened.start(second)
        await asyncio.wait_for(second.any_started.wait(), 30)
    assert second.began == ids[:1]  # the interrupted job re-runs first, in submission order

    third = Recorder()
    async with studio(config) as opened:
        opened.start(third)
        await third.wait_finished(3)
        await asyncio.sleep(0.2)
        states = {job.id: (job.state, job.error) for job, _ in third.done}
        assert [job.id for job, _ in third.done] == ids  # the given-up job is reported first
        assert states[ids[0]] == (JobState.FAILED, GAVE_UP)
        assert states[ids[1]][0] is states[ids[2]][0] is JobState.DONE
        assert Counter(job.id for job, _ in first.done + second.done + third.done) == Counter(ids)
        assert third.began == ids[1:]


async def test_finished_jobs_whose_owner_was_never_told_are_told_at_the_next_start(config: AppConfig) -> None:
    first = Recorder()
    async with studio(config) as opened:
        job = await opened.submit(request(), ALICE, origin())
        opened.start(first)
        await first.wait_finished(1)
    # The bot went down before it could post (nothing marked the job delivered).
    second = Recorder()
    async with studio(config) as opened:
        opened.start(second)
        await second.wait_finished(1)
        ((told, images),) = second.done
        assert told.id == job.id and told.state is JobState.DONE and len(images) == 1
        await stored.mark_delivered(opened.db, job.id)  # what the Discord side does once posted
    third = Recorder()
    async with studio(config) as opened:
        opened.start(third)
        await asyncio.sleep(0.3)
        assert third.done == []


async def test_restored_jobs_keep_their_role_weight(config: AppConfig) -> None:
    config = config.model_copy(update={"queue": config.queue.model_copy(update={"role_weights": {"Supporter": 3.0}})})
    supporter = Requester(3, 10, 100, role_names=("Supporter",))
    async with studio(config) as opened:
        job_id = (await opened.submit(request(), supporter, origin())).id
        assert opened.queue.get(job_id).weight == 3.0
    async with studio(config) as opened:  # never started: the job waits in the database
        assert opened.queue.get(job_id).weight == 3.0


async def test_cancel_a_queued_job_and_refusals_change_nothing(config: AppConfig) -> None:
    recorder = Recorder()
    limited = config.model_copy(update={"queue": QueueSettings(max_queued_per_user=1, shutdown_grace_s=0.0)})
    async with studio(limited) as opened:
        opened.start(recorder)
        opened.queue.pause()
        job = await opened.submit(request(), ALICE, origin())
        with pytest.raises(Refused, match="limit is 1"):
            await opened.submit(request(), ALICE, origin())
        assert len(await stored.jobs_by_state(opened.db, JobState.QUEUED)) == 1
        assert recorder.moves[-1][job.id].position == 1
        with pytest.raises(Refused, match="only the member who asked"):
            await opened.cancel(job.id, by=BOB.user_id)
        await opened.cancel(job.id, by=ALICE.user_id)
        assert [(j.id, j.state) for j, _ in recorder.done] == [(job.id, JobState.CANCELLED)]
        assert (await stored.get_job(opened.db, job.id)).state is JobState.CANCELLED


async def test_the_event_loop_keeps_ticking_while_the_cpu_generates(config: AppConfig) -> None:
    recorder = Recorder()
    async with studio(config) as opened:
        opened.start(recorder)
        await opened.submit(request(steps=30), ALICE, origin())
        ticks, began = [], time.monotonic()
        while not recorder.done:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)
        took = time.monotonic() - began
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        assert took > 0.5 and max(gaps) < min(0.4, took / 2)


async def test_pausing_a_server_tells_its_waiting_jobs_at_once_and_resuming_gives_their_place_back(
        config: AppConfig) -> None:
    recorder = Recorder()
    async with studio(config) as opened:
        opened.start(recorder)
        opened.queue.pause()  # the operator's hold: nothing starts, so the job stays waiting
        job = await opened.submit(request(), ALICE, origin())
        told = len(recorder.moves)
        await opened.pause(ALICE.guild_id, True)
        assert len(recorder.moves) == told + 1 and recorder.moves[-1][job.id].paused
        await opened.pause(ALICE.guild_id, False)
        assert not recorder.moves[-1][job.id].paused and recorder.moves[-1][job.id].position == 1


async def test_a_paused_server_stays_paused_after_a_restart(config: AppConfig) -> None:
    async with studio(config) as opened:
        await opened.pause(ALICE.guild_id, True)
        await opened.pause(99, True)
        await opened.pause(99, False)
    async with studio(config) as reopened:
        assert reopened.queue.is_paused(ALICE.guild_id) and not reopened.queue.is_paused(99)
        await reopened.pause(ALICE.guild_id, False)
    async with studio(config) as again:
        assert not again.queue.is_paused(ALICE.guild_id)


async def test_a_burst_of_submissions_is_replayed_together_and_each_acknowledgement_sees_its_job(
        config: AppConfig) -> None:
    recorder = Recorder()
    async with studio(config) as opened:
        opened.start(recorder)
        opened.queue.pause()  # nothing starts: every job stays waiting

        async def submit(member: int) -> tuple[str, bool]:
            job = await opened.submit(request(), Requester(member, 10, 100), origin())
            return job.id, job.id in opened.estimates  # what the acknowledgement reads

        acks = await asyncio.gather(*(submit(member) for member in (1, 2, 3, 4) * 3))
        assert all(seen for _, seen in acks)
        assert len(recorder.moves) < len(acks)  # a replay per burst, not per submission
        last = recorder.moves[-1]
        assert sorted(last) == sorted(job_id for job_id, _ in acks) and last == opened.estimates
        assert sorted(estimate.position for estimate in last.values()) == list(range(1, 13))
        assert last == opened.queue.estimates()


async def test_a_job_that_starts_while_the_queue_is_replayed_leaves_the_estimates(config: AppConfig) -> None:
    """The replay runs on a worker thread on a copy of the queue: a job dispatched meanwhile is
    in that copy's result, but it no longer waits, so the studio leaves it out."""
    async with studio(config) as opened:  # not started: this test dispatches itself
        first = await opened.submit(request(), ALICE, origin())
        second = await opened.submit(request(), BOB, origin())
        copy_of_queue, copied, gate = opened.queue.replay, asyncio.Event(), threading.Event()

        def gated_replay() -> SimpleNamespace:  # the copy as the loop takes it; its run waits at the gate
            replay = copy_of_queue()
            copied.set()
            return SimpleNamespace(run=lambda: gate.wait(10) and replay.run())

        opened.queue.replay = gated_replay
        moved = asyncio.create_task(opened._moved())
        await copied.wait()
        assert opened.queue.next_batch("cpu", 1) == [opened.queue.get(first.id)]
        gate.set()
        await moved
        assert set(opened.estimates) == {second.id} and opened.estimates[second.id].position == 2


async def test_a_submission_waits_for_one_replay_however_many_changes_follow_it(config: AppConfig) -> None:
    """Changes that keep coming while the queue is replayed go to later replays: a waiting
    submission returns once the replay that began after it is done (it waited for the queue to go
    quiet before: a steady stream of changes kept it from ever being acknowledged)."""
    async with studio(config) as opened:  # not started: nothing runs
        copy_of_queue, started = opened.queue.replay, asyncio.Queue()
        gates: list[threading.Event] = []

        def gated_replay() -> SimpleNamespace:  # each replay waits for its own gate
            replay, gate = copy_of_queue(), threading.Event()
            gates.append(gate)
            started.put_nowait(gate)
            return SimpleNamespace(run=lambda: gate.wait(10) and replay.run())

        opened.queue.replay = gated_replay
        submitted = asyncio.create_task(opened.submit(request(), ALICE, origin()))
        first = await started.get()
        for _ in range(3):  # a change during every replay: the replays never stop
            await opened._moved(wait=False)
            (gates[-1]).set()
            if gates[-1] is first:
                job = await asyncio.wait_for(submitted, 5)
                assert job.id in opened.estimates
            await started.get()
        assert submitted.done() and len(gates) == 4
        gates[-1].set()
        while opened._replaying is not None:
            await asyncio.sleep(0)
