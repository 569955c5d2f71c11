"""Moderator limits and their resolution, usage windows, guild settings, bans, blocked words,
and the audit row each moderator action writes in its own transaction."""

from __future__ import annotations

import sqlite3

import pytest

from storage.audit import AuditEntry, audit_log, write_audit
from storage.db import Database
from storage.jobs import create_job, finish_job, start_job
from storage.limits import Scope, clear_limits, effective_limits, resolve_limits, set_limits, usage
from storage.moderation import (
    _RECENT_REFUSAL, REFUSAL_AUDIT_QUIET_S, BlockedWord, audit_refused_prompt, ban, block_word,
    blocked_words, first_blocked, get_ban, get_guild_settings, list_bans, set_guild_setting, unban,
    unblock_word,
)
from storage.settings import LimitsSettings
from tests.fixtures.storage import ManualClock, clock, db  # noqa: F401
from tests.storage_crash_child import sample_request

GUILD, MOD = 500, 900
DEFAULTS = LimitsSettings(daily_images=100, daily_cost=None, max_steps=50)


def test_resolution_order_and_most_generous_role() -> None:
    guild = {"daily_images": 50, "max_steps": 40, "max_count": 4}
    roles = [{"daily_images": 80}, {"daily_images": None}, {"max_steps": 30}, {"max_steps": 60}]
    resolved = resolve_limits(DEFAULTS, guild, roles, {"max_count": 2})
    assert resolved.daily_images is None          # one role says unlimited: the most generous
    assert resolved.max_steps == 60               # the larger of two role values, over the guild
    assert resolved.max_count == 2                # the user's own override beats the guild
    assert resolved.daily_cost is None and resolved.window_hours == DEFAULTS.window_hours
    # A user override wins even against a more generous role.
    user_wins = resolve_limits(DEFAULTS, None, [{"daily_images": None}], {"daily_images": 3})
    assert user_wins.daily_images == 3
    assert resolve_limits(DEFAULTS, None, [], None) == DEFAULTS


async def test_effective_limits_read_the_matching_overrides(db: Database) -> None:
    async def override(scope: Scope, target: int, values: dict, guild: int = GUILD) -> None:
        await set_limits(db, actor_id=MOD, guild_id=guild, scope=scope, target_id=target,
                         values=values, defaults=DEFAULTS)

    await override(Scope.GUILD, GUILD, {"daily_images": 20})
    await override(Scope.ROLE, 100, {"daily_images": 40})
    await override(Scope.ROLE, 200, {"max_steps": 80})
    await override(Scope.USER, 7, {"max_queued": 1})
    await override(Scope.USER, 7, {"daily_images": 0}, guild=GUILD + 1)
    member = await effective_limits(db, GUILD, 7, [100, 300], DEFAULTS)
    assert (member.daily_images, member.max_steps, member.max_queued) == (40, 50, 1)
    other = await effective_limits(db, GUILD, 8, [200], DEFAULTS)
    assert (other.daily_images, other.max_steps, other.max_queued) == (20, 80, None)
    assert (await effective_limits(db, GUILD + 1, 7, [], DEFAULTS)).daily_images == 0
    assert await effective_limits(db, None, 7, [100], DEFAULTS) == DEFAULTS


async def test_limit_changes_are_merged_validated_and_audited(db: Database) -> None:
    args = dict(actor_id=MOD, guild_id=GUILD, scope=Scope.USER, target_id=7, defaults=DEFAULTS)
    await set_limits(db, values={"daily_images": 5}, **args)
    await set_limits(db, values={"max_steps": None}, **args)
    with pytest.raises(ValueError, match="unknown limit bogus; allowed: daily_images"):
        await set_limits(db, values={"bogus": 1}, **args)
    with pytest.raises(ValueError, match="max_steps: Input should be greater than or equal to 1"):
        await set_limits(db, values={"max_steps": 0}, **args)
    assert (await effective_limits(db, GUILD, 7, [], DEFAULTS)).max_steps is None
    assert await clear_limits(db, actor_id=MOD, guild_id=GUILD, scope=Scope.USER, target_id=7)
    assert not await clear_limits(db, actor_id=MOD, guild_id=GUILD, scope=Scope.USER, target_id=7)
    entries = await audit_log(db, GUILD)
    assert [(e.action, e.target, e.before, e.after) for e in entries] == [
        ("limits.clear", "user:7", {"daily_images": 5, "max_steps": None}, None),
        ("limits.set", "user:7", {"daily_images": 5}, {"daily_images": 5, "max_steps": None}),
        ("limits.set", "user:7", None, {"daily_images": 5}),
    ]
    assert all(e.actor_id == MOD and e.guild_id == GUILD for e in entries)


