"""Moderator slash commands: /limits, /queue, /ban, /unban, /blocklist and /audit.

Every command checks on the bot's side that the member moderates this server (Manage Server or a
role named in `[discord] moderator_roles`): Discord's default permissions are only a hint that
server admins may change, so they are not relied on (and are left unset, so that members of a
moderator role without Manage Server can see the commands). Each command acts on its own server
only and every change leaves an audit row through storage, which /audit reads back together
with the prompts blocked words refused. Answers are ephemeral.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import discord
from discord import app_commands

from bot.config import AppConfig, DiscordSettings
from bot.policy import Requester, allowance, is_moderator
from generation.queue import FairQueue, Job, JobView
from generation.request import GenerationRequest, JobState
from storage.audit import AuditEntry, audit_log, write_audit
from storage.db import Database
from storage.limits import OVERRIDABLE, Scope, clear_limits, guild_overrides, set_limits
from storage.moderation import ban, block_word, blocked_words, unban, unblock_word

log = logging.getLogger(__name__)

#: Longest blocked regular expression (storage allows longer; patterns are typed by hand).
MAX_REGEX_LENGTH = 100
#: Largest number of ways one regular expression may try to match at one place in a prompt.
MAX_MATCH_WAYS = 5000
#: Longest prompt a pattern runs on.
PROMPT_MAX_CHARS: int = next(
    m.max_length for m in GenerationRequest.model_fields["prompt"].metadata
    if hasattr(m, "max_length"))
#: Discord's limit on one message's content.
_MESSAGE_CHARS = 2000
#: Queued jobs listed by /queue show (the rest are counted).
_QUEUE_LINES = 15
#: Option value meaning "no limit of its own" in /limits set.
UNLIMITED = -1
_SCOPES = {"server": Scope.GUILD, "role": Scope.ROLE, "user": Scope.USER}
#: /audit kind: the actions each kind shows.
AUDIT_KINDS: dict[str, tuple[str, ...]] = {
    "refused prompts": ("prompt.refused",),
    "limits": ("limits.set", "limits.clear"),
    "bans": ("ban", "unban"),
    "blocklist": ("blocklist.add", "blocklist.remove"),
    "queue": ("queue.pause", "queue.resume", "queue.cancel"),
    "add-ons": ("addons.allow", "addons.disallow", "addons.reset"),
}
#: Entries on one /audit page, each cut to `_AUDIT_LINE_CHARS`, so that a page with its first and
#: last lines (at most 200 characters together) fits one message.
_AUDIT_LINES = 8
_AUDIT_LINE_CHARS = (_MESSAGE_CHARS - 200) // _AUDIT_LINES - 1

Target = discord.User | discord.Member | discord.Role


#: Cancels a job and records it, telling its owner (`bot.studio.Studio.cancel`):
#: cancel(job_id, by=user id, moderator=True) -> the job; raises `Refused`.
Cancel = Callable[..., Awaitable[Job]]
#: pause(guild_id, paused): pause or resume a guild's queue and tell its waiting jobs (`Studio.pause`).
Pause = Callable[[int, bool], Awaitable[None]]


def moderation_commands(
    db: Database, queue: FairQueue, config: AppConfig, cancel: Cancel, pause: Pause
) -> list[app_commands.Group | app_commands.Command[Any, ..., None]]:
    """The moderator commands, for the client to add to its command tree."""
    return [
        LimitsCommands(db, config),
        QueueCommands(db, queue, config, cancel, pause),
        BlocklistCommands(db, config),
        *_ban_commands(db, queue, config, cancel),
        _audit_command(db, config),
    ]


# ---------------------------------------------------------------------------------------------
# Who may moderate, errors, audit.


async def _only_moderators(interaction: discord.Interaction, settings: DiscordSettings) -> bool:
    """The bot-side permission check: answers non-moderators itself and returns False."""
    if interaction.guild_id is not None and is_moderator(
            Requester.of(interaction.user, interaction.channel), settings):
        return True
    roles = ", ".join(settings.moderator_roles)
    who = "members with the Manage Server permission"
    if roles:
        who += f" or a role among {roles}"
    name = interaction.command.qualified_name if interaction.command else "this command"
    await interaction.response.send_message(
        f"Only moderators ({who}) can use /{name} in this server.", ephemeral=True)
    return False


async def _on_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
    """Refused checks were already answered; anything else is our bug: log it, tell the member."""
    if isinstance(error, app_commands.CheckFailure):
        return
    name = interaction.command.qualified_name if interaction.command else "?"
    log.error("/%s failed in guild %s", name, interaction.guild_id, exc_info=error)
    await answer(interaction, "Something went wrong on Atelier's side; it is logged. "
                               "Nothing was changed unless this message says so.")


async def answer(interaction: discord.Interaction, content: str, **extra: Any) -> None:
    """An ephemeral answer, as the response or, if that was used, a followup."""
    if interaction.response.is_done():
        await interaction.followup.send(content, ephemeral=True, **extra)
    else:
        await interaction.response.send_message(content, ephemeral=True, **extra)


async def _audit(db: Database, interaction: discord.Interaction, action: str, target: str,
                 before: Any, after: Any) -> None:
    """An audit row for an action that storage does not audit itself (the queue lives in memory)."""
    assert interaction.guild_id is not None  # moderator commands are guild-only
    async with db.writing() as connection:
        await write_audit(connection, at=db.now(), guild_id=interaction.guild_id,
                          actor_id=interaction.user.id, action=action, target=target,
                          before=before, after=after)


class ModeratorGroup(app_commands.Group):
    """A guild-only command group whose commands run for moderators only."""

    def __init__(self, settings: DiscordSettings) -> None:
        super().__init__(guild_only=True)
        self._settings = settings

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        return await _only_moderators(interaction, self._settings)

    async def on_error(self, interaction: discord.Interaction,
                       error: app_commands.AppCommandError) -> None:
        await _on_error(interaction, error)


def fit_lines(lines: list[str]) -> str:
    """Join lines into one message, dropping whole lines past Discord's length limit."""
    text = ""
    for index, line in enumerate(lines):
        more = f"\n... and {len(lines) - index} more lines"
        if len(text) + len(line) + 1 + len(more) > _MESSAGE_CHARS:
            return text + more
        text += ("\n" if text else "") + line
    return text


