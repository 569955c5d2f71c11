"""A member's own commands: /history, /show and /usage. Answers are ephemeral.

They work in servers and, read-only as they are, in DMs too. /show shows a job to its owner, or
to anyone in the server where it ran (its result was posted there); a job from a DM or another
server is reported as not found rather than as private, so ids cannot be probed."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import discord
from discord import app_commands

from bot.addons import stored_hashes
from bot.config import AppConfig
from bot.policy import Requester, allowance, frees_at, images
from bot.replies import fit_upload, queue_place
from generation.queue import Estimate, FairQueue
from generation.request import JOB_ID_PATTERN, JobState
from storage.db import Database
from storage.images import ImageStatus, image_file
from storage.jobs import Job, JobDetail, history, job_detail
from storage.moderation import get_ban

#: Discord allows at most this many attachments on one message.
_MAX_FILES = 10
_PROMPT_CHARS = 60


def account_commands(
    db: Database, queue: FairQueue, config: AppConfig
) -> list[app_commands.Command[Any, ..., None]]:
    """/history, /show and /usage, for the client to add to its command tree."""

    @app_commands.command(name="history", description="Your recent jobs, with links to them")
    @app_commands.describe(count="How many (newest first)")
    async def history_command(interaction: discord.Interaction,
                              count: app_commands.Range[int, 1, 25] = 10) -> None:
        jobs = await history(db, interaction.user.id, limit=count)
        lines = [_history_line(job) for job in jobs] or [
            "You have no jobs yet; /imagine makes some."]
        await interaction.response.send_message(
            "\n".join(lines)[:2000], ephemeral=True, suppress_embeds=True)

    @app_commands.command(name="show", description="A job's parameters, images and lineage")
    @app_commands.describe(job="The job id, as /history shows it")
    async def show_command(interaction: discord.Interaction,
                           job: app_commands.Range[str, 1, 40]) -> None:
        job_id = job.strip().lower()
        if not JOB_ID_PATTERN.match(job_id):
            await interaction.response.send_message(
                f"`{discord.utils.escape_markdown(job_id)}` is not a job id: ids are 12 "
                "characters a-z and 2-7, as /history shows them.", ephemeral=True)
            return
        detail = await job_detail(db, job_id)
        if detail is None or not _may_see(detail.job, interaction):
            await interaction.response.send_message(
                f"There is no job `{job_id}` you can see; /history lists yours.", ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        files, skipped = await _files(db, detail, interaction.filesize_limit)
        estimate = (await queue.estimates_in_thread()).get(job_id) if detail.job.state is JobState.QUEUED else None
        text = _describe_job(detail, estimate)
        if (hashes := await stored_hashes(db, detail.images)) is not None:
            text += f"\n{hashes}"
        if skipped:
            text += f"\nNot attached (expired, missing or too large): {images(skipped)}."
        await interaction.followup.send(text[:2000], files=files, ephemeral=True,
                                        allowed_mentions=discord.AllowedMentions.none())

    @show_command.autocomplete("job")
    async def your_jobs(interaction: discord.Interaction,
                        current: str) -> list[app_commands.Choice[str]]:
        jobs = await history(db, interaction.user.id, limit=25)
        return [app_commands.Choice(name=f"{j.id} · {j.state} · {_plain(j.request.prompt)}"[:100],
                                    value=j.id)
                for j in jobs if j.id.startswith(current.strip().lower())]

    @app_commands.command(name="usage", description="What you used in the current window, and "
                                                    "what is left")
    async def usage_command(interaction: discord.Interaction) -> None:
        requester = Requester.of(interaction.user, interaction.channel)
        lines = await _usage_lines(db, config, requester)
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    return [history_command, show_command, usage_command]


def _message_link(job: Job) -> str | None:
    """Where the job's result is; the format Discord's clients open (as `Message.jump_url`)."""
    if job.message_id is None:
        return None
    return f"https://discord.com/channels/{job.guild_id or '@me'}/{job.channel_id}/{job.message_id}"


def _plain(prompt: str) -> str:
    """A prompt on one line, cut to `_PROMPT_CHARS`."""
    prompt = " ".join(prompt.split())
    return prompt if len(prompt) <= _PROMPT_CHARS else prompt[:_PROMPT_CHARS - 1] + "…"


def _short(prompt: str) -> str:
    return discord.utils.escape_markdown(_plain(prompt))


def _history_line(job: Job) -> str:
    request = job.request
    link = _message_link(job)
    where = f" · [result]({link})" if link else ""
    return (f"`{job.id}` <t:{int(job.created_at)}:R> · {job.state} · {request.kind} · "
            f"{request.count}x {request.width}x{request.height} · \"{_short(request.prompt)}\""
            f"{where}")


def _may_see(job: Job, interaction: discord.Interaction) -> bool:
    return job.owner_id == interaction.user.id or (
        job.guild_id is not None and job.guild_id == interaction.guild_id)


async def _files(db: Database, detail: JobDetail, limit: int) -> tuple[list[discord.File], int]:
    """The job's stored images that can be attached (re-encoded to fit the upload limit, as
    results are), and how many could not."""
    files = []
    for image in detail.images:
        if image.status is not ImageStatus.OK or len(files) == _MAX_FILES:
            continue
        try:
            data = await asyncio.to_thread(image_file(db, image).read_bytes)
        except FileNotFoundError:  # retention or a lost disk got there first
            continue
        upload = await asyncio.to_thread(fit_upload, data, limit, f"{detail.job.id}-{image.index + 1}")
        if upload is not None:
            files.append(discord.File(io.BytesIO(upload.data), filename=upload.filename))
    return files, len(detail.images) - len(files)


def _describe_job(detail: JobDetail, estimate: Estimate | None) -> str:
    job, r = detail.job, detail.job.request
    lines = [f"**Job `{job.id}`** by <@{job.owner_id}> · {job.state} · "
             f"<t:{int(job.created_at)}:f>"]
    if estimate is not None:
        lines.append(f"Queued{queue_place(estimate)}")
    if job.error:
        lines.append(f"Error: {job.error}")
    lines.append(f"Prompt: {discord.utils.escape_markdown(r.prompt)}")
    if r.negative_prompt:
        lines.append(f"Negative: {discord.utils.escape_markdown(r.negative_prompt)}")
    settings = [f"{r.kind}", f"model {r.model}", f"sampler {r.sampler}", f"{r.steps} steps",
                f"guidance {r.guidance:g}", f"seed {r.seed}", f"{r.width}x{r.height}",
                images(r.count), f"cost {job.cost:.1f}"]
    if r.strength is not None:
        settings.append(f"strength {r.strength:g}")
    lines.append(" · ".join(settings))
    if detail.images:
        lines.append("Images: " + ", ".join(
            f"{i.index + 1} (seed {i.seed}{'' if i.status is ImageStatus.OK else ', ' + i.status})"
            for i in detail.images))
    child = job
    for parent in detail.parents:
        lines.append(f"Made from image {child.parent_index + 1} of `{parent.id}` "
                     f"({parent.request.kind}, \"{_short(parent.request.prompt)}\")")
        child = parent
    if detail.children:
        lines.append("Made from it: " + ", ".join(
            f"`{c.id}` ({c.request.kind} of image {c.parent_index + 1})" for c in detail.children))
    if link := _message_link(job):
        lines.append(f"Result: {link}")
    return "\n".join(lines)


async def _usage_lines(db: Database, config: AppConfig, requester: Requester) -> list[str]:
    mine = await allowance(db, config, requester)
    limits, used, waiting, engine = mine.limits, mine.used, mine.pending, config.generation
    window = f"{limits.window_hours:g} hours"
    place = "in this server" if requester.guild_id is not None else "in direct messages"
    lines = [f"In the last {window} {place} you ran {used.jobs} jobs: {used.images} images, "
             f"{used.cost:.1f} cost units."]
    if requester.guild_id is not None:
        ban = await get_ban(db, requester.guild_id, requester.user_id)
        if ban is not None:
            lines.append("You are banned from using Atelier in this server "
                         f"(reason: {ban.reason}).")
    lines.append(_left("Images", used.images, waiting.images, limits.daily_images,
                       mine.images_left))
    lines.append(_left("Cost units", used.cost, waiting.cost, limits.daily_cost, mine.cost_left))

    def capped(limit: int | None, hard: int) -> int:
        return hard if limit is None else min(limit, hard)

    # The queue refuses past its own per-user cap whatever the moderators allow.
    queued = capped(limits.max_queued, config.queue.max_queued_per_user)
    lines.append(f"Per request: up to {capped(limits.max_steps, engine.max_steps)} steps, "
                 f"{capped(limits.max_pixels, engine.max_pixels)} pixels per image and "
                 f"{capped(limits.max_count, engine.max_count)} images; jobs waiting at once: "
                 f"at most {queued}.")
    if used.jobs:
        when = await frees_at(db, requester, limits.window_hours)
        if when is not None:
            lines.append(f"Your oldest usage leaves the window <t:{int(when) + 1}:R>.")
    return lines


def _left(what: str, used: float, waiting: float, limit: float | None, left: float | None) -> str:
    """One allowance line; `waiting` (jobs not finished yet) counts against what is left."""
    held = f", {waiting:g} waiting or running" if waiting else ""
    if limit is None or left is None:
        return f"{what}: {used:g} used{held}, no limit."
    return f"{what}: {used:g} of {limit:g} used{held}, {left:g} left."
