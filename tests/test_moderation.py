"""bot/moderation.py end to end: a real discord.py bot with the moderator commands, against the
loopback Discord server, a real SQLite database and a real FairQueue the test submits to."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import pytest
from discord import app_commands
from discord.ext import commands

from bot.account import account_commands
from bot.config import AppConfig, DiscordSettings
from bot.moderation import moderation_commands, regex_refusal
from bot.policy import Requester, problems
from generation.queue import FairQueue, Job, Refused, Submission
from generation.request import GenerationRequest, JobState
from storage.audit import audit_log
from storage.db import Database
from storage.jobs import cancel_job, create_job, get_job
from storage.limits import effective_limits
from storage.moderation import blocked_words, get_ban
from storage.settings import LimitsSettings, StorageSettings
from tests.discord_server import (
    Channel,
    DiscordServer,
    Guild,
    Message,
    Role,
    User,
    point_discord_py_at,
)

MANAGE_GUILD = discord.Permissions(manage_guild=True).value


class StudioBot(commands.Bot):
    """The smallest bot that serves given commands to one guild."""

    def __init__(self, guild_id: int, served: Iterable[app_commands.Command | app_commands.Group]):
        intents = discord.Intents.none()
        intents.guilds = True
        super().__init__(command_prefix=commands.when_mentioned, intents=intents,
                         guild_ready_timeout=0.05)
        self._home = discord.Object(guild_id)
        self._served = list(served)

    async def setup_hook(self) -> None:
        for command in self._served:
            self.tree.add_command(command, guild=self._home)
        await self.tree.sync(guild=self._home)


@dataclass
class Studio:
    """A guild with #art, a plain member (alice), a Manage Server member (boss), a member of the
    configured moderator role (curator), another member (bob), and the bot's database and queue;
    the bot serves the moderation and the account commands (tests/test_account.py uses it too)."""

    server: DiscordServer
    guild: Guild
    channel: Channel
    alice: User
    bob: User
    boss: User
    curator: User
    artists: Role
    db: Database
    queue: FairQueue
    config: AppConfig

    async def ask(self, user: User, command: str, options: dict[str, Any] | None = None) -> str:
        """Run a slash command as `user` and return the text of the bot's (ephemeral) answer."""
        return (await self.reply(user, command, options)).content

    async def reply(self, user: User, command: str, options: dict[str, Any] | None = None) -> Message:
        """Run a slash command as `user` and return the bot's (ephemeral) answer."""
        interaction = await self.server.slash(user, self.channel, command, options)
        action = await self.server.wait_for(
            lambda a: a.interaction is interaction and a.kind in ("message", "edit")
            and a.message is not None and not a.message.loading)
        assert action.message.ephemeral
        return action.message

    async def submit(self, user: User, prompt: str = "a lighthouse", *, guild_id: int | None = None,
                     **fields: Any) -> Job:
        values = dict(prompt=prompt, model="sd15", steps=20, guidance=7.0, seed=1, width=512,
                      height=512, count=1)
        request = GenerationRequest(**(values | fields))
        guild = self.guild.id if guild_id is None else guild_id
        return await self.queue.submit(Submission(request, user.id, guild))

    async def audit(self) -> list[tuple[str, str, int]]:
        """(action, target, actor) of the guild's audit log, oldest first."""
        return [(e.action, e.target, e.actor_id) for e in reversed(await audit_log(self.db, self.guild.id))]


