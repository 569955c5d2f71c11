"""Everything the bot says about a job: the acknowledgement with queue position and ETA, progress
edits, and the result with its images and buttons.

Delivery works from the stored job (channel, interaction token, status message), not from memory,
so results of jobs restored after a restart reach their owner too. When the interaction token has
expired (Discord's 15 minutes) or a followup fails, the result is posted in the channel as a reply
mentioning the requester. Files over the upload limit are re-encoded or downscaled, and the
message says so: an image is never dropped silently.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import discord
from PIL import Image

from bot.config import DiscordSettings
from bot.views import result_view
from generation.metadata import png_bytes
from generation.queue import Estimate
from generation.request import JobState, Kind
from storage import jobs as stored
from storage.db import Database
from storage.images import ImageRecord, ImageStatus, image_file

log = logging.getLogger(__name__)

#: Discord's upload limit of a server without boosts, when nothing better is known.
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
#: Seconds before the token's end at which the bot stops trusting it.
TOKEN_MARGIN_S = 30.0
#: How long a result waits for its job's acknowledgement to be sent (it is usually instant).
ACK_WAIT_S = 10.0
#: (format, file extension, quality) tried in order for a file over the upload limit.
_ENCODINGS = (("WEBP", "webp", 90), ("JPEG", "jpg", 85), ("WEBP", "webp", 60), ("JPEG", "jpg", 60))
_SMALLEST_SIDE = 64

Edit = Callable[..., Awaitable[Any]]


def status_editor(interaction: discord.Interaction, message_id: int) -> Edit:
    """Edits an interaction's status message: through the interaction while its token lives, then
    as the bot's own message in the channel (tokens last 15 minutes; a queue may wait longer)."""
    expires = interaction.expires_at.timestamp() - TOKEN_MARGIN_S
    channel = interaction.channel

    async def edit(**fields: Any) -> Any:
        if time.time() < expires:
            try:
                return await interaction.edit_original_response(**fields)
            except discord.HTTPException as error:
                if error.status not in (401, 404) or channel is None:  # 401/404: the token is gone
                    raise
        return await channel.get_partial_message(message_id).edit(**fields)

    return edit


@dataclass
class _Status:
    """The message that shows one job's state while it waits and runs."""

    owner_id: int
    upload_limit: int
    #: Edits the status message; set once it has been sent.
    edit: Edit | None = None
    acknowledged: asyncio.Event = field(default_factory=asyncio.Event)
    last_edit: float = float("-inf")
    text: str = ""
    #: The latest text (and preview PNG) not shown yet, and the task that will show it.
    pending: tuple[str, bytes | None] | None = None
    flush: asyncio.Task | None = None


@dataclass(frozen=True)
class Upload:
    """One result image ready to attach: its bytes, file name, and a note when it was altered."""

    data: bytes
    filename: str
    note: str | None = None


def fit_upload(png: bytes, limit: int, stem: str) -> Upload | None:
    """The image as it can be posted under `limit` bytes: as is, re-encoded (WebP, then JPEG), or
    downscaled; None only if not even a tiny JPEG fits."""
    if len(png) <= limit:
        return Upload(png, f"{stem}.png")
    with Image.open(io.BytesIO(png)) as opened:
        image = opened.convert("RGB")
    for fmt, extension, quality in _ENCODINGS:
        data = _encode(image, fmt, quality)
        if len(data) <= limit:
            return Upload(data, f"{stem}.{extension}", f"sent as {fmt} (quality {quality}) to fit the upload limit")
    width, height = image.size
    while min(width, height) > _SMALLEST_SIDE:
        width, height = max(1, width * 3 // 4), max(1, height * 3 // 4)
        data = _encode(image.resize((width, height), Image.Resampling.LANCZOS), "JPEG", 85)
        if len(data) <= limit:
            return Upload(data, f"{stem}.jpg", f"downscaled to {width}x{height} to fit the upload limit")
    return None


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=quality)
    return buffer.getvalue()


def queue_place(estimate: Estimate) -> str:
    """': position 2, starts in about 30 s' (the time only when measured rates are behind it), or
    with the place it will have, that the moderators paused the queue."""
    place = "" if estimate.position is None else f": position {estimate.position}"
    if estimate.paused:
        return f"{place}; this server's moderators have paused the queue for now."
    if estimate.measured and estimate.starts_in_s is not None:
        return f"{place}, starts {eta_text(estimate.starts_in_s)}"
    return place


def eta_text(seconds: float) -> str:
    if seconds < 1:
        return "now"
    if seconds < 90:
        return f"in about {round(seconds)} s"
    return f"in about {round(seconds / 60)} min"


