"""bot/account.py end to end: /history, /show and /usage through a real discord.py bot, the
loopback Discord server, a real SQLite database and a real FairQueue."""

from __future__ import annotations

import io

from PIL import Image

from generation.request import GenerationRequest, Kind
from storage.images import put_input, save_image
from storage.jobs import Job, create_job, finish_job, set_message, start_job
from storage.limits import Scope, set_limits
from storage.moderation import ban
from tests.test_moderation import Studio, studio  # noqa: F401 (the fixture)


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def request(prompt: str, **fields: object) -> GenerationRequest:
    values = dict(prompt=prompt, model="sd15", steps=20, guidance=7.0, seed=100, width=512,
                  height=512, count=1)
    return GenerationRequest(**(values | fields))


async def done(s: Studio, owner: int, req: GenerationRequest, *, in_dm: bool = False,
               parent: tuple[Job, int] | None = None, message_id: int | None = None) -> Job:
    """A finished job with one stored image per seed: image i is `png(10 * (i + 1) + len(prompt))`."""
    lineage = {"parent_job_id": parent[0].id, "parent_index": parent[1]} if parent else {}
    job = await create_job(s.db, req, owner_id=owner, channel_id=s.channel.id,
                           guild_id=None if in_dm else s.guild.id, **lineage)
    await start_job(s.db, job.id, device="cpu")
    for index, seed in enumerate(req.seeds()):
        await save_image(s.db, job.id, index, seed, png(10 * (index + 1) + len(req.prompt)))
    if message_id is not None:
        await set_message(s.db, job.id, message_id)
    return await finish_job(s.db, job.id)


async def test_history_lists_your_jobs_newest_first_with_links(studio: Studio) -> None:
    s = studio
    first = await done(s, s.alice.id, request("a red fox"), message_id=777)
    await done(s, s.bob.id, request("bob's boat"))
    queued = await s.submit(s.alice, "a *blue* whale", count=2)

    lines = (await s.ask(s.alice, "history")).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"`{queued.id}` <t:")
    assert lines[0].endswith("queued · txt2img · 2x 512x512 · \"a \\*blue\\* whale\"")
    assert lines[1].endswith(
        "done · txt2img · 1x 512x512 · \"a red fox\" · "
        f"[result](https://discord.com/channels/{s.guild.id}/{s.channel.id}/777)")
    assert f"`{first.id}`" in lines[1]
    assert (await s.ask(s.alice, "history", {"count": 1})).splitlines() == lines[:1]
    offered = await s.server.autocomplete(s.alice, s.channel, "show", {"job": ""}, "job")
    assert offered == [{"name": f"{queued.id} · queued · a *blue* whale", "value": queued.id},
                       {"name": f"{first.id} · done · a red fox", "value": first.id}]
    typed = await s.server.autocomplete(s.alice, s.channel, "show", {"job": first.id[:5]}, "job")
    assert [c["value"] for c in typed] == [first.id]
    assert (await s.ask(s.curator, "history")) == "You have no jobs yet; /imagine makes some."


async def test_show_gives_parameters_images_and_lineage(studio: Studio) -> None:
    s = studio
    parent = await done(s, s.alice.id, request("a castle", count=2, negative_prompt="blurry"))
    source = await put_input(s.db, png(1))
    child = await done(s, s.alice.id, request("a castle", kind=Kind.VARIATION, init_image=source,
                                              strength=0.4, seed=7), parent=(parent, 1))
    grandchild = await done(s, s.alice.id, request("a castle", kind=Kind.UPSCALE,
                                                   init_image=source, strength=0.5, seed=9), parent=(child, 0))

    answer = await s.reply(s.bob, "show", {"job": grandchild.id.upper()})  # anyone in the server
    lines = answer.content.splitlines()
    assert lines[0].startswith(f"**Job `{grandchild.id}`** by <@{s.alice.id}> · done · <t:")
    assert lines[1:] == [
        "Prompt: a castle",
        "upscale · model sd15 · sampler dpmpp_2m_karras · 20 steps · guidance 7 · seed 9 · "
        "512x512 · 1 image · cost 40.0 · strength 0.5",  # hires 2x: 10 steps on 4x the pixels
        "Images: 1 (seed 9)",
        f"Made from image 1 of `{child.id}` (variation, \"a castle\")",
        f"Made from image 2 of `{parent.id}` (txt2img, \"a castle\")",
    ]
    assert [(a.filename, a.data) for a in answer.attachments] == [
        (f"{grandchild.id}-1.png", png(10 + len("a castle")))]

    answer = await s.reply(s.alice, "show", {"job": parent.id})
    assert "Negative: blurry" in answer.content.splitlines()
    assert f"Made from it: `{child.id}` (variation of image 2)" in answer.content.splitlines()
    assert [a.data for a in answer.attachments] == [png(18), png(28)]
    child_text = (await s.reply(s.alice, "show", {"job": child.id})).content
    assert "strength 0.4" in child_text and "cost 8.0" in child_text  # 0.4 x 20 steps

    queued = await s.submit(s.bob, "soon")
    shown = (await s.ask(s.bob, "show", {"job": queued.id})).splitlines()
    assert "Queued: position 1, starts now" in shown  # nothing runs