@pytest.fixture
async def studio(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Studio]:
    config = AppConfig(discord=DiscordSettings(moderator_roles=("Curators",)),
                       storage=StorageSettings(data_dir=tmp_path),
                       limits=LimitsSettings(daily_images=None))
    async with DiscordServer() as server, Database.open(config.storage) as db:
        guild = await server.create_guild("studio")
        channel = await server.create_channel(guild, "art")
        managers = await server.create_role(guild, "Managers", permissions=MANAGE_GUILD)
        curators = await server.create_role(guild, "Curators")
        artists = await server.create_role(guild, "Artists")
        alice, bob, boss, curator = (server.create_user(n) for n in ("alice", "bob", "boss", "curator"))
        await server.add_member(guild, alice, roles=[artists])
        await server.add_member(guild, bob)
        await server.add_member(guild, boss, roles=[managers])
        await server.add_member(guild, curator, roles=[curators])

        async def persist(job: Job) -> None:
            await create_job(db, job.request, owner_id=job.owner_id, channel_id=channel.id,
                             job_id=job.id, guild_id=job.guild_id)

        async def limits(submission: Submission) -> list[str]:
            requester = Requester(submission.owner_id, submission.guild_id, channel.id,
                                  submission.role_ids)
            return await problems(db, config, requester, submission.request)

        queue = FairQueue(config.queue, ("cpu",), limits=limits, persist=persist)

        async def cancel(job_id: str, *, by: int, moderator: bool = False) -> Job:
            job = queue.cancel(job_id, by=by, moderator=moderator)
            if job.state is JobState.CANCELLED:  # queued: the studio records it (running: the runner)
                await cancel_job(db, job.id)
            return job

        async def pause(guild_id: int, paused: bool) -> None:
            queue.pause(guild_id) if paused else queue.resume(guild_id)

        served = [*moderation_commands(db, queue, config, cancel, pause), *account_commands(db, queue, config)]
        bot = StudioBot(guild.id, served)
        with point_discord_py_at(server):
            connection: asyncio.Task[None] | None = None
            try:
                await bot.login(server.token)
                connection = asyncio.create_task(bot.connect(reconnect=False))
                await asyncio.wait_for(bot.wait_until_ready(), 10)
                yield Studio(server, guild, channel, alice, bob, boss, curator, artists, db,
                             queue, config)
            finally:
                await bot.close()
                if connection is not None:
                    await connection
        assert server.log.server_errors == []
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_only_moderators_may_moderate_and_nothing_changes_for_others(studio: Studio) -> None:
    job = await studio.submit(studio.bob)
    attempts = [
        ("limits show", {}), ("limits set", {"scope": "server", "daily_images": 1}),
        ("limits reset", {"scope": "server"}), ("queue show", {}), ("queue cancel", {"job": job.id}),
        ("queue pause", {}), ("queue resume", {}), ("ban", {"user": studio.bob, "reason": "x"}),
        ("unban", {"user": studio.bob}), ("blocklist add", {"pattern": "cat"}),
        ("blocklist remove", {"pattern": "cat"}), ("blocklist list", {}),
        ("audit", {}), ("audit", {"kind": "refused prompts"}),
    ]
    expected = ("Only moderators (members with the Manage Server permission or a role among "
                "Curators) can use /{} in this server.")
    for command, options in attempts:
        assert await studio.ask(studio.alice, command, options) == expected.format(command)
    assert await studio.audit() == []
    assert studio.queue.get(job.id).state is JobState.QUEUED
    assert not studio.queue.is_paused(studio.guild.id)
    assert await get_ban(studio.db, studio.guild.id, studio.bob.id) is None

    for moderator in (studio.boss, studio.curator):
        said = await studio.ask(moderator, "blocklist add", {"pattern": f"word{moderator.name}"})
        assert said == f"Blocked the word `word{moderator.name}`: prompts with it are refused in this server."
    assert await studio.audit() == [
        ("blocklist.add", "word:wordboss", studio.boss.id),
        ("blocklist.add", "word:wordcurator", studio.curator.id),
    ]