# ---------------------------------------------------------------------------------------------
# /limits


class LimitsCommands(ModeratorGroup, name="limits",
                     description="Usage limits per server, role and user"):
    def __init__(self, db: Database, config: AppConfig) -> None:
        super().__init__(config.discord)
        self._db = db
        self._config = config

    @app_commands.command(name="show", description="Show the limits set in this server")
    @app_commands.describe(target="A member (with their effective limits) or a role; "
                                  "empty for all")
    async def show(self, interaction: discord.Interaction, target: Target | None = None) -> None:
        assert interaction.guild_id is not None
        overrides = await guild_overrides(self._db, interaction.guild_id)
        lines = [f"Defaults from the configuration: {_describe(self._config.limits.model_dump())}"]
        for (scope, target_id), values in sorted(overrides.items()):
            if target is None or target.id == target_id:
                lines.append(f"{_name(scope, target_id)}: {_describe(values)}")
        if isinstance(target, discord.Member):
            member = Requester.of(target, interaction.channel)
            mine = await allowance(self._db, self._config, member)
            lines.append(f"In effect for {target.mention}: "
                         f"{_describe(mine.limits.model_dump())}; used {mine.used.images} images "
                         f"and {mine.used.cost:.1f} units in the last "
                         f"{mine.limits.window_hours:g} hours, {mine.pending.images} images and "
                         f"{mine.pending.cost:.1f} units in jobs waiting or running")
        elif target is not None and len(lines) == 1:
            lines.append(f"{target.mention} has no limits of its own.")
        await answer(interaction, fit_lines(lines), allowed_mentions=discord.AllowedMentions.none())

    @app_commands.command(name="set", description="Set limits for the server, a role or a user "
                                                  f"({UNLIMITED} = no limit of its own)")
    @app_commands.describe(
        scope="server: everyone here; role: members of a role (the most generous role wins); "
              "user: one member (beats roles)",
        target="The role or user (not needed for server)",
        daily_images="Images per window", daily_cost="Cost units per window (a 25-step "
                                                     "512x512 image costs 25)",
        max_queued="Jobs waiting at once", max_steps="Steps per image",
        max_pixels="Width x height of one image", max_count="Images per request")
    async def set_(
        self,
        interaction: discord.Interaction,
        scope: Literal["server", "role", "user"],
        target: Target | None = None,
        daily_images: app_commands.Range[int, UNLIMITED] | None = None,
        daily_cost: app_commands.Range[float, UNLIMITED] | None = None,
        max_queued: app_commands.Range[int, UNLIMITED] | None = None,
        max_steps: app_commands.Range[int, UNLIMITED] | None = None,
        max_pixels: app_commands.Range[int, UNLIMITED] | None = None,
        max_count: app_commands.Range[int, UNLIMITED] | None = None,
    ) -> None:
        given = {"daily_images": daily_images, "daily_cost": daily_cost, "max_queued": max_queued,
                 "max_steps": max_steps, "max_pixels": max_pixels, "max_count": max_count}
        values = {k: (None if v == UNLIMITED else v) for k, v in given.items() if v is not None}
        problem = _target_problem(interaction, scope, target) or self._values_problem(values)
        if problem is not None:
            await answer(interaction, problem)
            return
        target_id = _target_id(interaction, scope, target)
        try:
            await set_limits(self._db, actor_id=interaction.user.id,
                             guild_id=interaction.guild_id, scope=_SCOPES[scope],
                             target_id=target_id, values=values, defaults=self._config.limits)
        except ValueError as error:
            reason = str(error).removesuffix("; None means unlimited")  # storage's wording
            await answer(interaction, f"Nothing was changed: {reason}; {UNLIMITED} means no "
                                       "limit of its own.")
            return
        now = (await guild_overrides(self._db, interaction.guild_id))[(_SCOPES[scope], target_id)]
        await answer(interaction, f"Limits of {_name(_SCOPES[scope], target_id)} are now: "
                                   f"{_describe(now)}.",
                      allowed_mentions=discord.AllowedMentions.none())

    @app_commands.command(name="reset", description="Remove the limits of the server, a role "
                                                    "or a user (they follow the next level)")
    @app_commands.describe(scope="Which level", target="The role or user (not needed for server)")
    async def reset(self, interaction: discord.Interaction,
                    scope: Literal["server", "role", "user"], target: Target | None = None) -> None:
        problem = _target_problem(interaction, scope, target)
        if problem is not None:
            await answer(interaction, problem)
            return
        target_id = _target_id(interaction, scope, target)
        name = _name(_SCOPES[scope], target_id)
        removed = await clear_limits(self._db, actor_id=interaction.user.id,
                                     guild_id=interaction.guild_id, scope=_SCOPES[scope],
                                     target_id=target_id)
        follows = "the configuration's defaults" if scope == "server" else "the server's limits"
        content = (f"Removed the limits of {name}; it now follows {follows}." if removed
                   else f"{name} had no limits of its own; nothing was changed.")
        await answer(interaction, content, allowed_mentions=discord.AllowedMentions.none())

    def _values_problem(self, values: Mapping[str, Any]) -> str | None:
        """No limit given, or one above the engine's hard limits (which no override can raise)."""
        if not values:
            return f"Give at least one limit to set: {', '.join(OVERRIDABLE)}."
        engine = self._config.generation
        for field, cap in (("max_steps", engine.max_steps), ("max_pixels", engine.max_pixels),
                           ("max_count", engine.max_count)):
            if values.get(field) is not None and values[field] > cap:
                return (f"{field} can be at most {cap}, the engine's limit in [generation]; "
                        f"{UNLIMITED} means no limit of its own (the engine's limit still holds).")
        return None


