"""Who is asking, and whether they may: bans, blocked words, age-restricted prompts, DMs and the
moderators' usage limits, checked on the bot's side before anything is queued. Every broken limit
is told at once (the engine's, the prompt's, the moderators'), so one answer is enough to fix a
request.

`problems` runs inside the queue's submit lock (its `limits` hook), so it only reads, with one
exception for the moderators: a prompt refused for a blocked (or, in a server, an NSFW) word
writes one audit row, saying who tried what, unless the same member's refusal by the same rule
was audited there in the last ten minutes (storage.moderation.REFUSAL_AUDIT_QUIET_S). Any other
refusal writes nothing."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import discord

from bot.config import AppConfig, DiscordSettings
from generation.queue import explain
from generation.request import GenerationRequest
from storage.db import Database
from storage.jobs import Pending, pending
from storage.limits import Usage, effective_limits, usage, usage_times
from storage.moderation import (
    BlockedWord,
    audit_refused_prompt,
    blocked_words,
    first_blocked,
    get_ban,
)
from storage.settings import LimitsSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Requester:
    """The member (or DM user) behind a request, with what the checks need to know about them."""

    user_id: int
    #: None in direct messages.
    guild_id: int | None
    channel_id: int
    role_ids: tuple[int, ...] = ()
    role_names: tuple[str, ...] = ()
    #: Has the Manage Server permission in this guild.
    manage_guild: bool = False
    #: The channel is age-restricted (NSFW).
    channel_nsfw: bool = False

    @classmethod
    def of(cls, user: discord.User | discord.Member, channel: object) -> Requester:
        """From the author of a message or interaction and the channel it happened in."""
        roles = [r for r in getattr(user, "roles", []) if not r.is_default()]
        permissions = getattr(user, "guild_permissions", None)
        guild = getattr(user, "guild", None)
        return cls(
            user_id=user.id,
            guild_id=guild.id if guild is not None else None,
            channel_id=getattr(channel, "id", 0),
            role_ids=tuple(r.id for r in roles),
            role_names=tuple(r.name for r in roles),
            manage_guild=bool(permissions and permissions.manage_guild),
            channel_nsfw=bool(getattr(channel, "is_nsfw", lambda: False)()),
        )


def is_moderator(requester: Requester, settings: DiscordSettings) -> bool:
    """Members with Manage Server or a role named in `[discord] moderator_roles`; nobody in DMs."""
    if requester.guild_id is None:
        return False
    roles = settings.moderator_roles
    return requester.manage_guild or any(role in roles for role in requester.role_names)


@dataclass(frozen=True)
class Allowance:
    """A requester's limits in one place, what they spent of them in the rolling window and
    what their jobs still waiting or running here will spend (charged only when they finish)."""

    limits: LimitsSettings
    used: Usage
    pending: Pending

    @property
    def images_left(self) -> int | None:
        """Images left in the window after the pending jobs; None when unlimited."""
        limit = self.limits.daily_images
        return None if limit is None else max(0, limit - self.used.images - self.pending.images)

    @property
    def cost_left(self) -> float | None:
        limit = self.limits.daily_cost
        return None if limit is None else max(0.0, limit - self.used.cost - self.pending.cost)


async def allowance(db: Database, config: AppConfig, requester: Requester) -> Allowance:
    """The effective limits (user, roles, server, defaults), the usage in their window and
    their unfinished jobs here."""
    limits = await effective_limits(
        db, requester.guild_id, requester.user_id, requester.role_ids, config.limits)
    used = await usage(db, requester.user_id, requester.guild_id, limits.window_hours)
    return Allowance(limits, used, await pending(db, requester.user_id, requester.guild_id))


async def frees_at(
    db: Database, requester: Requester, window_hours: float, *, images: int = 0, cost: float = 0.0
) -> float | None:
    """When enough past usage leaves the window to free `images` images and `cost` units (Unix
    time), or None if the window holds less than that (the request is larger than the limit)."""
    freed_images, freed_cost = 0, 0.0
    for at, row_cost, row_images in await usage_times(db, requester.user_id, requester.guild_id, window_hours):
        freed_images += row_images
        freed_cost += row_cost
        if freed_images >= images and freed_cost >= cost:
            return at + window_hours * 3600
    return None


async def problems(
    db: Database, config: AppConfig, requester: Requester, request: GenerationRequest
) -> list[str]:
    """Every reason `requester` may not run `request` here, written for them; empty if they may.

    Where (DMs) and who (bans) are told alone: nothing else matters then. Otherwise every limit
    the request breaks, at once: the engine's (`[generation]`), the prompt's, then the
    moderators' limits for this member (a field over the engine's limit is not told twice)."""
    if requester.guild_id is None and not config.discord.allow_dms:
        return ["Atelier does not work in direct messages here; use it in a server channel."]
    if requester.guild_id is not None:
        ban = await get_ban(db, requester.guild_id, requester.user_id)
        if ban is not None:
            return [f"You are banned from using Atelier in this server (reason: {ban.reason})."]
    hard = hard_limit_problems(config, request)
    reasons = list(hard.values())
    if (prompt := await _prompt_refusal(db, config.discord, requester, request)) is not None:
        reasons.append(prompt)
    return reasons + await _limits_problems(db, config, requester, request, over_hard=set(hard))


async def refusal(
    db: Database, config: AppConfig, requester: Requester, request: GenerationRequest
) -> str | None:
    """`problems` as one answer (`generation.queue.explain`); None if there are none."""
    reasons = await problems(db, config, requester, request)
    return explain(reasons) if reasons else None


def images(count: int) -> str:
    """'1 image', '4 images': counts as members read them."""
    return f"{count} image" if count == 1 else f"{count} images"


def hard_limit_problems(config: AppConfig, request: GenerationRequest) -> dict[str, str]:
    """The engine's limits from `[generation]`, which no moderator can raise, that `request`
    breaks: what was asked and what is allowed, by field."""
    g = config.generation
    size, pixels = f"{request.width}x{request.height}", request.width * request.height
    broken = {}
    if request.steps > g.max_steps:
        broken["steps"] = f"Steps must be between 1 and {g.max_steps}; you asked for {request.steps}."
    if pixels > g.max_pixels:
        broken["pixels"] = (f"An image may have at most {g.max_pixels} pixels (width x height); "
                            f"{size} has {pixels}.")
    if max(request.width, request.height) > g.max_side:
        broken["side"] = f"Each side of an image must be at most {g.max_side} pixels; you asked for {size}."
    if request.count > g.max_count:
        broken["count"] = f"Count must be between 1 and {g.max_count}; you asked for {request.count}."
    if request.guidance > g.max_guidance:
        broken["guidance"] = (f"Guidance must be between 0 and {g.max_guidance:g}; "
                              f"you asked for {request.guidance:g}.")
    return broken


async def _prompt_refusal(
    db: Database, settings: DiscordSettings, requester: Requester, request: GenerationRequest
) -> str | None:
    """Blocked words (the server's list) and NSFW words (config) in the prompt, each refusal in a
    server audited for its moderators. The negative prompt is not checked: naming what to avoid
    is exactly what it is for."""
    if requester.guild_id is not None:
        word = first_blocked(await blocked_words(db, requester.guild_id), request.prompt)
        if word is not None:
            log.warning("refused a prompt of user %s in guild %s, channel %s: blocked %s %r",
                        requester.user_id, requester.guild_id, requester.channel_id,
                        "pattern" if word.is_regex else "word", word.pattern)
            await _audit_refusal(db, requester, word, request.prompt)
            what = "matches the blocked pattern" if word.is_regex else "contains the blocked word"
            return f"Your prompt {what} `{word.pattern}` in this server; please rephrase it."
    if not requester.channel_nsfw:
        nsfw = first_blocked([BlockedWord(w, is_regex=False) for w in settings.nsfw_words],
                             request.prompt)
        if nsfw is not None:
            await _audit_refusal(db, requester, nsfw, request.prompt, nsfw=True)
            return (f"Your prompt contains `{nsfw.pattern}`, which runs only in age-restricted "
                    "channels; try it in one.")
    return None


async def _audit_refusal(db: Database, requester: Requester, word: BlockedWord, prompt: str,
                         *, nsfw: bool = False) -> None:
    """The audit row of a refused prompt, in servers only: DMs have no moderators to read it.
    Storage skips it when this member's refusal by this rule was audited a moment ago."""
    if requester.guild_id is not None:
        await audit_refused_prompt(db, guild_id=requester.guild_id, user_id=requester.user_id,
                                   channel_id=requester.channel_id, word=word, prompt=prompt,
                                   nsfw=nsfw)


async def _limits_problems(
    db: Database, config: AppConfig, requester: Requester, request: GenerationRequest,
    *, over_hard: set[str],
) -> list[str]:
    """The moderators' limits for this member that `request` breaks: per-request maxima (those
    of fields in `over_hard`, already over the engine's limit, are not told again), queued jobs,
    the window's images and cost."""
    mine = await allowance(db, config, requester)
    limits, broken = mine.limits, []
    # An x4 upscale runs the operator's configured step count, which the member did not choose;
    # its cost still counts against the window below.
    if (limits.max_steps is not None and request.steps > limits.max_steps and not request.x4
            and "steps" not in over_hard):
        broken.append(f"Your limit here is {limits.max_steps} steps; you asked for {request.steps}.")
    pixels = request.width * request.height
    if limits.max_pixels is not None and pixels > limits.max_pixels and "pixels" not in over_hard:
        broken.append(f"Your limit here is {limits.max_pixels} pixels per image; "
                      f"{request.width}x{request.height} has {pixels}.")
    if limits.max_count is not None and request.count > limits.max_count and "count" not in over_hard:
        broken.append(f"Your limit here is {limits.max_count} images per request; "
                      f"you asked for {request.count}.")
    waiting = mine.pending
    if limits.max_queued is not None and waiting.queued >= limits.max_queued:
        broken.append(f"You already have {waiting.queued} jobs waiting here (your limit is "
                      f"{limits.max_queued}); wait for one to start or cancel one.")
    window = f"{limits.window_hours:g} hours"
    left = mine.images_left
    if left is not None and request.count > left:
        limit = limits.daily_images
        when = await frees_at(db, requester, limits.window_hours,
                              images=mine.used.images + waiting.images + request.count - limit)
        held = f" ({waiting.images} in jobs waiting or running)" if waiting.images else ""
        broken.append(f"This request makes {images(request.count)} but you have {left} left of your "
                      f"{limit} per {window}{held}"
                      f"{_freed(when, request, whole=request.count > limit, window=window)}")
    budget = mine.cost_left
    if budget is not None and request.cost > budget:
        limit = limits.daily_cost
        when = await frees_at(db, requester, limits.window_hours,
                              cost=mine.used.cost + waiting.cost + request.cost - limit)
        held = f" ({waiting.cost:.1f} in jobs waiting or running)" if waiting.cost else ""
        # The member chose nothing of an x4 upscale (they pressed U): name what it is instead.
        what, cheaper = ((f"A 4x upscale of this {request.width}x{request.height} image", "")
                         if request.x4 else
                         ("This request", " (fewer images, steps or pixels cost less)"))
        broken.append(f"{what} costs {request.cost:.1f} units but you have {budget:.1f} left of your "
                      f"{limit:g} per {window}{held}{cheaper}"
                      f"{_freed(when, request, whole=request.cost > limit, window=window)}")
    return broken


def _freed(when: float | None, request: GenerationRequest, *, whole: bool, window: str) -> str:
    """The end of a window refusal: when it frees up; or, when finished usage leaving the window
    cannot free enough, why: unfinished jobs hold the rest (they are charged when they finish,
    so no time can be given yet), or the request is over the whole limit (and what helps: asking
    for less, or for an x4 upscale, whose size is the image's, a moderator)."""
    if when is not None:
        return f"; more frees up <t:{int(when) + 1}:R>."
    if not whole:
        return (f"; your jobs waiting or running hold the rest, and count for {window} once "
                "they finish: cancel one, or try again later.")
    if request.x4:
        return ("; that is more than your whole allowance, so it can only run if a moderator "
                "raises your limit.")
    return "; the request is larger than your whole allowance, so ask for less."