async def test_limits_set_show_and_reset_per_scope(studio: Studio) -> None:
    s, db = studio, studio.db
    assert await s.ask(s.boss, "limits set", {"scope": "server", "daily_images": 20, "max_steps": 25}) == (
        "Limits of the server are now: daily_images 20, max_steps 25.")
    assert await s.ask(s.boss, "limits set", {"scope": "role", "target": s.artists, "max_steps": 40}) == (
        f"Limits of <@&{s.artists.id}> are now: max_steps 40.")
    said = await s.ask(s.curator, "limits set",
                       {"scope": "user", "target": s.alice, "daily_images": -1, "max_count": 2})
    assert said == f"Limits of <@{s.alice.id}> are now: daily_images unlimited, max_count 2."

    limits = await effective_limits(db, s.guild.id, s.alice.id, [s.artists.id], s.config.limits)
    assert (limits.daily_images, limits.max_steps, limits.max_count) == (None, 40, 2)
    limits = await effective_limits(db, s.guild.id, s.bob.id, [], s.config.limits)
    assert (limits.daily_images, limits.max_steps, limits.max_count) == (20, 25, None)
    with pytest.raises(Refused, match="Your limit here is 25 steps; you asked for 30."):
        await s.submit(s.bob, steps=30)

    shown = await s.ask(s.boss, "limits show")
    assert shown.splitlines()[1:] == [
        "the server: daily_images 20, max_steps 25",
        f"<@&{s.artists.id}>: max_steps 40",
        f"<@{s.alice.id}>: daily_images unlimited, max_count 2",
    ]
    await s.submit(s.alice, count=2)  # waiting: not used yet, but held
    shown = await s.ask(s.boss, "limits show", {"target": s.alice})
    assert shown.splitlines()[1:] == [
        f"<@{s.alice.id}>: daily_images unlimited, max_count 2",
        f"In effect for <@{s.alice.id}>: daily_images unlimited, daily_cost unlimited, "
        "max_queued unlimited, max_steps 40, max_pixels unlimited, max_count 2; used 0 images and "
        "0.0 units in the last 24 hours, 2 images and 40.0 units in jobs waiting or running",
    ]

    refusals = {
        ("role", None): "scope:role needs a role as target.",
        ("server", s.artists): "scope:server applies to everyone; give no target.",
        ("user", s.artists): "scope:user needs a member as target.",
        ("role", s.guild.everyone): "@everyone is the whole server: use scope:server.",
    }
    for (scope, target), expected in refusals.items():
        options = {"scope": scope, "max_steps": 10} | ({"target": target} if target else {})
        assert await s.ask(s.boss, "limits set", options) == expected
    assert await s.ask(s.boss, "limits set", {"scope": "server", "max_steps": 61}) == (
        "max_steps can be at most 60, the engine's limit in [generation]; -1 means no limit of "
        "its own (the engine's limit still holds).")
    assert await s.ask(s.boss, "limits set", {"scope": "server", "max_steps": 0}) == (
        "Nothing was changed: invalid limit (max_steps: Input should be greater than or equal to "
        "1); -1 means no limit of its own.")
    said = await s.ask(s.boss, "limits set", {"scope": "server"})
    assert said.startswith("Give at least one limit to set: daily_images, daily_cost,")

    assert await s.ask(s.boss, "limits reset", {"scope": "user", "target": s.alice}) == (
        f"Removed the limits of <@{s.alice.id}>; it now follows the server's limits.")
    assert await s.ask(s.boss, "limits reset", {"scope": "user", "target": s.alice}) == (
        f"<@{s.alice.id}> had no limits of its own; nothing was changed.")
    limits = await effective_limits(db, s.guild.id, s.alice.id, [s.artists.id], s.config.limits)
    assert (limits.daily_images, limits.max_steps, limits.max_count) == (20, 40, None)
    assert await s.audit() == [
        ("limits.set", f"guild:{s.guild.id}", s.boss.id),
        ("limits.set", f"role:{s.artists.id}", s.boss.id),
        ("limits.set", f"user:{s.alice.id}", s.curator.id),
        ("limits.clear", f"user:{s.alice.id}", s.boss.id),
    ]