def _target_problem(interaction: discord.Interaction, scope: str,
                    target: Target | None) -> str | None:
    if scope == "server":
        return None if target is None else "scope:server applies to everyone; give no target."
    if scope == "role" and not isinstance(target, discord.Role):
        return "scope:role needs a role as target."
    if scope == "role" and target.id == interaction.guild_id:
        return "@everyone is the whole server: use scope:server."
    if scope == "user" and not isinstance(target, discord.User | discord.Member):
        return "scope:user needs a member as target."
    return None


def _target_id(interaction: discord.Interaction, scope: str, target: Target | None) -> int:
    assert interaction.guild_id is not None
    return interaction.guild_id if target is None else target.id


def _name(scope: Scope, target_id: int) -> str:
    return {Scope.GUILD: "the server", Scope.ROLE: f"<@&{target_id}>",
            Scope.USER: f"<@{target_id}>"}[scope]


def _describe(values: Mapping[str, Any]) -> str:
    """Overridable limits as "daily_images 20, max_steps unlimited" (only those present)."""
    shown = [f"{field} {'unlimited' if values[field] is None else f'{values[field]:g}'}"
             for field in OVERRIDABLE if field in values]
    return ", ".join(shown) or "nothing set"


# ---------------------------------------------------------------------------------------------
# /queue