async def test_usage_counts_the_rolling_window_only(db: Database, clock: ManualClock) -> None:
    async def finished_job(count: int) -> None:
        job = await create_job(db, sample_request(count=count), owner_id=7, channel_id=1,
                               guild_id=GUILD)
        await start_job(db, job.id, device="cpu")
        await finish_job(db, job.id)

    await finished_job(count=2)           # at t0
    clock.now += 20 * 3600
    await finished_job(count=1)           # at t0 + 20 h
    clock.now += 5 * 3600                 # now t0 + 25 h: the first job left a 24 h window
    one = sample_request(count=1).cost
    assert (await usage(db, 7, GUILD, window_hours=24)).cost == pytest.approx(one)
    assert (await usage(db, 7, GUILD, window_hours=26)).cost == pytest.approx(3 * one)
    assert (await usage(db, 8, GUILD, window_hours=26)).jobs == 0


async def test_guild_settings_are_audited(db: Database) -> None:
    await set_guild_setting(db, actor_id=MOD, guild_id=GUILD, key="nsfw_channels", value=[1, 2])
    await set_guild_setting(db, actor_id=MOD, guild_id=GUILD, key="default_model", value="sd15")
    await set_guild_setting(db, actor_id=MOD, guild_id=GUILD, key="nsfw_channels", value=None)
    assert await get_guild_settings(db, GUILD) == {"default_model": "sd15"}
    assert await get_guild_settings(db, GUILD + 1) == {}
    latest = (await audit_log(db, GUILD))[0]
    assert (latest.action, latest.target, latest.before, latest.after) == (
        "setting.set", "nsfw_channels", [1, 2], None)


async def test_bans(db: Database, clock: ManualClock) -> None:
    first = await ban(db, actor_id=MOD, guild_id=GUILD, user_id=7, reason="spam")
    assert await get_ban(db, GUILD, 7) == first
    assert await get_ban(db, GUILD + 1, 7) is None
    clock.now += 10
    again = await ban(db, actor_id=MOD + 1, guild_id=GUILD, user_id=7, reason="more spam")
    assert (again.reason, again.banned_by, again.at) == ("more spam", MOD + 1, clock.now)
    assert await list_bans(db, GUILD) == [again]
    assert await unban(db, actor_id=MOD, guild_id=GUILD, user_id=7)
    assert not await unban(db, actor_id=MOD, guild_id=GUILD, user_id=7)
    assert await get_ban(db, GUILD, 7) is None
    assert [(e.action, e.before, e.after) for e in await audit_log(db, GUILD)] == [
        ("unban", {"reason": "more spam", "banned_by": MOD + 1}, None),
        ("ban", {"reason": "spam", "banned_by": MOD},
         {"reason": "more spam", "banned_by": MOD + 1}),
        ("ban", None, {"reason": "spam", "banned_by": MOD}),
    ]


async def test_a_failed_audit_write_undoes_the_action(db: Database) -> None:
    async with db.writing() as connection:
        await connection.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit_log"
                                 " BEGIN SELECT RAISE(ABORT, 'audit refused'); END")
    with pytest.raises(sqlite3.IntegrityError, match="audit refused"):
        await ban(db, actor_id=MOD, guild_id=GUILD, user_id=7, reason="spam")
    with pytest.raises(sqlite3.IntegrityError, match="audit refused"):
        await block_word(db, actor_id=MOD, guild_id=GUILD, pattern="gore")
    assert await get_ban(db, GUILD, 7) is None
    assert await blocked_words(db, GUILD) == []


async def test_blocked_words_and_patterns(db: Database) -> None:
    await block_word(db, actor_id=MOD, guild_id=GUILD, pattern=" Gore ")
    await block_word(db, actor_id=MOD, guild_id=GUILD, pattern=r"blood\w*", is_regex=True)
    await block_word(db, actor_id=MOD, guild_id=GUILD, pattern="gore")  # already there
    words = await blocked_words(db, GUILD)
    assert words == [BlockedWord("gore", False), BlockedWord(r"blood\w*", True)]
    assert first_blocked(words, "a GORE scene") == BlockedWord("gore", False)
    assert first_blocked(words, "gorgeous sunset, gored") is None  # whole words only
    assert first_blocked(words, "Bloodborne poster") == BlockedWord(r"blood\w*", True)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        await block_word(db, actor_id=MOD, guild_id=GUILD, pattern="(unclosed", is_regex=True)
    with pytest.raises(ValueError, match="1..200 characters"):
        await block_word(db, actor_id=MOD, guild_id=GUILD, pattern="   ")
    assert await unblock_word(db, actor_id=MOD, guild_id=GUILD, pattern="Gore")
    assert not await unblock_word(db, actor_id=MOD, guild_id=GUILD, pattern="Gore")
    assert await blocked_words(db, GUILD) == [BlockedWord(r"blood\w*", True)]
    assert [e.action for e in await audit_log(db, GUILD)] == [
        "blocklist.remove", "blocklist.add", "blocklist.add"]