async def test_queue_show_cancel_pause_and_resume(studio: Studio) -> None:
    s, queue = studio, studio.queue
    first = await s.submit(s.alice, "a *red* lighthouse")
    second = await s.submit(s.alice, "x" * 50, count=2)
    third = await s.submit(s.bob, "a boat")
    elsewhere = await s.submit(s.bob, "not here", guild_id=s.guild.id + 1, width=576)  # batches with neither
    [running] = queue.next_batch("cpu", max_images=1)
    assert running is first

    shown = (await s.ask(s.boss, "queue show")).splitlines()
    # At 10 units/s: first (20 units) ends at 2 s; then the other server's turn (22.5 units,
    # 2..4.25 s), then bob's job, with alice's second job (held back while her first one ran) in
    # the same batch.
    assert shown == [
        "The queue is running. Positions count every server this bot serves.",
        f"`{first.id}` running on cpu · <@{s.alice.id}> · cost 20.0 · \"a \\*red\\* lighthouse\"",
        f"`{third.id}` #2, starts in ~4 s · <@{s.bob.id}> · cost 20.0 · \"a boat\"",
        f"`{second.id}` #3, starts in ~4 s · <@{s.alice.id}> · cost 40.0 · \"{'x' * 39}…\"",
    ]

    offered = await s.server.autocomplete(s.curator, s.channel, "queue cancel", {"job": ""}, "job")
    assert [c["value"] for c in offered] == [first.id, third.id, second.id]
    assert offered[1]["name"] == f"{third.id} #2, starts in ~4 s · a boat"
    typed = await s.server.autocomplete(s.curator, s.channel, "queue cancel", {"job": second.id[:9]}, "job")
    assert [c["value"] for c in typed] == [second.id]
    assert await s.server.autocomplete(s.alice, s.channel, "queue cancel", {"job": ""}, "job") == []

    assert await s.ask(s.curator, "queue cancel", {"job": elsewhere.id}) == (
        f"There is no queued or running job `{elsewhere.id}` in this server; /queue show lists them.")
    assert await s.ask(s.curator, "queue cancel", {"job": second.id}) == (
        f"Cancelled `{second.id}` of <@{s.alice.id}>.")
    assert queue.get(second.id) is None and len(queue) == 2
    assert (await get_job(s.db, second.id)).state is JobState.CANCELLED
    assert await s.ask(s.curator, "queue cancel", {"job": first.id}) == (
        f"`{first.id}` of <@{s.alice.id}> stops at its next step.")
    assert first.cancel_reason == "cancelled by a moderator" and first.state is JobState.RUNNING

    assert await s.ask(s.boss, "queue pause") == (
        "Paused: no new job of this server starts until /queue resume; other servers' jobs go "
        "on. Running jobs finish.")
    queue.finish(first, JobState.CANCELLED)
    # bob's job here is held; the other server's, queued after it, is not.
    assert queue.is_paused(s.guild.id) and not queue.is_paused(s.guild.id + 1)
    assert queue.next_batch("cpu", max_images=8) == [elsewhere]
    queue.finish(elsewhere, JobState.DONE)
    assert queue.next_batch("cpu", max_images=8) == []
    assert await s.ask(s.boss, "queue pause") == (
        "This server's queue is already paused; /queue resume starts it.")
    assert (await s.ask(s.boss, "queue show")).splitlines() == [
        "This server's queue is paused (none of its jobs starts; /queue resume). "
        "Positions count every server this bot serves.",
        f"`{third.id}` paused · <@{s.bob.id}> · cost 20.0 · \"a boat\"",
    ]
    queue.pause()  # the operator's hold on every server outlasts this server's resume
    assert await s.ask(s.boss, "queue resume") == (
        "Resumed: this server's queued jobs start again once the operator's hold on every "
        "server ends.")
    assert (await s.ask(s.boss, "queue show")).splitlines()[0] == (
        "The queue is on hold for every server by the bot's operator. "
        "Positions count every server this bot serves.")
    assert await s.ask(s.boss, "queue resume") == "This server's queue is not paused."
    assert queue.next_batch("cpu", max_images=8) == []
    queue.resume()
    assert queue.next_batch("cpu", max_images=8) == [third]  # dispatching again
    assert await s.audit() == [
        ("queue.cancel", f"job:{second.id}", s.curator.id),
        ("queue.cancel", f"job:{first.id}", s.curator.id),
        ("queue.pause", "queue", s.boss.id),
        ("queue.resume", "queue", s.boss.id),
    ]
    # /audit user: finds the cancels of the member's jobs, though a moderator did them.
    about_alice = (await s.ask(s.boss, "audit", {"user": s.alice})).splitlines()
    assert [line.split(" ")[2:5] for line in about_alice[1:]] == [
        [f"<@{s.curator.id}>", "queue.cancel", f"`job:{job.id}`:"] for job in (first, second)]
    assert await s.ask(s.boss, "audit", {"user": s.bob}) == (
        f"No audit entries by or about <@{s.bob.id}> in this server.")