class Delivery:
    """The studio's listener on the Discord side (see `bot.studio.Listener`)."""

    def __init__(
        self,
        client: discord.Client,
        db: Database,
        settings: DiscordSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._db = db
        self._settings = settings
        self._clock = clock
        self._status: dict[str, _Status] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- acknowledgements, called by the commands right after a job was queued --

    def expect(self, job_id: str, owner_id: int, upload_limit: int) -> None:
        """Register a job as soon as it is queued; its events wait for `acknowledged`."""
        self._status[job_id] = _Status(owner_id, upload_limit)

    def acknowledged(self, job_id: str, text: str, edit: Edit) -> None:
        """The status message showing `text` was sent; `edit(content=..., ...)` changes it."""
        if (status := self._status.get(job_id)) is not None:
            status.text, status.last_edit, status.edit = text, self._clock(), edit
            status.acknowledged.set()

    def resume(self, job: stored.Job, edit: Edit) -> None:
        """A job restored at start-up: its status message (posted before the restart) keeps showing
        its place in the queue and its progress."""
        self.expect(job.id, job.owner_id, self._upload_limit(job))
        self.acknowledged(job.id, "", edit)

    def queued_text(self, job_id: str, owner_id: int, estimate: Estimate | None) -> str:
        """A waiting job's status: its place, and its start or that its server's queue is paused."""
        if estimate is None:
            return f"<@{owner_id}> `{job_id}` is starting…"
        return f"<@{owner_id}> `{job_id}` is queued{queue_place(estimate)}"

    # -- the studio's events --

    async def queue_moved(self, estimates: Mapping[str, Estimate]) -> None:
        """Every waiting job's status follows the queue: its new place, or that its server's queue
        was paused (estimates hold those jobs too), and its place again after the resume."""
        for job_id, estimate in estimates.items():
            if (status := self._status.get(job_id)) is not None:
                self._show(job_id, self.queued_text(job_id, status.owner_id, estimate))

    async def started(self, job: stored.Job) -> None:
        self._show(job.id, f"<@{job.owner_id}> `{job.id}` is being drawn… 0%")

    async def progressed(self, job_id: str, step: int, total: int, preview: Any) -> None:
        if (status := self._status.get(job_id)) is not None and step < total:
            png = await asyncio.to_thread(png_bytes, preview) if preview is not None else None
            self._show(job_id, f"<@{status.owner_id}> `{job_id}` is being drawn… {100 * step // total}%", png)

    async def finished(self, job: stored.Job, images: list[ImageRecord]) -> None:
        """Deliver in the background: the runner's worker must not wait on uploads."""
        self._spawn(self._finish(job, images))

    async def aclose(self, timeout: float = 30.0) -> None:
        """Wait for deliveries still under way (before the HTTP session closes)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def _finish(self, job: stored.Job, images: list[ImageRecord]) -> None:
        status = self._status.get(job.id)
        if status is not None:
            try:
                await asyncio.wait_for(status.acknowledged.wait(), ACK_WAIT_S)
            except TimeoutError:
                log.warning("job %s finished before its acknowledgement was sent", job.id)
            if status.flush is not None:
                status.flush.cancel()
        try:
            if job.state is JobState.CANCELLED:
                await self._close_status(job, f"`{job.id}` was cancelled.")
                told = True
            else:
                told = await self._deliver(job, images, status.upload_limit if status else self._upload_limit(job))
            if told:
                await stored.mark_delivered(self._db, job.id)
        except Exception:  # a bug of ours must not go unnoticed in a background task
            log.exception("delivering job %s failed", job.id)
        finally:
            self._status.pop(job.id, None)

    # -- delivery --

    async def _deliver(self, job: stored.Job, images: list[ImageRecord], limit: int) -> bool:
        """Post the result (or the failure); whether the owner was told, so it need not be retried."""
        if job.state is JobState.DONE:
            uploads = await asyncio.to_thread(self._uploads, job, images, limit)
            content = result_text(job, images, uploads)
            files = [discord.File(io.BytesIO(u.data), filename=u.filename) for u in uploads if u is not None]
            view = result_view(job.id, len(images), upscaled=job.request.kind is Kind.UPSCALE)
        else:
            content, files, view = _fit_text(f"<@{job.owner_id}> `{job.id}` failed: {job.error}"), [], None
        message, told = await self._post(job, content, files, view)
        if message is not None:
            await stored.set_message(self._db, job.id, message.id)
            summary = "finished, see below." if job.state is JobState.DONE else "failed, see below."
            await self._close_status(job, f"`{job.id}` {summary}")
        return told

    def _uploads(self, job: stored.Job, images: list[ImageRecord], limit: int) -> list[Upload | None]:
        return [
            fit_upload(image_file(self._db, image).read_bytes(), limit, f"{job.id}-{image.index + 1}")
            if image.status is ImageStatus.OK else None
            for image in images
        ]

    async def _post(
        self, job: stored.Job, content: str, files: list[discord.File], view: discord.ui.View | None
    ) -> tuple[discord.Message | None, bool]:
        """Through the interaction while its token lives, else in the channel as a reply; the
        message, and whether the owner was told (a refused channel is said by DM: final)."""
        mentions = discord.AllowedMentions(users=[discord.Object(job.owner_id)], roles=False, everyone=False)
        extra: dict[str, Any] = {"view": view} if view is not None else {}
        if job.interaction_token and (job.token_expires_at or 0) - TOKEN_MARGIN_S > time.time():
            webhook = discord.Webhook.partial(self._client.application_id, job.interaction_token, client=self._client)
            try:
                return await webhook.send(content, files=files, allowed_mentions=mentions, wait=True, **extra), True
            except discord.HTTPException as error:
                log.info("followup for job %s failed (%s); posting in the channel", job.id, error)
            for file in files:
                file.reset()
        channel = self._client.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
        reference = await self._reference(channel, job)
        try:
            return await channel.send(content, files=files, allowed_mentions=mentions, reference=reference, **extra), True
        except discord.Forbidden as error:
            log.warning("cannot post job %s in channel %s: %s", job.id, job.channel_id, error)
            await self._tell_owner(job, f"I cannot post in <#{job.channel_id}> (missing permission). Your result is "
                                        f"saved: use `/show job:{job.id}`.")
            return None, True
        except discord.HTTPException:  # perhaps passing: told again at the next start
            log.exception("could not deliver job %s", job.id)
            return None, False

    async def _reference(self, channel: discord.PartialMessageable, job: stored.Job) -> discord.MessageReference | None:
        """The requester's own message when the job came from one (the status message replies to
        it), else the status message."""
        if job.message_id is None:
            return None
        try:
            status = await channel.fetch_message(job.message_id)
        except discord.HTTPException:
            return None
        if status.reference is not None and status.reference.message_id is not None:
            return discord.MessageReference(message_id=status.reference.message_id, channel_id=job.channel_id,
                                            fail_if_not_exists=False)
        return status.to_reference(fail_if_not_exists=False)

    async def _tell_owner(self, job: stored.Job, text: str) -> None:
        try:
            user = self._client.get_user(job.owner_id) or await self._client.fetch_user(job.owner_id)
            await user.send(text)
        except discord.HTTPException:
            log.warning("could not tell user %s about job %s either", job.owner_id, job.id)

    async def _close_status(self, job: stored.Job, text: str) -> None:
        """The status message's last words, without its Cancel button."""
        status = self._status.get(job.id)
        try:
            if status is not None and status.edit is not None:
                await status.edit(content=f"<@{job.owner_id}> {text}", view=None, attachments=[])
            elif job.message_id is not None:
                channel = self._client.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
                await channel.get_partial_message(job.message_id).edit(content=f"<@{job.owner_id}> {text}", view=None,
                                                                         attachments=[])
        except discord.HTTPException as error:
            log.info("could not update the status of job %s: %s", job.id, error)

    def _upload_limit(self, job: stored.Job) -> int:
        guild = self._client.get_guild(job.guild_id) if job.guild_id is not None else None
        return guild.filesize_limit if guild is not None else DEFAULT_UPLOAD_LIMIT

    # -- edits --

    def _show(self, job_id: str, text: str, preview: bytes | None = None) -> None:
        """Show `text` on the job's status message: at once if the last edit is older than
        `progress_interval_s`, else when it is; in between only the latest text is kept."""
        status = self._status.get(job_id)
        if status is None or (text == status.text and preview is None):
            return
        status.pending = (text, preview)
        if status.flush is None:
            status.flush = asyncio.create_task(self._flush(status), name=f"status {job_id}")

    async def _flush(self, status: _Status) -> None:
        try:
            await status.acknowledged.wait()
            while status.pending is not None:
                await asyncio.sleep(status.last_edit + self._settings.progress_interval_s - self._clock())
                (text, preview), status.pending = status.pending, None
                status.text, status.last_edit = text, self._clock()
                files = [discord.File(io.BytesIO(preview), filename="preview.png")] if preview else []
                try:
                    assert status.edit is not None  # set with `acknowledged`
                    await status.edit(content=text, **({"attachments": files} if files else {}))
                except discord.HTTPException as error:
                    log.info("could not edit a status message: %s", error)
        finally:
            status.flush = None

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)



def result_text(job: stored.Job, images: list[ImageRecord], uploads: list[Upload | None]) -> str:
    """Mention, prompt, settings, and a line for every image that was altered or left out."""
    r = job.request
    seeds = ", ".join(str(image.seed) for image in images)
    lines = [
        f"<@{job.owner_id}> **{discord.utils.escape_markdown(r.prompt)[:1500]}**",
        f"-# {r.kind} · {r.model} · {r.width}x{r.height} · {r.steps} steps · {r.sampler} · "
        f"guidance {r.guidance:g} · seed {seeds} · `{job.id}`",
    ]
    for number, (image, upload) in enumerate(zip(images, uploads, strict=True), start=1):
        if upload is None:
            why = "has expired" if image.status is not ImageStatus.OK else "is too large to upload here"
            lines.append(f"-# image {number} {why}; see `/show job:{job.id}`")
        elif upload.note is not None:
            lines.append(f"-# image {number} {upload.note}")
    return "\n".join(lines)


def _fit_text(text: str, limit: int = 2000) -> str:
    """Discord refuses messages over 2000 characters: a long error is cut, not lost with its post."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