async def test_audit_log_pages_newest_first(db: Database) -> None:
    for n in range(5):
        await ban(db, actor_id=MOD, guild_id=GUILD, user_id=n, reason=f"r{n}")
    await ban(db, actor_id=MOD, guild_id=GUILD + 1, user_id=99, reason="elsewhere")
    first = await audit_log(db, GUILD, limit=3)
    rest = await audit_log(db, GUILD, limit=3, before_id=first[-1].id)
    assert [e.target for e in first + rest] == [f"user:{n}" for n in reversed(range(5))]


async def test_audit_log_filters_by_actions_and_by_the_user_acting_or_concerned(db: Database) -> None:
    await ban(db, actor_id=MOD, guild_id=GUILD, user_id=7, reason="spam")
    await block_word(db, actor_id=MOD, guild_id=GUILD, pattern="gore")
    await audit_refused_prompt(db, guild_id=GUILD, user_id=7, channel_id=3,
                               word=BlockedWord("gore", False), prompt="gore")
    await audit_refused_prompt(db, guild_id=GUILD, user_id=8, channel_id=3,
                               word=BlockedWord("nude", False), prompt="nude", nsfw=True)
    async with db.writing() as connection:  # moderators cancelling jobs of 7 and of 8
        for job, owner in (("job:aaaa", 7), ("job:bbbb", 8)):
            await write_audit(connection, at=db.now(), guild_id=GUILD, actor_id=MOD,
                              action="queue.cancel", target=job,
                              before={"owner": owner, "state": "queued"}, after=None)
    await set_guild_setting(db, actor_id=MOD, guild_id=GUILD, key="channels", value=[7])
    await unban(db, actor_id=MOD, guild_id=GUILD, user_id=7)

    def seen(entries: list[AuditEntry]) -> list[tuple[str, str]]:
        return [(e.action, e.target) for e in entries]

    assert seen(await audit_log(db, GUILD, actions=("ban", "unban"))) == [
        ("unban", "user:7"), ("ban", "user:7")]
    # Banned (target), refused (actor), and their job cancelled (owner), not a setting holding 7.
    assert seen(await audit_log(db, GUILD, user_id=7)) == [
        ("unban", "user:7"), ("queue.cancel", "job:aaaa"), ("prompt.refused", "word:gore"),
        ("ban", "user:7")]
    assert seen(await audit_log(db, GUILD, user_id=8)) == [
        ("queue.cancel", "job:bbbb"), ("prompt.refused", "nsfw:nude")]
    assert seen(await audit_log(db, GUILD, user_id=MOD, actions=("queue.cancel",))) == [
        ("queue.cancel", "job:bbbb"), ("queue.cancel", "job:aaaa")]
    assert seen(await audit_log(db, GUILD, actions=("prompt.refused",), user_id=8)) == [
        ("prompt.refused", "nsfw:nude")]
    assert await audit_log(db, GUILD, actions=()) == []
    assert await audit_log(db, GUILD + 1, user_id=7) == []


async def test_a_members_refusals_by_one_rule_are_audited_once_per_quiet_period(
    db: Database, clock: ManualClock
) -> None:
    async def refused(user_id: int, word: str, *, nsfw: bool = False, guild: int = GUILD) -> bool:
        return await audit_refused_prompt(db, guild_id=guild, user_id=user_id, channel_id=3,
                                          word=BlockedWord(word, False), prompt=f"a {word}",
                                          nsfw=nsfw)

    assert await refused(7, "gore")
    clock.now += REFUSAL_AUDIT_QUIET_S - 1
    assert not await refused(7, "gore")
    # Another rule (even the same word as an NSFW rule), member or server is its own row.
    assert await refused(7, "gore", nsfw=True)
    assert await refused(7, "blood")
    assert await refused(8, "gore")
    assert await refused(7, "gore", guild=GUILD + 1)
    clock.now += 1  # the quiet period counts from the audited refusal, not the skipped one
    assert await refused(7, "gore")
    targets = [(e.actor_id, e.target, e.at) for e in reversed(await audit_log(db, GUILD))]
    start = clock.now - REFUSAL_AUDIT_QUIET_S
    assert targets == [(7, "word:gore", start), (7, "nsfw:gore", clock.now - 1),
                       (7, "word:blood", clock.now - 1), (8, "word:gore", clock.now - 1),
                       (7, "word:gore", clock.now)]


async def test_the_recent_refusal_look_up_uses_its_index(db: Database) -> None:
    """It runs inside the queue's submit lock: a search on all four columns, not a scan."""
    plan = await db.fetch_all(f"EXPLAIN QUERY PLAN {_RECENT_REFUSAL}", (GUILD, 7, "word:gore", 0.0))
    [step] = [row["detail"] for row in plan]
    assert step.endswith("INDEX audit_refusals (guild_id=? AND actor_id=? AND target=? AND at>?)")