async def test_ban_refuses_submissions_and_cancels_queued_jobs_until_unban(studio: Studio) -> None:
    s = studio
    waiting = [await s.submit(s.bob), await s.submit(s.bob)]
    kept = await s.submit(s.alice)
    said = await s.ask(s.boss, "ban", {"user": s.bob, "reason": "flooding the queue"})
    assert said == (f"Banned <@{s.bob.id}> from Atelier in this server (reason: flooding the "
                    "queue). 2 queued jobs of theirs were cancelled.")
    assert [s.queue.get(j.id) for j in waiting] == [None, None] and s.queue.get(kept.id) is kept
    assert [(await get_job(s.db, j.id)).state for j in waiting] == [JobState.CANCELLED] * 2
    with pytest.raises(Refused, match=r"^You are banned from using Atelier in this server "
                                      r"\(reason: flooding the queue\)\.$"):
        await s.submit(s.bob)
    await s.submit(s.bob, guild_id=s.guild.id + 1)  # other servers are theirs to moderate

    assert await s.ask(s.curator, "unban", {"user": s.bob}) == (
        f"<@{s.bob.id}> may use Atelier in this server again.")
    assert await s.ask(s.curator, "unban", {"user": s.bob}) == (
        f"<@{s.bob.id}> is not banned here; nothing was changed.")
    await s.submit(s.bob)
    assert [a for a, _, _ in await s.audit()] == ["ban", "queue.cancel", "queue.cancel", "unban"]


async def test_blocklist_add_list_remove_and_bad_patterns(studio: Studio) -> None:
    s = studio
    assert await s.ask(s.boss, "blocklist list") == "Nothing is blocked in this server."
    assert await s.ask(s.boss, "blocklist add", {"pattern": " Gore "}) == (
        "Blocked the word `gore`: prompts with it are refused in this server.")
    assert await s.ask(s.boss, "blocklist add", {"pattern": r"bl[o0]+d", "regex": True}) == (
        "Blocked the pattern `bl[o0]+d`: prompts with it are refused in this server.")
    assert await s.ask(s.boss, "blocklist add", {"pattern": "(a+)+$", "regex": True}) == (
        "Not added: a repeated group may not contain repeats or alternatives (that backtracks "
        "exponentially); use a character class such as [ab]+ or a bounded `?`.")
    assert await s.ask(s.boss, "blocklist add", {"pattern": "[oops", "regex": True}) == (
        "Not added: `[oops` is not a valid regular expression: unterminated character set at "
        "position 0.")
    assert await s.ask(s.boss, "blocklist list") == (
        "Blocked in this server:\nword `gore`\npattern `bl[o0]+d`")
    with pytest.raises(Refused, match="matches the blocked pattern `bl\\[o0\\]\\+d`"):
        await s.submit(s.alice, "a bl00dy moon")

    assert await s.ask(s.boss, "blocklist remove", {"pattern": "GORE"}) == "Unblocked the word `GORE`."
    assert await s.ask(s.boss, "blocklist remove", {"pattern": "gore"}) == (
        "The word `gore` is not blocked here; /blocklist list shows what is.")
    assert [w.pattern for w in await blocked_words(s.db, s.guild.id)] == ["bl[o0]+d"]
    await s.submit(s.alice, "gore")
    assert await s.audit() == [
        ("blocklist.add", "word:gore", s.boss.id),
        ("blocklist.add", "regex:bl[o0]+d", s.boss.id),
        ("prompt.refused", "regex:bl[o0]+d", s.alice.id),
        ("blocklist.remove", "word:gore", s.boss.id),
    ]


