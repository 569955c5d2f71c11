"""bot/policy.py: every reason to refuse a request, against a real SQLite database."""

from __future__ import annotations

import io
import logging
from typing import Any

import pytest
from PIL import Image

from bot.config import AppConfig, DiscordSettings
from bot.policy import Requester, frees_at, is_moderator, problems, refusal
from generation.request import GenerationRequest
from storage.audit import audit_log
from storage.db import Database
from storage.images import save_image
from storage.jobs import cancel_job, create_job, finish_job, start_job
from storage.limits import Scope, set_limits
from storage.moderation import REFUSED_PROMPT_CHARS, ban, block_word, unban
from storage.settings import LimitsSettings
from tests.fixtures.storage import ManualClock, clock, db  # noqa: F401

GUILD, OTHER_GUILD, CHANNEL, ALICE, BOB, MOD, ARTISTS = 10, 11, 20, 1, 2, 3, 40
HOUR = 3600.0


def config(**limits: object) -> AppConfig:
    return AppConfig(limits=LimitsSettings(**limits))


def request(prompt: str = "a lighthouse at dusk", **fields: object) -> GenerationRequest:
    values = dict(prompt=prompt, model="sd15", steps=20, guidance=7.0, seed=1, width=512,
                  height=512, count=1)
    return GenerationRequest(**(values | fields))


def alice(**fields: object) -> Requester:
    return Requester(**({"user_id": ALICE, "guild_id": GUILD, "channel_id": CHANNEL} | fields))


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


async def finished(db: Database, owner: int, count: int, *, steps: int = 20) -> None:
    """A job that ran and stored `count` images, so its owner's usage grows by them."""
    job = await create_job(db, request(count=count, steps=steps), owner_id=owner,
                           channel_id=CHANNEL, guild_id=GUILD)
    await start_job(db, job.id, device="cpu")
    for index in range(count):
        await save_image(db, job.id, index, 1 + index, png())
    await finish_job(db, job.id)


async def table_sizes(db: Database) -> dict[str, int]:
    tables = ("jobs", "usage", "audit_log", "bans", "blocked_words", "limits")
    return {t: (await db.fetch_one(f"SELECT count(*) AS n FROM {t}"))["n"] for t in tables}


async def test_a_plain_request_passes_and_a_refusal_writes_nothing(db: Database) -> None:
    assert await refusal(db, config(), alice(), request()) is None
    await ban(db, actor_id=MOD, guild_id=GUILD, user_id=ALICE, reason="spam")
    before = await table_sizes(db)
    assert await refusal(db, config(), alice(), request()) is not None
    assert await table_sizes(db) == before


async def test_direct_messages_follow_allow_dms(db: Database) -> None:
    in_dm = alice(guild_id=None)
    assert "direct messages" in await refusal(db, config(), in_dm, request())
    allowing = AppConfig(discord=DiscordSettings(allow_dms=True))
    assert await refusal(db, allowing, in_dm, request()) is None


async def test_a_banned_member_is_told_why_in_that_server_only(db: Database) -> None:
    await ban(db, actor_id=MOD, guild_id=GUILD, user_id=ALICE, reason="spamming the queue")
    assert await refusal(db, config(), alice(), request()) == (
        "You are banned from using Atelier in this server (reason: spamming the queue).")
    assert await refusal(db, config(), alice(guild_id=OTHER_GUILD), request()) is None
    assert await refusal(db, config(), alice(user_id=BOB), request()) is None
    await unban(db, actor_id=MOD, guild_id=GUILD, user_id=ALICE)
    assert await refusal(db, config(), alice(), request()) is None


@pytest.mark.parametrize(("fields", "expected"), [
    ({"steps": 61}, "Steps must be between 1 and 60; you asked for 61."),
    ({"width": 1536, "height": 1024},
     "An image may have at most 1048576 pixels (width x height); 1536x1024 has 1572864."),
    ({"width": 2560, "height": 256},
     "Each side of an image must be at most 2048 pixels; you asked for 2560x256."),
    ({"count": 5}, "Count must be between 1 and 4; you asked for 5."),
    ({"guidance": 20.5}, "Guidance must be between 0 and 20; you asked for 20.5."),
])
async def test_hard_limits_name_the_allowed_range(
    db: Database, fields: dict[str, object], expected: str
) -> None:
    assert await refusal(db, config(), alice(), request(**fields)) == expected