class QueueCommands(ModeratorGroup, name="queue", description="This server's generation queue"):
    def __init__(self, db: Database, queue: FairQueue, config: AppConfig, cancel: Cancel, pause: Pause) -> None:
        super().__init__(config.discord)
        self._db = db
        self._queue = queue
        self._cancel = cancel
        self._pause = pause

    @app_commands.command(name="show", description="Running and queued jobs of this server, "
                                                   "in the order they will run")
    async def show(self, interaction: discord.Interaction) -> None:
        snapshot = self._queue.snapshot(await self._queue.estimates_in_thread())
        running = [v for v in snapshot.running if v.guild_id == interaction.guild_id]
        queued = [v for v in snapshot.queued if v.guild_id == interaction.guild_id]
        lines = [f"{_queue_state(snapshot.paused, self._queue.is_paused(interaction.guild_id))} "
                 "Positions count every server this bot serves."]
        lines += [self._line(view) for view in (*running, *queued[:_QUEUE_LINES])]
        if len(queued) > _QUEUE_LINES:
            lines.append(f"... and {len(queued) - _QUEUE_LINES} more queued")
        if not running and not queued:
            lines.append("Nothing is queued or running in this server.")
        await answer(interaction, fit_lines(lines), allowed_mentions=discord.AllowedMentions.none())

    def _line(self, view: JobView) -> str:
        return (f"`{view.id}` {_where(view)} · <@{view.owner_id}> · cost {view.cost:.1f} · "
                f"\"{discord.utils.escape_markdown(self._prompt(view))}\"")

    def _prompt(self, view: JobView) -> str:
        job = self._queue.get(view.id)
        prompt = job.request.prompt if job is not None else ""
        return prompt if len(prompt) <= 40 else prompt[:39] + "…"

    @app_commands.command(name="cancel", description="Cancel a queued or running job")
    @app_commands.describe(job="The job id, as /queue show lists it")
    async def cancel(self, interaction: discord.Interaction, job: str) -> None:
        job_id = job.strip().lower()
        found = self._queue.get(job_id)
        if found is None or found.guild_id != interaction.guild_id:
            await answer(interaction, f"There is no queued or running job `{job_id}` in this "
                                       "server; /queue show lists them.")
            return
        was = found.state
        await _cancel(self._db, self._cancel, interaction, job_id)
        content = (f"Cancelled `{job_id}` of <@{found.owner_id}>." if was is JobState.QUEUED
                   else f"`{job_id}` of <@{found.owner_id}> stops at its next step.")
        await answer(interaction, content, allowed_mentions=discord.AllowedMentions.none())

    @cancel.autocomplete("job")
    async def _jobs_here(self, interaction: discord.Interaction,
                         current: str) -> list[app_commands.Choice[str]]:
        """This server's jobs in queue order; none for non-moderators (autocomplete skips
        `interaction_check`, and prompts are not theirs to browse)."""
        if not is_moderator(Requester.of(interaction.user, interaction.channel), self._settings):
            return []
        snapshot = self._queue.snapshot(await self._queue.estimates_in_thread())
        views = [v for v in (*snapshot.running, *snapshot.queued)
                 if v.guild_id == interaction.guild_id and v.id.startswith(current.lower())]
        return [app_commands.Choice(name=f"{v.id} {_where(v)} · {self._prompt(v)}"[:100],
                                    value=v.id)
                for v in views[:25]]

    @app_commands.command(name="pause", description="Stop starting this server's jobs (running "
                                                    "ones finish, new ones still queue)")
    async def pause(self, interaction: discord.Interaction) -> None:
        if self._queue.is_paused(interaction.guild_id):
            await answer(interaction, "This server's queue is already paused; /queue resume "
                                       "starts it.")
            return
        await _audit(self._db, interaction, "queue.pause", "queue", {"paused": False},
                     {"paused": True})
        await self._pause(interaction.guild_id, True)  # after the audit row: a failed write changes nothing
        await answer(interaction, "Paused: no new job of this server starts until /queue resume; "
                                   "other servers' jobs go on. Running jobs finish.")

    @app_commands.command(name="resume", description="Start this server's jobs again after "
                                                     "/queue pause")
    async def resume(self, interaction: discord.Interaction) -> None:
        if not self._queue.is_paused(interaction.guild_id):
            await answer(interaction, "This server's queue is not paused.")
            return
        await _audit(self._db, interaction, "queue.resume", "queue", {"paused": True},
                     {"paused": False})
        await self._pause(interaction.guild_id, False)
        held = " once the operator's hold on every server ends" if self._queue.is_paused() else ""
        await answer(interaction, f"Resumed: this server's queued jobs start again{held}.")