async def test_audit_shows_refused_prompts_and_moderator_actions_by_kind_and_user(studio: Studio) -> None:
    s = studio
    await s.ask(s.boss, "blocklist add", {"pattern": "gore"})
    with pytest.raises(Refused):
        await s.submit(s.alice, "a *gore* scene")
    with pytest.raises(Refused):
        await s.submit(s.bob, "a nude statue")  # #art is not age-restricted
    await s.ask(s.curator, "ban", {"user": s.bob, "reason": "trying"})
    await s.ask(s.boss, "limits set", {"scope": "user", "target": s.alice, "max_steps": 30})
    await s.ask(s.boss, "queue pause")
    entries = await audit_log(s.db, s.guild.id)
    assert [e.action for e in entries] == [
        "queue.pause", "limits.set", "ban", "prompt.refused", "prompt.refused", "blocklist.add"]
    pause, limits, banned, nude, gore, blocked = (
        f"`#{e.id}` <t:{int(e.at)}:f> <@{e.actor_id}>" for e in entries)
    refusals = [
        f"{nude} was refused by `nsfw:nude` in <#{s.channel.id}>: \"a nude statue\"",
        f"{gore} was refused by `word:gore` in <#{s.channel.id}>: \"a \\*gore\\* scene\"",
    ]
    assert (await s.ask(s.curator, "audit", {"kind": "refused prompts"})).splitlines() == [
        "Audit entries of kind refused prompts, newest first:", *refusals]

    shown = (await s.ask(s.boss, "audit")).splitlines()
    assert shown[0] == "Audit entries, newest first:"
    assert shown[1:] == [
        f"{pause} queue.pause `queue`: {{\"paused\": false}} → {{\"paused\": true}}",
        f"{limits} limits.set <@{s.alice.id}>: none → {{\"max\\_steps\": 30}}",
        f"{banned} ban <@{s.bob.id}>: none → {{\"banned\\_by\": {s.curator.id}, \"reason\": \"trying\"}}",
        *refusals,
        f"{blocked} blocklist.add `word:gore`: none → {{\"is\\_regex\": false, \"pattern\": \"gore\"}}",
    ]
    about_bob = (await s.ask(s.boss, "audit", {"user": s.bob})).splitlines()
    assert about_bob == [f"Audit entries by or about <@{s.bob.id}>, newest first:", shown[3], refusals[0]]
    assert await s.ask(s.boss, "audit", {"kind": "bans", "user": s.alice}) == (
        f"No audit entries of kind bans by or about <@{s.alice.id}> in this server.")


async def test_audit_pages_fit_one_message_and_lead_to_the_next(studio: Studio) -> None:
    s = studio
    # Nine rules: one member's refusals by one rule are audited once per ten minutes.
    words = [letter * 40 for letter in "abcdefghi"]
    for word in words:
        await s.ask(s.boss, "blocklist add", {"pattern": word})
        with pytest.raises(Refused):
            await s.submit(s.alice, f"{word} {'*' * 400}")  # escaped, each * takes two characters
    filters = {"kind": "refused prompts", "user": s.alice}
    first = await s.ask(s.boss, "audit", filters)
    lines = first.splitlines()
    assert len(first) <= 2000 and len(lines) == 10  # 8 entries
    for line, word in zip(lines[1:-1], reversed(words), strict=False):
        refused = f'was refused by `word:{word}` in <#{s.channel.id}>: "{word} ' + "\\*" * 20
        assert refused in line and line.endswith("…")
    oldest_shown = int(lines[-2].split("`#")[1].split("`")[0])
    assert lines[-1] == f"Older ones: /audit before:{oldest_shown} (with the same kind and user)."
    rest = (await s.ask(s.boss, "audit", filters | {"before": oldest_shown})).splitlines()
    assert rest[0] == (f"Audit entries of kind refused prompts by or about <@{s.alice.id}> older than "
                       f"#{oldest_shown}, newest first:")
    assert len(rest) == 2 and int(rest[1].split("`#")[1].split("`")[0]) < oldest_shown


@pytest.mark.parametrize("pattern", [
    r"n[s5]fw", r"\bkill(s|ed|ing)?\b", r"bl[o0]+d", r"foo|bar|baz", r"x{0,3}y{0,3}z",
    r"[]a]+b", r"\w+",
])
def test_cheap_patterns_are_admitted(pattern: str) -> None:
    assert regex_refusal(pattern) is None


@pytest.mark.parametrize(("pattern", "why"), [
    (r"(a+)+$", "repeated group may not contain repeats"),
    (r"(?:a|b)*c", "repeated group may not contain repeats or alternatives"),
    (r"a.*b.*c", "at most one unbounded repeat"),  # cubic in the prompt length
    (r"\w*\w*x", "at most one unbounded repeat"),
    (r"(x|y).*z", "only in a pattern without other choices"),
    ("a?" * 13 + "b", "small bounded repeats"),  # 2**13 ways at each place
    (r"(a)\1", "escape `\\1` is not supported"),
    (r"(?=x)y", "only plain groups"),
    ("a" * 101, "at most 100 characters"),
])
def test_costly_or_unboundable_patterns_are_refused(pattern: str, why: str) -> None:
    assert why in regex_refusal(pattern)
