"""bot/replies.py: status messages of waiting jobs follow the real queue's estimates."""

from __future__ import annotations

import asyncio
from typing import Any

from bot.config import DiscordSettings
from bot.replies import Delivery
from generation.queue import FairQueue, Submission
from generation.request import GenerationRequest, JobState
from generation.settings import QueueSettings

HERE, ELSEWHERE = 10, 20


class Statuses:
    """The status messages' edits, by job id, and a clock that lets every edit through at once."""

    def __init__(self) -> None:
        self.shown: dict[str, list[str]] = {}
        self.now = 0.0

    def editor(self, job_id: str) -> Any:
        async def edit(**fields: Any) -> None:
            self.shown[job_id].append(fields["content"])

        self.shown[job_id] = []
        return edit

    async def settle(self) -> None:
        """Past the edit interval, and the edit tasks have run."""
        self.now += 60.0
        for _ in range(5):
            await asyncio.sleep(0)


async def submit(queue: FairQueue, owner: int, guild: int) -> str:
    request = GenerationRequest(prompt="a lighthouse", model="sd15", steps=20, guidance=7.0, seed=1,
                                width=512, height=512, count=1)
    return (await queue.submit(Submission(request, owner, guild))).id


async def test_waiting_jobs_say_their_server_paused_and_show_their_place_again_on_resume() -> None:
    """While paused a job still shows the place it will have; its start time shows again on resume."""
    # Batches of one 512x512 sd15 image measured at 10 cost units/s: 2 s a job.
    queue = FairQueue(QueueSettings(), ("cpu",), rates={("sd15", 512, 512, 1): 10.0}, clock=lambda: 0.0)
    first = await submit(queue, 2, ELSEWHERE)
    mine = await submit(queue, 1, HERE)
    statuses = Statuses()
    delivery = Delivery(None, None, DiscordSettings(), clock=lambda: statuses.now)  # type: ignore[arg-type]
    for job_id, owner in ((first, 2), (mine, 1)):
        delivery.expect(job_id, owner, upload_limit=0)
        delivery.acknowledged(job_id, "queued", statuses.editor(job_id))

    await statuses.settle()
    await delivery.queue_moved(queue.estimates())
    await statuses.settle()
    queue.pause(HERE)
    await delivery.queue_moved(queue.estimates())
    await statuses.settle()
    queue.resume(HERE)
    await delivery.queue_moved(queue.estimates())
    await statuses.settle()

    place = f"<@1> `{mine}` is queued: position 2, starts now"  # in one batch with the first job
    assert statuses.shown[mine] == [
        place,
        f"<@1> `{mine}` is queued: position 2; this server's moderators have paused the queue for now.",
        place,
    ]
    # The other server's job is not held: it stays first, starting now, and is not edited again.
    assert statuses.shown[first] == [f"<@2> `{first}` is queued: position 1, starts now"]


async def test_a_start_time_shows_only_when_measured_rates_are_behind_it() -> None:
    """A job after a batch of a size never measured gets its place only; once a batch of that size
    ran, the time too (one member's jobs run one after another)."""
    queue = FairQueue(QueueSettings(), ("cpu",), clock=lambda: 0.0)
    first, mine = await submit(queue, 1, HERE), await submit(queue, 1, HERE)
    delivery = Delivery(None, None, DiscordSettings())  # type: ignore[arg-type]
    assert delivery.queued_text(first, 1, queue.estimates()[first]) == (
        f"<@1> `{first}` is queued: position 1, starts now")  # the device is idle: that is known
    assert delivery.queued_text(mine, 1, queue.estimates()[mine]) == f"<@1> `{mine}` is queued: position 2"
    [running] = queue.next_batch("cpu", 1)
    await queue.record_batch("cpu", [running], 4.0)  # 20 units in 4 s: 5 units/s
    queue.finish(running, JobState.DONE)
    later = await submit(queue, 1, HERE)
    assert delivery.queued_text(later, 1, queue.estimates()[later]) == (
        f"<@1> `{later}` is queued: position 2, starts in about 4 s")