async def _cancel(db: Database, cancel: Cancel, interaction: discord.Interaction, job_id: str) -> None:
    """Cancel one job of this guild as a moderator (its owner is told, as for their own Cancel
    button) and audit it. A queued job ends at once; a running one at its next step."""
    await audit_cancel(db, interaction, await cancel(job_id, by=interaction.user.id, moderator=True))


async def audit_cancel(db: Database, interaction: discord.Interaction, job: Job) -> None:
    """The audit row of a job a moderator just cancelled: whose it was and whether it ran."""
    await _audit(db, interaction, "queue.cancel", f"job:{job.id}",
                 {"owner": job.owner_id, "state": "queued" if job.state is JobState.CANCELLED
                  else "running"},
                 {"state": "cancelled", "reason": job.cancel_reason})


def _queue_state(held: bool, paused_here: bool) -> str:
    """The first line of /queue show: this server's pause first, then the operator's hold."""
    if paused_here:
        return "This server's queue is paused (none of its jobs starts; /queue resume)."
    if held:
        return "The queue is on hold for every server by the bot's operator."
    return "The queue is running."


def _where(view: JobView) -> str:
    if view.state is JobState.RUNNING:
        return f"running on {view.device}"
    if view.paused:
        return "paused"
    if view.position is None:
        return "waiting"
    return f"#{view.position}, starts in {_duration(view.starts_in_s or 0.0)}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"~{round(seconds / 60)} min"
    return f"~{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------
# /ban and /unban