async def test_show_hides_other_places_jobs_and_explains_bad_ids(studio: Studio) -> None:
    s = studio
    in_dm = await done(s, s.alice.id, request("a secret"), in_dm=True)
    assert await s.ask(s.bob, "show", {"job": in_dm.id}) == (
        f"There is no job `{in_dm.id}` you can see; /history lists yours.")
    assert (await s.ask(s.alice, "show", {"job": in_dm.id})).startswith(f"**Job `{in_dm.id}`**")
    assert await s.ask(s.bob, "show", {"job": "abc"}) == (
        "`abc` is not a job id: ids are 12 characters a-z and 2-7, as /history shows them.")
    assert await s.ask(s.bob, "show", {"job": "a" * 12}) == (
        f"There is no job `{'a' * 12}` you can see; /history lists yours.")


async def test_usage_reports_the_window_and_what_is_left(studio: Studio) -> None:
    s = studio
    await set_limits(s.db, actor_id=s.boss.id, guild_id=s.guild.id, scope=Scope.GUILD,
                     target_id=s.guild.id, values={"daily_images": 10, "max_steps": 30},
                     defaults=s.config.limits)
    await set_limits(s.db, actor_id=s.boss.id, guild_id=s.guild.id, scope=Scope.ROLE,
                     target_id=s.artists.id, values={"daily_cost": 500.0, "max_queued": 3},
                     defaults=s.config.limits)
    first = await done(s, s.alice.id, request("one", count=3))  # 60 units
    await done(s, s.alice.id, request("two", steps=10))  # 10 units
    await done(s, s.bob.id, request("not hers", count=4))
    await s.submit(s.alice, "waiting", count=2)  # 40 units, charged only when it finishes

    lines = (await s.ask(s.alice, "usage")).splitlines()
    assert lines == [
        "In the last 24 hours in this server you ran 2 jobs: 4 images, 70.0 cost units.",
        "Images: 4 of 10 used, 2 waiting or running, 4 left.",
        "Cost units: 70 of 500 used, 40 waiting or running, 390 left.",
        "Per request: up to 30 steps, 1048576 pixels per image and 4 images; jobs waiting at "
        "once: at most 3.",
        f"Your oldest usage leaves the window <t:{int(first.finished_at + 24 * 3600) + 1}:R>.",
    ]
    await ban(s.db, actor_id=s.boss.id, guild_id=s.guild.id, user_id=s.curator.id, reason="tests")
    assert (await s.ask(s.curator, "usage")).splitlines() == [
        "In the last 24 hours in this server you ran 0 jobs: 0 images, 0.0 cost units.",
        "You are banned from using Atelier in this server (reason: tests).",
        "Images: 0 of 10 used, 10 left.",
        "Cost units: 0 used, no limit.",
        "Per request: up to 30 steps, 1048576 pixels per image and 4 images; jobs waiting at "
        "once: at most 5.",  # no moderators' limit: the queue's own [queue] max_queued_per_user
    ]
    # A moderators' limit above the queue's cap cannot raise it.
    await set_limits(s.db, actor_id=s.boss.id, guild_id=s.guild.id, scope=Scope.USER,
                     target_id=s.bob.id, values={"max_queued": 8}, defaults=s.config.limits)
    assert "jobs waiting at once: at most 5." in await s.ask(s.bob, "usage")