async def test_hard_limits_allow_their_own_bounds(db: Database) -> None:
    edge = request(steps=60, width=1024, height=1024, count=4, guidance=20.0)
    assert await refusal(db, config(daily_images=None), alice(), edge) is None


async def refused_prompts(db: Database, guild_id: int = GUILD) -> list[tuple[int, str, Any]]:
    """(who, rule, what) of a guild's audited prompt refusals, oldest first."""
    return [(e.actor_id, e.target, e.after) for e in reversed(await audit_log(db, guild_id))
            if e.action == "prompt.refused"]


async def test_blocked_words_are_refused_by_name_logged_and_audited(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    await block_word(db, actor_id=MOD, guild_id=GUILD, pattern="Gore")
    await block_word(db, actor_id=MOD, guild_id=GUILD, pattern=r"bl[o0]+d", is_regex=True)
    with caplog.at_level(logging.WARNING, logger="bot.policy"):
        said = await refusal(db, config(), alice(), request("a GORE scene"))
    assert said == "Your prompt contains the blocked word `gore` in this server; please rephrase it."
    [record] = caplog.records
    assert f"user {ALICE} in guild {GUILD}" in record.getMessage() and "'gore'" in record.getMessage()

    said = await refusal(db, config(), alice(), request("red bl00d moon"))
    assert said == ("Your prompt matches the blocked pattern `bl[o0]+d` in this server; "
                    "please rephrase it.")
    assert await refusal(db, config(), alice(), request("gorey details")) is None  # whole words
    assert await refusal(db, config(), alice(), request("a cat", negative_prompt="gore")) is None
    assert await refusal(db, config(), alice(guild_id=OTHER_GUILD), request("gore")) is None
    long = "gore " + "x" * 2000
    assert await refusal(db, config(), alice(user_id=BOB, channel_id=21), request(long)) is not None

    # Only the refusals, each with who tried, the rule that matched and the prompt (cut).
    assert await refused_prompts(db) == [
        (ALICE, "word:gore", {"prompt": "a GORE scene", "channel_id": CHANNEL}),
        (ALICE, "regex:bl[o0]+d", {"prompt": "red bl00d moon", "channel_id": CHANNEL}),
        (BOB, "word:gore", {"prompt": long[:REFUSED_PROMPT_CHARS - 1] + "…", "channel_id": 21}),
    ]
    assert await audit_log(db, OTHER_GUILD) == []


async def test_nsfw_words_run_only_in_age_restricted_channels_and_refusals_are_audited(
    db: Database
) -> None:
    said = await refusal(db, config(), alice(), request("a Nude statue"))
    assert said == ("Your prompt contains `nude`, which runs only in age-restricted channels; "
                    "try it in one.")
    assert await refusal(db, config(), alice(channel_nsfw=True), request("a nude statue")) is None
    custom = AppConfig(discord=DiscordSettings(nsfw_words=("swimsuit",)))
    assert await refusal(db, custom, alice(), request("a nude statue")) is None
    assert "`swimsuit`" in await refusal(db, custom, alice(), request("a swimsuit"))
    assert await refused_prompts(db) == [
        (ALICE, "nsfw:nude", {"prompt": "a Nude statue", "channel_id": CHANNEL}),
        (ALICE, "nsfw:swimsuit", {"prompt": "a swimsuit", "channel_id": CHANNEL}),
    ]
    # A DM has no moderators to read an audit: refused there, recorded nowhere.
    in_dm = AppConfig(discord=DiscordSettings(allow_dms=True))
    before = await table_sizes(db)
    assert "`nude`" in await refusal(db, in_dm, alice(guild_id=None), request("nude"))
    assert await table_sizes(db) == before


async def test_retried_refusals_are_audited_once_per_ten_minutes_and_refused_each_time(
    db: Database, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    await block_word(db, actor_id=MOD, guild_id=GUILD, pattern="gore")
    first_at = clock.now
    with caplog.at_level(logging.WARNING, logger="bot.policy"):
        for prompt in ("gore", "more gore", "gore again"):
            assert "blocked word `gore`" in await refusal(db, config(), alice(), request(prompt))
            clock.now += 60
        clock.now = first_at + 10 * 60  # ten minutes after the audited one
        assert "blocked word `gore`" in await refusal(db, config(), alice(), request("gore at last"))
    assert len(caplog.records) == 4  # the log still has every refusal
    assert [(who, what["prompt"]) for who, _, what in await refused_prompts(db)] == [
        (ALICE, "gore"), (ALICE, "gore at last")]


async def test_moderator_maxima_name_the_limit_and_roles_can_raise_them(db: Database) -> None:
    defaults = LimitsSettings()
    await set_limits(db, actor_id=MOD, guild_id=GUILD, scope=Scope.GUILD, target_id=GUILD,
                     values={"max_steps": 30, "max_pixels": 512 * 512, "max_count": 2},
                     defaults=defaults)
    assert await refusal(db, config(), alice(), request(steps=31)) == (
        "Your limit here is 30 steps; you asked for 31.")
    sha = "ab" * 32  # an x4 upscale runs the operator's step count, not one the member chose
    x4 = request(steps=31, kind="upscale", init_image=sha, upscale_factor=4, width=256, height=256)
    assert await refusal(db, config(), alice(), x4) is None
    hires = request(steps=31, kind="upscale", init_image=sha, strength=0.3, width=256, height=256)
    assert await refusal(db, config(), alice(), hires) == "Your limit here is 30 steps; you asked for 31."
    assert await refusal(db, config(), alice(), request(width=512, height=768)) == (
        "Your limit here is 262144 pixels per image; 512x768 has 393216.")
    assert await refusal(db, config(), alice(), request(count=3)) == (
        "Your limit here is 2 images per request; you asked for 3.")
    await set_limits(db, actor_id=MOD, guild_id=GUILD, scope=Scope.ROLE, target_id=ARTISTS,
                     values={"max_steps": 50}, defaults=defaults)
    assert await refusal(db, config(), alice(role_ids=(ARTISTS,)), request(steps=50)) is None
    assert await refusal(db, config(), alice(guild_id=OTHER_GUILD), request(steps=50)) is None


async def test_one_refusal_names_every_broken_limit_with_what_was_asked_and_allowed(db: Database) -> None:
    """Issue 12: limits of 2 images and 15 steps, asked for 4 images at 25 steps: both at once,
    with the daily images; an engine limit broken too is told once, as the engine's."""
    await set_limits(db, actor_id=MOD, guild_id=GUILD, scope=Scope.USER, target_id=ALICE,
                     values={"max_steps": 15, "max_count": 2, "daily_images": 3}, defaults=LimitsSettings())
    assert await problems(db, config(), alice(), request(count=4, steps=25)) == [
        "Your limit here is 15 steps; you asked for 25.",
        "Your limit here is 2 images per request; you asked for 4.",
        "This request makes 4 images but you have 3 left of your 3 per 24 hours; the request is "
        "larger than your whole allowance, so ask for less.",
    ]
    assert await refusal(db, config(), alice(), request(count=4, steps=25, guidance=25.0)) == (
        "This request cannot run here, for 4 reasons:\n"
        "- Guidance must be between 0 and 20; you asked for 25.\n"
        "- Your limit here is 15 steps; you asked for 25.\n"
        "- Your limit here is 2 images per request; you asked for 4.\n"
        "- This request makes 4 images but you have 3 left of your 3 per 24 hours; the request is "
        "larger than your whole allowance, so ask for less.")
    over_engine = await problems(db, config(daily_images=None), alice(), request(steps=70, count=2))
    assert over_engine == ["Steps must be between 1 and 60; you asked for 70."]  # not the member's 15 again
    assert await problems(db, config(), alice(), request(count=2, steps=15)) == []
    assert await table_sizes(db) == {"jobs": 0, "usage": 0, "audit_log": 1, "bans": 0,
                                     "blocked_words": 0, "limits": 1}  # the set_limits audit only


async def test_max_queued_counts_this_members_waiting_jobs_here(db: Database) -> None:
    await set_limits(db, actor_id=MOD, guild_id=GUILD, scope=Scope.USER, target_id=ALICE,
                     values={"max_queued": 2}, defaults=LimitsSettings())
    for owner in (ALICE, BOB, ALICE):
        await create_job(db, request(), owner_id=owner, channel_id=CHANNEL, guild_id=GUILD)
    await create_job(db, request(), owner_id=ALICE, channel_id=CHANNEL, guild_id=OTHER_GUILD)
    assert await refusal(db, config(), alice(), request()) == (
        "You already have 2 jobs waiting here (your limit is 2); wait for one to start or "
        "cancel one.")
    assert await refusal(db, config(), alice(user_id=BOB), request()) is None


async def test_daily_images_say_what_is_left_and_when_it_frees_up(
    db: Database, clock: ManualClock
) -> None:
    limited = config(daily_images=5, window_hours=24)
    first_at = clock.now
    await finished(db, ALICE, 2)
    clock.now += HOUR
    await finished(db, ALICE, 2)
    clock.now += HOUR
    assert await refusal(db, limited, alice(), request(count=1)) is None
    # 4 used + 3 asked = 2 over the limit of 5: the first job's 2 images must leave the window.
    said = await refusal(db, limited, alice(), request(count=3))
    frees = int(first_at + 24 * HOUR) + 1
    assert said == (f"This request makes 3 images but you have 1 left of your 5 per 24 hours; "
                    f"more frees up <t:{frees}:R>.")
    # 4 used + 4 asked = 3 over: both jobs must leave, so the later one sets the time.
    assert await frees_at(db, alice(), 24, images=3) == first_at + HOUR + 24 * HOUR
    assert await refusal(db, limited, alice(user_id=BOB), request(count=3)) is None
    clock.now = first_at + 24 * HOUR + 1
    assert await refusal(db, limited, alice(), request(count=3)) is None


async def test_a_request_over_the_whole_allowance_says_to_ask_for_less(db: Database) -> None:
    said = await refusal(db, config(daily_images=2), alice(), request(count=3))
    assert said == ("This request makes 3 images but you have 2 left of your 2 per 24 hours; "
                    "the request is larger than your whole allowance, so ask for less.")


async def test_jobs_waiting_or_running_count_against_the_images_left(
    db: Database, clock: ManualClock
) -> None:
    """Usage is charged when a job finishes: without counting unfinished jobs a member with 4
    images left could queue five 4-image jobs."""
    limited = config(daily_images=4, window_hours=24)
    first = await create_job(db, request(count=4), owner_id=ALICE, channel_id=CHANNEL,
                             guild_id=GUILD)
    said = await refusal(db, limited, alice(), request(count=1))
    assert said == ("This request makes 1 image but you have 0 left of your 4 per 24 hours "
                    "(4 in jobs waiting or running); your jobs waiting or running hold the "
                    "rest, and count for 24 hours once they finish: cancel one, or try again "
                    "later.")
    await start_job(db, first.id, device="cpu")  # running still holds them
    assert "0 left of your 4" in await refusal(db, limited, alice(), request(count=1))
    # Only this member's jobs in this server count.
    assert await refusal(db, limited, alice(user_id=BOB), request(count=4)) is None
    assert await refusal(db, limited, alice(guild_id=OTHER_GUILD), request(count=4)) is None
    # Finished, it is charged what it stored (2 of 4 images), once: 2 are left.
    for index in range(2):
        await save_image(db, first.id, index, 1 + index, png())
    finished_at = clock.now
    await finish_job(db, first.id)
    assert await refusal(db, limited, alice(), request(count=2)) is None
    # 2 used + 1 waiting + 2 asked = 1 over: the finished job leaving the window frees enough.
    clock.now += HOUR
    await create_job(db, request(count=1), owner_id=ALICE, channel_id=CHANNEL, guild_id=GUILD)
    assert await refusal(db, limited, alice(), request(count=2)) == (
        "This request makes 2 images but you have 1 left of your 4 per 24 hours (1 in jobs "
        f"waiting or running); more frees up <t:{int(finished_at + 24 * HOUR) + 1}:R>.")


async def test_jobs_waiting_count_against_the_cost_left_until_cancelled(db: Database) -> None:
    limited = config(daily_images=None, daily_cost=100.0)
    waiting = await create_job(db, request(count=3), owner_id=ALICE, channel_id=CHANNEL,
                               guild_id=GUILD)  # 3 x 20 steps of 512x512: 60 units
    said = await refusal(db, limited, alice(), request(count=3))
    assert said.startswith("This request costs 60.0 units but you have 40.0 left of your 100 per "
                           "24 hours (60.0 in jobs waiting or running) (fewer images")
    assert said.endswith("your jobs waiting or running hold the rest, and count for 24 hours "
                         "once they finish: cancel one, or try again later.")
    assert await refusal(db, limited, alice(), request(count=2)) is None  # 40 units fit
    await cancel_job(db, waiting.id)  # a cancelled job is never charged
    assert await refusal(db, limited, alice(), request(count=4)) is None


async def test_daily_cost_counts_pixels_steps_and_images(db: Database, clock: ManualClock) -> None:
    limited = config(daily_images=None, daily_cost=100.0, window_hours=1)
    at = clock.now
    await finished(db, ALICE, 2, steps=20)  # 2 x 20 steps of 512x512: 40 units
    clock.now += 60
    said = await refusal(db, limited, alice(), request(steps=25, width=768, height=768, count=2))
    # 2 x 25 x (768 x 768) / (512 x 512) = 112.5 units; 60 left; the 40 used free up at +1 h.
    assert said == ("This request costs 112.5 units but you have 60.0 left of your 100 per "
                    "1 hours (fewer images, steps or pixels cost less); the request is larger "
                    "than your whole allowance, so ask for less.")
    said = await refusal(db, limited, alice(), request(steps=30, count=2))  # 60 units fits
    assert said is None
    said = await refusal(db, limited, alice(), request(steps=40, count=2))  # 80 units
    assert said.endswith(f"more frees up <t:{int(at + HOUR) + 1}:R>.")


async def test_an_x4_upscale_over_budget_says_what_it_costs_not_to_ask_for_less(
    db: Database, clock: ManualClock
) -> None:
    """The member pressed U and chose nothing: no steps, images or pixels of theirs to lower."""
    limited = config(daily_images=None, daily_cost=150.0, window_hours=1)
    at = clock.now
    await finished(db, ALICE, 2, steps=20)  # 40 units used, 110 left
    sha = "ab" * 32
    small, large = (request(kind="upscale", init_image=sha, upscale_factor=4, width=side,
                            height=side) for side in (256, 512))
    assert 110 < small.cost <= 150 < large.cost
    assert await refusal(db, limited, alice(), small) == (
        f"A 4x upscale of this 256x256 image costs {small.cost:.1f} units but you have 110.0 "
        f"left of your 150 per 1 hours; more frees up <t:{int(at + HOUR) + 1}:R>.")
    assert await refusal(db, limited, alice(), large) == (
        f"A 4x upscale of this 512x512 image costs {large.cost:.1f} units but you have 110.0 "
        "left of your 150 per 1 hours; that is more than your whole allowance, so it can only "
        "run if a moderator raises your limit.")


def test_moderators_have_manage_server_or_a_configured_role() -> None:
    settings = DiscordSettings(moderator_roles=("Curators",))
    assert is_moderator(alice(manage_guild=True), settings)
    assert is_moderator(alice(role_names=("Artists", "Curators")), settings)
    assert not is_moderator(alice(role_names=("Artists",)), settings)
    assert not is_moderator(alice(role_names=("curators",)), settings)  # names are exact
    assert not is_moderator(alice(guild_id=None, manage_guild=True), settings)