def _ban_commands(
    db: Database, queue: FairQueue, config: AppConfig, cancel: Cancel
) -> list[app_commands.Command[Any, ..., None]]:
    settings = config.discord

    @app_commands.command(name="ban", description="Stop a member from using Atelier here "
                                                  "(their queued jobs are cancelled)")
    @app_commands.guild_only()
    @app_commands.describe(user="Who", reason="Shown to them when they try")
    async def ban_command(interaction: discord.Interaction, user: discord.User,
                          reason: app_commands.Range[str, 1, 300]) -> None:
        assert interaction.guild_id is not None
        await ban(db, actor_id=interaction.user.id, guild_id=interaction.guild_id,
                  user_id=user.id, reason=reason)
        waiting = [v.id for v in queue.snapshot(await queue.estimates_in_thread()).queued
                   if v.owner_id == user.id and v.guild_id == interaction.guild_id]
        for job_id in waiting:
            await _cancel(db, cancel, interaction, job_id)
        cancelled = f" {len(waiting)} queued jobs of theirs were cancelled." if waiting else ""
        await answer(interaction, f"Banned {user.mention} from Atelier in this server "
                                   f"(reason: {reason}).{cancelled}",
                      allowed_mentions=discord.AllowedMentions.none())

    @app_commands.command(name="unban", description="Let a banned member use Atelier here again")
    @app_commands.guild_only()
    @app_commands.describe(user="Who")
    async def unban_command(interaction: discord.Interaction, user: discord.User) -> None:
        assert interaction.guild_id is not None
        lifted = await unban(db, actor_id=interaction.user.id, guild_id=interaction.guild_id,
                             user_id=user.id)
        content = (f"{user.mention} may use Atelier in this server again." if lifted
                   else f"{user.mention} is not banned here; nothing was changed.")
        await answer(interaction, content, allowed_mentions=discord.AllowedMentions.none())

    return [_for_moderators(command, settings) for command in (ban_command, unban_command)]


def _for_moderators(command: app_commands.Command[Any, ..., None],
                    settings: DiscordSettings) -> app_commands.Command[Any, ..., None]:
    """A standalone command (not in a `ModeratorGroup`) run for moderators only."""
    command.add_check(lambda interaction: _only_moderators(interaction, settings))
    command.error(_on_error)
    return command


# ---------------------------------------------------------------------------------------------
# /audit


def _audit_command(db: Database, config: AppConfig) -> app_commands.Command[Any, ..., None]:
    @app_commands.command(name="audit", description="Moderator actions and refused prompts in "
                                                    "this server, newest first")
    @app_commands.guild_only()
    @app_commands.describe(kind="Only this kind of entry", user="Only entries by or about them",
                           before="Only entries older than this number (the next page)")
    @app_commands.choices(kind=[app_commands.Choice(name=k, value=k) for k in AUDIT_KINDS])
    async def audit_command(interaction: discord.Interaction, kind: str | None = None,
                            user: discord.User | None = None,
                            before: app_commands.Range[int, 1] | None = None) -> None:
        assert interaction.guild_id is not None
        entries = await audit_log(db, interaction.guild_id,
                                  actions=AUDIT_KINDS[kind] if kind else None,
                                  user_id=user.id if user else None, before_id=before,
                                  limit=_AUDIT_LINES + 1)
        which = "".join([f" of kind {kind}" if kind else "", f" by or about {user.mention}"
                         if user else "", f" older than #{before}" if before else ""])
        if not entries:
            await answer(interaction, f"No audit entries{which} in this server.",
                          allowed_mentions=discord.AllowedMentions.none())
            return
        shown = entries[:_AUDIT_LINES]
        lines = [f"Audit entries{which}, newest first:", *map(_audit_line, shown)]
        if len(entries) > _AUDIT_LINES:
            lines.append(f"Older ones: /audit before:{shown[-1].id} (with the same kind and user).")
        await answer(interaction, "\n".join(lines),
                      allowed_mentions=discord.AllowedMentions.none())

    return _for_moderators(audit_command, config.discord)


def _audit_line(entry: AuditEntry) -> str:
    """`#id`, when, who, and what: the refused prompt and the rule, or the change."""
    head = f"`#{entry.id}` <t:{int(entry.at)}:f> <@{entry.actor_id}>"
    if entry.action == "prompt.refused":
        prompt = discord.utils.escape_markdown(entry.after["prompt"])
        line = (f"{head} was refused by {_audit_target(entry.target)} in "
                f"<#{entry.after['channel_id']}>: \"{prompt}\"")
    else:
        line = (f"{head} {entry.action} {_audit_target(entry.target)}: "
                f"{_audit_value(entry.before)} → {_audit_value(entry.after)}")
    return line if len(line) <= _AUDIT_LINE_CHARS else line[:_AUDIT_LINE_CHARS - 1] + "…"


def _audit_target(target: str) -> str:
    """A member, role or the server as Discord shows them; anything else (a word, a job) as code."""
    scope, _, target_id = target.partition(":")
    if scope in tuple(Scope) and target_id.isdigit():
        return _name(Scope(scope), int(target_id))
    return f"`{target}`"


def _audit_value(value: Any) -> str:
    return "none" if value is None else discord.utils.escape_markdown(
        json.dumps(value, sort_keys=True, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------
# /blocklist


class BlocklistCommands(ModeratorGroup, name="blocklist",
                        description="Words and patterns refused in prompts here"):
    def __init__(self, db: Database, config: AppConfig) -> None:
        super().__init__(config.discord)
        self._db = db

    @app_commands.command(name="add", description="Refuse prompts with a word (whole word, any "
                                                  "case) or a regular expression")
    @app_commands.describe(pattern="The word, or the regular expression if regex is on",
                           regex="Treat the pattern as a regular expression (case-insensitive)")
    async def add(self, interaction: discord.Interaction,
                  pattern: app_commands.Range[str, 1, 200], regex: bool = False) -> None:
        problem = regex_refusal(pattern) if regex else None
        if problem is not None:
            await answer(interaction, f"Not added: {problem}")
            return
        try:
            word = await block_word(self._db, actor_id=interaction.user.id,
                                    guild_id=interaction.guild_id, pattern=pattern, is_regex=regex)
        except ValueError as error:
            await answer(interaction, f"Not added: {error}.")
            return
        what = "pattern" if regex else "word"
        await answer(interaction, f"Blocked the {what} `{word.pattern}`: prompts with it are "
                                   "refused in this server.")

    @app_commands.command(name="remove", description="Allow a blocked word or pattern again")
    @app_commands.describe(pattern="As /blocklist list shows it",
                           regex="It is a regular expression")
    async def remove(self, interaction: discord.Interaction,
                     pattern: app_commands.Range[str, 1, 200], regex: bool = False) -> None:
        removed = await unblock_word(self._db, actor_id=interaction.user.id,
                                     guild_id=interaction.guild_id, pattern=pattern, is_regex=regex)
        what = "pattern" if regex else "word"
        content = (f"Unblocked the {what} `{pattern.strip()}`." if removed else
                   f"The {what} `{pattern.strip()}` is not blocked here; /blocklist list shows "
                   "what is.")
        await answer(interaction, content)

    @app_commands.command(name="list", description="The blocked words and patterns of this server")
    async def list_(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        words = await blocked_words(self._db, interaction.guild_id)
        lines = [f"{'pattern' if w.is_regex else 'word'} `{w.pattern}`" for w in words]
        await answer(interaction, fit_lines(["Blocked in this server:", *lines]) if words
                      else "Nothing is blocked in this server.")


def regex_refusal(pattern: str) -> str | None:
    """Why a blocked regular expression could be too slow to run on every prompt, or None.

    Python's `re` backtracks and has no time limit, and prompt matching runs on the event loop,
    so a pattern is admitted only if its worst case is provably small: we count the ways it can
    try to match at one place in a prompt of `PROMPT_MAX_CHARS` (an unbounded repeat counts as
    that many, a bounded one as its range, alternatives add, sequences multiply) and refuse more
    than `MAX_MATCH_WAYS`. A repeated group may hold no repeats or alternatives of its own
    (nesting is what makes backtracking exponential), and backreferences and lookarounds, which
    this count cannot bound, are refused. This is decided once, when the pattern is added,
    instead of timing every match (which `re` cannot interrupt)."""
    if len(pattern) > MAX_REGEX_LENGTH:
        return (f"a pattern may be at most {MAX_REGEX_LENGTH} characters; "
                f"this one has {len(pattern)}.")
    try:
        re.compile(pattern)
        ways = _Ways(pattern).total()
    except re.error as error:
        return f"`{pattern}` is not a valid regular expression: {error}."
    except _Unbounded as error:
        return f"{error}."
    if ways > MAX_MATCH_WAYS:
        return ("that pattern could take too long on a long prompt: use at most one unbounded "
                "repeat (`*`, `+`, `{n,}`), only in a pattern without other choices, and small "
                "bounded repeats such as `{0,3}` otherwise.")
    return None


class _Unbounded(ValueError):
    """A construct whose matching cost `_Ways` cannot bound."""


class _Ways:
    """Counts match ways of a pattern `re` has already accepted (see `regex_refusal`)."""

    _ATOM_ESCAPES = set("bBwWdDsSAZtnrfv")

    def __init__(self, pattern: str) -> None:
        self._text = pattern
        self._at = 0

    def total(self) -> float:
        return self._alternatives()

    def _peek(self) -> str:
        return self._text[self._at] if self._at < len(self._text) else ""

    def _alternatives(self) -> float:
        ways = self._sequence()
        while self._peek() == "|":
            self._at += 1
            ways += self._sequence()
        return ways

    def _sequence(self) -> float:
        ways = 1.0
        while self._peek() not in ("", "|", ")"):
            atom = self._atom()
            ways *= self._repeat(atom)
        return ways

    def _atom(self) -> float:
        char = self._peek()
        self._at += 1
        if char == "\\":
            escaped = self._peek()
            self._at += 1
            if escaped.isalnum() and escaped not in self._ATOM_ESCAPES:
                raise _Unbounded(f"the escape `\\{escaped}` is not supported in blocked patterns; "
                                 "use \\b \\w \\d \\s (and capitals), or escape punctuation")
            return 1.0
        if char == "[":
            self._skip_class()
            return 1.0
        if char == "(":
            if self._peek() == "?":
                if self._text[self._at:self._at + 2] != "?:":
                    raise _Unbounded("only plain groups `(...)` and `(?:...)` are supported in "
                                     "blocked patterns, not lookarounds, flags or named groups")
                self._at += 2
            ways = self._alternatives()
            self._at += 1  # ")"
            return ways
        return 1.0  # a literal, ".", "^" or "$"

    def _skip_class(self) -> None:
        if self._peek() == "^":
            self._at += 1
        if self._peek() == "]":
            self._at += 1
        while self._peek() != "]":
            self._at += 2 if self._peek() == "\\" else 1
        self._at += 1

    def _repeat(self, ways: float) -> float:
        """The ways of `atom` under the quantifier that follows it, if any."""
        low_high = self._quantifier()
        if low_high is None:
            return ways
        if self._peek() in ("?", "+"):  # lazy or possessive: same worst case
            self._at += 1
        low, high = low_high
        if ways > 1 and (high is None or high > 1):
            raise _Unbounded("a repeated group may not contain repeats or alternatives (that "
                             "backtracks exponentially); use a character class such as [ab]+ "
                             "or a bounded `?`")
        if high is None:
            return float(PROMPT_MAX_CHARS)
        return ways + 1 if ways > 1 else float(high - low + 1)

    def _quantifier(self) -> tuple[int, int | None] | None:
        char = self._peek()
        simple = {"*": (0, None), "+": (1, None), "?": (0, 1)}
        if char in simple:
            self._at += 1
            return simple[char]
        if char != "{":
            return None
        end = self._text.find("}", self._at)
        body = self._text[self._at + 1:end] if end > 0 else ""
        low, comma, high = body.partition(",")
        if not (low.isdigit() or (not low and comma)) or not (high.isdigit() or not high):
            return None  # `re` reads a malformed `{...}` as literal text
        self._at = end + 1
        return int(low or 0), (int(high) if high else None if comma else int(low))
