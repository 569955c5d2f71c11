"""The whole bot end to end: the real discord.py client (AtelierBot) against the loopback Discord
server, with the real studio, a SQLite file and a tiny checkpoint on the CPU.

Sizes: the tiny checkpoint's VAE halves (not eighths) the image, so its native side is 128 and
/imagine's 1:1 is 128x128; few steps keep every generation well under a second."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import discord
import numpy as np
import pytest
import safetensors.torch
from PIL import Image

from bot.client import AtelierBot
from bot.config import AppConfig, DiscordSettings
from generation.request import X4_UNET_FLOPS_RATIO, JobState, Kind
from generation.settings import GenerationSettings, ModelSettings, QueueSettings
from storage import jobs as stored
from storage.images import image_file, job_images
from storage.moderation import ban
from storage.settings import StorageSettings
from tests.discord_server import Action, Channel, DiscordServer, Guild, Interaction, Message, Upload, User
from tests.fixtures.checkpoints import TinyCheckpoints, random_state_dict, tiny_checkpoints, tiny_family  # noqa: F401

TIMEOUT = 60.0


@dataclass
class World:
    server: DiscordServer
    config: AppConfig
    guild: Guild
    channel: Channel
    alice: User
    bob: User
    carol: User
    mod: User


def make_config(server: DiscordServer, data: Path, checkpoints: TinyCheckpoints, guild: Guild) -> AppConfig:
    path, yaml_path = checkpoints.get("sd1")
    return AppConfig(
        discord=DiscordSettings(api_base=f"{server.url}/api/v10", guild_id=guild.id, progress_interval_s=0.5),
        generation=GenerationSettings(device="cpu", dtype="float32", default_steps=2, max_steps=10,
                                      default_count=1, default_sampler="euler"),
        models=(ModelSettings(name="tiny", checkpoint=path, config=yaml_path),),
        queue=QueueSettings(shutdown_grace_s=0.0),
        storage=StorageSettings(data_dir=data),
    )


@pytest.fixture
async def world(request: pytest.FixtureRequest, tmp_path: Path, tiny_checkpoints: TinyCheckpoints  # noqa: F811
                ) -> AsyncIterator[World]:
    async with DiscordServer(**getattr(request, "param", {})) as server:
        guild = await server.create_guild("studio")
        channel = await server.create_channel(guild, "art")
        users = [server.create_user(name) for name in ("alice", "bob", "carol", "mod")]
        moderators = await server.create_role(guild, "moderators",
                                              permissions=discord.Permissions(manage_guild=True).value)
        for user in users[:3]:
            await server.add_member(guild, user)
        await server.add_member(guild, users[3], roles=[moderators])
        config = make_config(server, tmp_path / "data", tiny_checkpoints, guild)
        yield World(server, config, guild, channel, *users)
        assert server.log.server_errors == []


@asynccontextmanager
async def running(config: AppConfig, server: DiscordServer) -> AsyncIterator[AtelierBot]:
    bot = AtelierBot(config, guild_ready_timeout=0.05)
    connection = None
    try:
        await bot.login(server.token)
        connection = asyncio.create_task(bot.connect(reconnect=False))
        await asyncio.wait_for(bot.wait_until_ready(), 15)
        yield bot
    finally:
        await bot.close()
        if connection is not None:
            await connection


def message_for(interaction: Interaction, *, files: bool) -> Callable[[Action], bool]:
    def predicate(action: Action) -> bool:
        return (action.kind == "message" and action.interaction is interaction
                and bool(action.message.attachments) == files)

    return predicate


def png_info(data: bytes) -> tuple[tuple[int, int], str]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size, image.info.get("parameters", "")


def labels(message: Message) -> list[str]:
    return [b.get("label") or b.get("emoji", {}).get("name") for b in message.buttons()]


async def private_answer(server: DiscordServer, interaction: Interaction) -> Message:
    """The bot's answer to `interaction` that only its user sees. A public "thinking" placeholder
    sent first (inputs slow to check: images) must be deleted, never edited into the answer."""
    found = await server.wait_for(lambda a: a.interaction is interaction and a.kind == "message"
                                  and a.message.ephemeral)
    done = server.responses(interaction)
    assert not [a for a in done if a.kind == "edit"]
    assert all(a.message.deleted for a in done if a.kind == "message" and not a.message.ephemeral)
    return found.message


def encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_upload(name: str) -> Upload:
    return Upload(name, encoded(Image.new("RGB", (64, 64), (40, 90, 160))))


async def test_imagine_acknowledges_shows_progress_and_delivers_images_with_buttons(
        world: World, capsys: pytest.CaptureFixture[str]) -> None:
    server = world.server
    async with running(world.config, server) as bot:
        assert f"Invite it with:\n  https://discord.com/oauth2/authorize?client_id={server.application_id}&" in (
            capsys.readouterr().out)
        synced = {(c["name"], c["type"]) for c in server.commands(world.guild)}
        assert {("imagine", 1), ("Remix", 3)} <= synced
        imagine = next(c for c in server.commands(world.guild) if c["name"] == "imagine")
        options = {o["name"]: o for o in imagine["options"]}
        assert [c["value"] for c in options["aspect"]["choices"]] == ["1:1", "2:3", "3:2", "3:4", "4:3", "9:16", "16:9"]
        assert options["steps"]["max_value"] == 10 and options["count"]["max_value"] == 4
        assert options["model"]["autocomplete"] and options["image"]["type"] == 11
        assert [c["value"] for c in await server.autocomplete(world.alice, world.channel, "imagine",
                                                              {"prompt": "x", "model": "ti"}, "model")] == ["tiny"]

        asked = await server.slash(world.alice, world.channel, "imagine",
                                   {"prompt": "a lighthouse", "count": 2, "steps": 3, "seed": 11})
        ack = (await server.wait_for(lambda a: a.interaction is asked and a.kind == "message")).message
        assert asked.callback_types == [4] and f"<@{world.alice.id}>" in ack.content
        assert "position 1" in ack.content or "starting" in ack.content
        assert [b["custom_id"].split(":")[2] for b in ack.buttons()] == ["cancel"]

        result = (await server.wait_for(message_for(asked, files=True), TIMEOUT)).message
        job_id = result.buttons()[0]["custom_id"].split(":")[3]
        assert f"<@{world.alice.id}>" in result.content and "a lighthouse" in result.content
        assert [a.filename for a in result.attachments] == [f"{job_id}-1.png", f"{job_id}-2.png"]
        for attachment, seed in zip(result.attachments, (11, 12), strict=True):
            size, parameters = png_info(attachment.data)
            assert size == (128, 128) and parameters.startswith("a lighthouse\nSteps: 3, Sampler: Euler")
            assert f"Seed: {seed}," in parameters
        assert labels(result) == ["U1", "U2", "🔄", "V1", "V2"]  # U and rerun on one row, V on the next
        assert [b["custom_id"] for b in result.buttons()][:2] == [f"atelier:v1:upscale:{job_id}:0",
                                                                   f"atelier:v1:upscale:{job_id}:1"]
        edits = [a.content for a in server.responses(asked) if a.kind == "edit"]
        assert any("being drawn" in text for text in edits)
        await server.wait_for(lambda a: a.kind == "edit" and a.message is ack and "finished" in a.content)
        assert ack.buttons() == []  # the Cancel button is gone
        async with asyncio.timeout(5):  # marked delivered once posted: not told again at a restart
            while (await stored.get_job(bot.studio.db, job_id)).delivered_at is None:
                await asyncio.sleep(0.05)


async def test_buttons_rerun_vary_upscale_work_after_a_restart_and_expired_jobs_say_so(world: World) -> None:
    server, config = world.server, world.config
    async with running(config, server):
        asked = await server.slash(world.alice, world.channel, "imagine", {"prompt": "a fox", "seed": 5})
        first = (await server.wait_for(message_for(asked, files=True), TIMEOUT)).message
        job_id = first.buttons()[0]["custom_id"].split(":")[3]

        rerun = await server.press_button(world.bob, first, f"atelier:v1:rerun:{job_id}:0")
        again = (await server.wait_for(message_for(rerun, files=True), TIMEOUT)).message
        assert f"<@{world.bob.id}>" in again.content
        assert png_info(again.attachments[0].data)[1] != png_info(first.attachments[0].data)[1]  # a new seed

    async with running(config, server) as bot:  # a new process: only the custom ids and the database remain
        vary = await server.press_button(world.carol, first, f"atelier:v1:vary:{job_id}:0")
        # Reading and storing the image may outlast Discord's 3 seconds: the press is deferred first.
        await server.wait_for(lambda a: a.interaction is vary and a.callback_type == 5)
        varied = (await server.wait_for(message_for(vary, files=True), TIMEOUT)).message
        assert f"<@{world.carol.id}>" in varied.content and "variation" in varied.content

        upscale = await server.press_button(world.alice, first, f"atelier:v1:upscale:{job_id}:0")
        upscaled = (await server.wait_for(message_for(upscale, files=True), TIMEOUT)).message
        assert png_info(upscaled.attachments[0].data)[0] == (256, 256)
        assert labels(upscaled) == ["Vary (Subtle)", "Vary (Strong)", "Zoom Out", "🔄"]
        upscaled_id = upscaled.buttons()[0]["custom_id"].split(":")[3]
        subtle = await server.press_button(world.bob, upscaled, f"atelier:v1:subtle:{upscaled_id}:0")
        subtler = (await server.wait_for(message_for(subtle, files=True), TIMEOUT)).message
        size, parameters = png_info(subtler.attachments[0].data)
        assert size == (256, 256) and "Denoising strength: 0.35" in parameters  # the configured subtle strength
        children = (await stored.job_detail(bot.studio.db, job_id)).children
        assert sorted(c.request.kind for c in children) == [Kind.TXT2IMG, Kind.UPSCALE, Kind.VARIATION]
        assert {c.owner_id for c in children} == {world.alice.id, world.bob.id, world.carol.id}

        async with bot.studio.db.writing() as connection:  # retention expired the first job's images
            await connection.execute("UPDATE images SET status = 'expired' WHERE job_id = ?", (job_id,))
        late = await server.press_button(world.bob, first, f"atelier:v1:vary:{job_id}:0")
        answer = (await server.wait_for(lambda a: a.interaction is late and a.kind == "message")).message
        assert answer.ephemeral and "expired" in answer.content

        rerun_id = again.buttons()[0]["custom_id"].split(":")[3]
        async with bot.studio.db.writing() as connection:  # an operator deleted the rerun's job
            for table, column in (("usage", "job_id"), ("images", "job_id"), ("jobs", "id")):
                await connection.execute(f"DELETE FROM {table} WHERE {column} = ?", (rerun_id,))
        gone = await server.press_button(world.alice, again, f"atelier:v1:upscale:{rerun_id}:0")
        answer = (await server.wait_for(lambda a: a.interaction is gone and a.kind == "message")).message
        assert answer.ephemeral and f"`{rerun_id}` no longer exists" in answer.content


@pytest.mark.parametrize("world", [{"upload_limit": 12_000}], indirect=True)
async def test_expired_token_falls_back_to_a_channel_reply_and_large_files_are_reencoded(world: World) -> None:
    server = world.server
    async with running(world.config, server) as bot:
        bot.studio.queue.pause()
        asked = await server.slash(world.alice, world.channel, "imagine", {"prompt": "a storm at sea", "count": 2})
        ack = (await server.wait_for(lambda a: a.interaction is asked and a.kind == "message")).message
        server.expire_token(asked)
        bot.studio.queue.resume()

        result = (await server.wait_for(lambda a: a.kind == "message" and bool(a.message.attachments)
                                        and a.interaction is None, TIMEOUT)).message
        assert result.reference is ack and f"<@{world.alice.id}>" in result.content
        assert world.alice in result.mentions
        assert all(len(a.data) <= 12_000 for a in result.attachments) and len(result.attachments) == 2
        assert all(a.filename.endswith((".webp", ".jpg")) for a in result.attachments)
        assert result.content.count("to fit the upload limit") == 2
        # The status message is still closed: edited as the bot's channel message, not through the token.
        closed = await server.wait_for(lambda a: a.kind == "edit" and a.message is ack and "finished" in a.content)
        assert closed.interaction is None and ack.buttons() == []


async def test_missing_permissions_bad_inputs_and_bans_get_clear_answers(world: World) -> None:
    server = world.server
    closed = await server.create_channel(world.guild, "closed")
    await server.refuse_bot_messages(closed)
    async with running(world.config, server) as bot:
        async def answer(user: User, channel: Channel, options: dict) -> Message:
            return await private_answer(server, await server.slash(user, channel, "imagine", options))

        assert "I cannot post in this channel" in (await answer(world.alice, closed, {"prompt": "x"})).content
        text = (await answer(world.alice, world.channel, {"prompt": "x", "image": Upload("a.png", b"not an image")}))
        assert "not a PNG, JPEG or WebP" in text.content
        black = Upload("black.png", encoded(Image.new("L", (64, 64), 0)))
        all_black = await answer(world.alice, world.channel, {"prompt": "x", "image": png_upload("i.png"), "mask": black})
        assert "the mask is all black, so there is nothing to repaint" in all_black.content
        mask_only = await answer(world.alice, world.channel, {"prompt": "x", "mask": png_upload("m.png")})
        assert "a mask needs an image to repaint: add the image option too" == mask_only.content
        strength_only = await answer(world.alice, world.channel, {"prompt": "x", "strength": 0.5})
        assert "strength says how much of an image to change" in strength_only.content
        unknown = await answer(world.alice, world.channel, {"prompt": "x", "model": "sdxl"})
        assert "unknown model 'sdxl'; available: tiny" in unknown.content

        await ban(bot.studio.db, actor_id=world.mod.id, guild_id=world.guild.id, user_id=world.bob.id, reason="spam")
        banned = await answer(world.bob, world.channel, {"prompt": "a cat"})
        assert "banned" in banned.content and "spam" in banned.content

        limited = await server.slash(world.mod, world.channel, "limits set",
                                     {"scope": "user", "target": world.carol, "max_steps": 2})
        await server.wait_for(lambda a: a.interaction is limited and a.kind == "message")
        too_many = await answer(world.carol, world.channel, {"prompt": "a cat", "steps": 5})
        assert too_many.content == "Your limit here is 2 steps; you asked for 5."

        photo = await server.post_message(world.alice, closed, "a photo", attachments=[png_upload("p.png")])
        await server.post_message(world.alice, closed, f"{server.bot.mention} a cat", reference=photo)
        private = server.dm_channel(world.alice)
        told = await server.wait_for(lambda a: a.kind == "message" and a.message.channel is private)
        assert told.message.content.startswith("I cannot post in this channel: I am missing Send Messages")
        assert await bot.studio.db.fetch_all("SELECT id FROM jobs") == []  # nothing was queued


async def test_without_the_message_content_intent_replies_work_on_the_bots_own_results(world: World) -> None:
    """Discord hides other members' attachments from a bot without the intent: a reply to one is
    answered with what does work instead of a misleading "no image"."""
    server = world.server
    async with running(world.config, server) as bot:
        assert not bot.intents.message_content
        result, _ = await imagine_from_upload(world, "a harbour")
        reply = await server.post_message(world.bob, world.channel, f"{server.bot.mention} at night --steps 1",
                                          reference=result)
        redone = (await server.wait_for(lambda a: a.kind == "message" and a.message.reference is reply
                                        and bool(a.message.attachments), TIMEOUT)).message
        assert f"<@{world.bob.id}>" in redone.content and "img2img" in redone.content
        assert png_info(redone.attachments[0].data)[1].startswith("at night\nSteps: 1,")
        wordy = await server.post_message(world.bob, world.channel, f"{server.bot.mention} {'x' * 1001}",
                                          reference=result)
        said = (await server.wait_for(lambda a: a.kind == "message" and a.message.reference is wordy)).message
        assert said.content == "the prompt is 1001 characters long; the most allowed is 1000"

        picture = await server.post_message(world.alice, world.channel, "my photo",
                                            attachments=[png_upload("photo.png")])
        asked = await server.post_message(world.bob, world.channel, f"{server.bot.mention} a cat", reference=picture)
        said = (await server.wait_for(lambda a: a.kind == "message" and a.message.reference is asked)).message
        assert "has no image" not in said.content
        assert "replies work on my own results" in said.content and "Apps > Remix" in said.content
        assert "`[discord] message_content`" in said.content
        assert len(await bot.studio.db.fetch_all("SELECT id FROM jobs")) == 2  # the imagine and the reply only


async def test_reply_to_an_image_and_remix_run_img2img_and_inpaint(world: World) -> None:
    """With the message-content intent, replies work on any member's image."""
    server = world.server
    config = world.config.model_copy(
        update={"discord": world.config.discord.model_copy(update={"message_content": True})})
    async with running(config, server) as bot:
        plain = await server.post_message(world.alice, world.channel, "no picture here")
        reply = await server.post_message(world.bob, world.channel, f"{server.bot.mention} a cat", reference=plain)
        said = await server.wait_for(lambda a: a.kind == "message" and a.message.reference is reply)
        assert said.message.content.startswith("the message you replied to has no image")

        picture = await server.post_message(world.alice, world.channel, "my photo",
                                            attachments=[png_upload("photo.png")])
        reply = await server.post_message(world.bob, world.channel,
                                          f"{server.bot.mention} a watercolour --strength 0.5 --seed 3 --no text",
                                          reference=picture)
        status = await server.wait_for(lambda a: a.kind == "message" and a.message.reference is reply)
        result = (await server.wait_for(lambda a: a.kind == "message" and a.message.reference is reply
                                        and bool(a.message.attachments), TIMEOUT)).message
        assert "queued" in status.content or "starting" in status.content
        size, parameters = png_info(result.attachments[0].data)
        assert size == (64, 64) and f"<@{world.bob.id}>" in result.content and "img2img" in result.content
        assert "Negative prompt: text" in parameters and "Seed: 3," in parameters
        assert "Denoising strength: 0.5" in parameters

        # Answering the bot's result with a plain reply (which pings it) is conversation, not a request.
        jobs = len(await bot.studio.db.fetch_all("SELECT id FROM jobs"))
        await server.post_message(world.bob, world.channel, "thanks!", reference=result, mentions=[server.bot])
        await asyncio.sleep(1.0)
        assert len(await bot.studio.db.fetch_all("SELECT id FROM jobs")) == jobs

        mask = Image.new("L", (32, 32), 0)  # half the image's size: resized, and the user is told
        mask.paste(255, (0, 0, 16, 16))
        masked = await server.post_message(world.carol, world.channel, f"{server.bot.mention} a red door",
                                           attachments=[Upload("mask.png", encoded(mask))], reference=picture)
        acknowledged = await server.wait_for(lambda a: a.kind == "message" and a.message.reference is masked)
        assert "\n-# the mask is 32x32 but the image is 64x64: the mask was resized to fit" in acknowledged.content
        inpainted = (await server.wait_for(lambda a: a.kind == "message" and a.message.reference is masked
                                           and bool(a.message.attachments), TIMEOUT)).message
        assert "inpaint" in inpainted.content

        jobs = len(await bot.studio.db.fetch_all("SELECT id FROM jobs"))
        black = await server.post_message(world.carol, world.channel, f"{server.bot.mention} a red door",
                                          attachments=[Upload("mask.png", encoded(Image.new("L", (64, 64), 0)))],
                                          reference=picture)
        said = await server.wait_for(lambda a: a.kind == "message" and a.message.reference is black)
        assert said.content.startswith("the mask is all black, so there is nothing to repaint")
        assert len(await bot.studio.db.fetch_all("SELECT id FROM jobs")) == jobs  # refused before queueing

        not_mask = await server.post_message(world.carol, world.channel, f"{server.bot.mention} a red door",
                                             attachments=[png_upload("colour.png")], reference=picture)
        said = await server.wait_for(lambda a: a.kind == "message" and a.message.reference is not_mask)
        assert "is not a mask" in said.message.content

        holed = await server.post_message(world.alice, world.channel, "with a hole",
                                          attachments=[Upload("hole.png", _with_transparent_corner())])
        menu = await server.context_menu(world.carol, holed, "Remix")
        await server.wait_for(lambda a: a.interaction is menu and a.callback_type == 9)
        submitted = await server.submit_modal(world.carol, menu, {"prompt": "a window", "strength": "0.8"})
        remixed = (await server.wait_for(message_for(submitted, files=True), TIMEOUT)).message
        assert "inpaint" in remixed.content and f"<@{world.carol.id}>" in remixed.content


async def test_problems_found_after_a_public_defer_are_told_only_to_the_user(world: World) -> None:
    """Button presses and Remix defer publicly before reading images; a problem found then is
    answered privately and the public placeholder goes away."""
    server = world.server
    async with running(world.config, server) as bot:
        result, job_id = await imagine_from_upload(world, "a harbour")
        for image in await job_images(bot.studio.db, job_id):  # deleted behind the database's back
            image_file(bot.studio.db, image).unlink()
        pressed = await server.press_button(world.bob, result, f"atelier:v1:vary:{job_id}:0")
        gone = await private_answer(server, pressed)
        assert gone.content.startswith(f"The images of job `{job_id}` are no longer stored")

        broken = await server.post_message(world.alice, world.channel, "", attachments=[Upload("b.png", b"not a png")])
        menu = await server.context_menu(world.carol, broken, "Remix")
        await server.wait_for(lambda a: a.interaction is menu and a.callback_type == 9)
        submitted = await server.submit_modal(world.carol, menu, {"prompt": "a window"})
        assert (await private_answer(server, submitted)).content == "the image is not a PNG, JPEG or WebP image"
        # Discord's client keeps a modal's text within its max_length; the bot checks again all the same.
        menu = await server.context_menu(world.carol, result, "Remix")
        await server.wait_for(lambda a: a.interaction is menu and a.callback_type == 9)
        submitted = await server.submit_modal(world.carol, menu, {"prompt": "y" * 1001})
        said = await private_answer(server, submitted)
        assert said.content == "the prompt is 1001 characters long; the most allowed is 1000"
        assert len(await bot.studio.db.fetch_all("SELECT id FROM jobs")) == 1


def _with_transparent_corner() -> bytes:
    """An opaque 64x64 PNG whose top-left quarter is transparent: an inpaint mask for Remix."""
    rgba = Image.new("RGBA", (64, 64), (200, 150, 60, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 32, 32))
    return encoded(rgba)


async def test_three_users_are_interleaved_fairly(world: World) -> None:
    """Alice queues three jobs before Bob and Carol queue one each: start-time fair queueing runs
    one of each user's before Alice's second (batches of one image, so the order is visible)."""
    server = world.server
    config = world.config.model_copy(update={"queue": QueueSettings(shutdown_grace_s=0.0, max_batch_images=1)})
    async with running(config, server) as bot:
        bot.studio.queue.pause()
        asked, first_positions = [], []
        for user, count in ((world.alice, 3), (world.bob, 1), (world.carol, 1)):
            for _ in range(count):
                interaction = await server.slash(user, world.channel, "imagine", {"prompt": "a tree", "steps": 1})
                asked.append((user, interaction))
                ack = await server.wait_for(lambda a, i=interaction: a.interaction is i and a.kind == "message")
                first_positions.append(int(re.search(r"position (\d)", ack.content)[1]))
        assert first_positions == [1, 2, 3, 2, 3]  # Bob and Carol go ahead of Alice's second and third
        alice_third = asked[2][1].original
        await server.wait_for(lambda a: a.message is alice_third and "position 5" in (a.content or ""))
        bot.studio.queue.resume()
        results: list[Message] = []
        for _ in asked:
            action = await server.wait_for(
                lambda a: a.kind == "message" and bool(a.message.attachments) and a.message not in results, TIMEOUT)
            results.append(action.message)
        order = [next(u.name for u, i in asked if i is m.interaction) for m in results]
        assert order == ["alice", "bob", "carol", "alice", "alice"]


def test_atelier_run_survives_a_restart_mid_queue_with_buttons_working(
        tmp_path: Path, tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    asyncio.run(_atelier_run(tmp_path, tiny_checkpoints))


async def _atelier_run(tmp_path: Path, checkpoints: TinyCheckpoints) -> None:
    """`atelier run` as operators start it: a queued job (and its server's pause) outlives SIGTERM, the next
    process delivers it to the same interaction once resumed, and the old result's buttons still work."""
    async with DiscordServer() as server:
        guild = await server.create_guild("studio")
        channel = await server.create_channel(guild, "art")
        alice, mod = server.create_user("alice"), server.create_user("mod")
        moderators = await server.create_role(guild, "moderators",
                                              permissions=discord.Permissions(manage_guild=True).value)
        await server.add_member(guild, alice)
        await server.add_member(guild, mod, roles=[moderators])
        path, yaml_path = checkpoints.get("sd1")
        config = tmp_path / "config.toml"
        config.write_text(f"""
[discord]
api_base = "{server.url}/api/v10"
guild_id = {guild.id}
[generation]
device = "cpu"
default_steps = 2
default_count = 1
[[models]]
name = "tiny"
checkpoint = "{path}"
config = "{yaml_path}"
[queue]
shutdown_grace_s = 5.0
[storage]
data_dir = "data"
""")

        async def answered(user: User, command: str, options: dict, files: bool) -> tuple[Interaction, Message]:
            asked = await server.slash(user, channel, command, options)
            if files:
                return asked, (await server.wait_for(message_for(asked, files=True), TIMEOUT)).message
            return asked, (await server.wait_for(lambda a: a.interaction is asked and a.kind == "message")).message

        async with _atelier(config, server, guild) as first:
            _, result = await answered(alice, "imagine", {"prompt": "a lighthouse", "seed": 2}, files=True)
            assert "Seed: 2," in png_info(result.attachments[0].data)[1]
            await answered(mod, "queue pause", {}, files=False)
            waiting, ack = await answered(alice, "imagine", {"prompt": "a harbour", "seed": 4}, files=False)
            await asyncio.sleep(0.5)  # let the command store its status message
        assert first.returncode == 0, first.output.decode()

        async with _atelier(config, server, guild) as second:
            await answered(mod, "queue resume", {}, files=False)  # the pause outlived the restart too
            late = (await server.wait_for(message_for(waiting, files=True), TIMEOUT)).message
            assert "Seed: 4," in png_info(late.attachments[0].data)[1] and f"<@{alice.id}>" in late.content
            job_id = result.buttons()[0]["custom_id"].split(":")[3]
            rerun = await server.press_button(mod, result, f"atelier:v1:rerun:{job_id}:0")
            again = (await server.wait_for(message_for(rerun, files=True), TIMEOUT)).message
            assert f"<@{mod.id}>" in again.content
        assert second.returncode == 0, second.output.decode()


@dataclass
class _Process:
    returncode: int | None = None
    output: bytes = b""


@asynccontextmanager
async def _atelier(config: Path, server: DiscordServer, guild: Guild) -> AsyncIterator[_Process]:
    """`atelier run --config ...` until the block ends, then SIGTERM; the exit status and output
    are filled in after the block."""
    env = os.environ | {"DISCORD_TOKEN": server.token, "OMP_NUM_THREADS": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from bot.cli import main; raise SystemExit(main())", "run", "--config", str(config),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    finished = _Process()
    try:
        async with asyncio.timeout(TIMEOUT):
            while not server.bot_connected or not server.commands(guild):  # connected and synced
                await asyncio.sleep(0.05)
        yield finished
        process.send_signal(signal.SIGTERM)
        finished.output, _ = await asyncio.wait_for(process.communicate(), TIMEOUT)
        finished.returncode = process.returncode
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_cancel_button_answers_owner_moderator_and_others(world: World) -> None:
    server = world.server
    async with running(world.config, server) as bot:
        bot.studio.queue.pause()
        acks = []
        for _ in range(3):
            asked = await server.slash(world.alice, world.channel, "imagine", {"prompt": "a bridge"})
            acks.append((await server.wait_for(lambda a, i=asked: a.interaction is i and a.kind == "message")).message)
        custom_ids = [ack.buttons()[0]["custom_id"] for ack in acks]

        async def press(user: User, ack: Message, custom_id: str) -> str:
            pressed = await server.press_button(user, ack, custom_id)
            answer = await server.wait_for(lambda a: a.interaction is pressed and a.kind == "message")
            assert answer.message.ephemeral
            return answer.message.content

        assert "only the member who asked" in await press(world.bob, acks[0], custom_ids[0])
        assert "cancelled" in await press(world.alice, acks[0], custom_ids[0])
        assert "cancelled" in await press(world.mod, acks[1], custom_ids[1])
        # A moderator's /queue cancel tells the owner the same way as the button.
        job_id = custom_ids[2].split(":")[3]
        asked = await server.slash(world.mod, world.channel, "queue cancel", {"job": job_id})
        await server.wait_for(lambda a: a.interaction is asked and a.kind == "message")
        for ack in acks:
            await server.wait_for(lambda a, m=ack: a.kind == "edit" and a.message is m and "was cancelled" in a.content)
        assert [ack.buttons() for ack in acks] == [[], [], []]  # nothing left to cancel
        states = [row["state"] for row in await bot.studio.db.fetch_all("SELECT state FROM jobs ORDER BY seq")]
        assert states == ["cancelled", "cancelled", "cancelled"]
        # The moderator's two cancels of Alice's jobs are audited (button and command alike), hers is not.
        audited = await bot.studio.db.fetch_all("SELECT actor_id, target FROM audit_log WHERE action = 'queue.cancel'")
        assert sorted((row["actor_id"], row["target"]) for row in audited) == sorted(
            (world.mod.id, f"job:{custom_id.split(':')[3]}") for custom_id in custom_ids[1:])


async def test_progress_edits_are_paced_and_carry_a_preview_when_enabled(world: World) -> None:
    server = world.server
    discord_settings = world.config.discord.model_copy(update={"preview": True})
    config = world.config.model_copy(update={"discord": discord_settings})
    async with running(config, server):
        asked = await server.slash(world.alice, world.channel, "imagine", {"prompt": "a comet", "steps": 10})
        ack = (await server.wait_for(lambda a: a.interaction is asked and a.kind == "message")).message
        previewed = await server.wait_for(lambda a: a.kind == "edit" and a.message is ack and bool(ack.attachments),
                                          TIMEOUT)
        assert "being drawn" in previewed.content and ack.attachments[0].filename == "preview.png"
        assert png_info(ack.attachments[0].data)[0] == (64, 64)  # the latent's size: 128 px / the tiny VAE's 2
        await server.wait_for(message_for(asked, files=True), TIMEOUT)
        await server.wait_for(lambda a: a.kind == "edit" and a.message is ack and "finished" in a.content)
        edits = [a for a in server.actions if a.message is ack and a.kind in ("message", "edit")]
        times = [a.at for a in edits[:-1]]  # the acknowledgement and every edit before the last word
        assert len(times) >= 3 and all(b - a >= 0.5 * 0.95 for a, b in zip(times, times[1:]))
        assert ack.attachments == []  # the preview goes once the result is out


async def test_jobs_queued_before_a_restart_are_delivered_after_it(world: World) -> None:
    server, config = world.server, world.config
    async with running(config, server) as bot:
        bot.studio.queue.pause()
        asked = await server.slash(world.alice, world.channel, "imagine", {"prompt": "a harbour", "seed": 9})
        ack = (await server.wait_for(lambda a: a.interaction is asked and a.kind == "message")).message
        async with asyncio.timeout(5):  # the command has stored where its status message is
            while not await bot.studio.db.fetch_all("SELECT id FROM jobs WHERE message_id = ?", (ack.id,)):
                await asyncio.sleep(0.01)
    before_restart = len(server.actions)
    async with running(config, server):
        result = (await server.wait_for(message_for(asked, files=True), TIMEOUT)).message
        assert "Seed: 9," in png_info(result.attachments[0].data)[1] and f"<@{world.alice.id}>" in result.content
        await server.wait_for(lambda a: a.kind == "edit" and a.message is ack and "finished" in a.content)
        # The old status message went on showing the job's state after the restart.
        shown = [a.content for a in server.actions[before_restart:] if a.kind == "edit" and a.message is ack]
        assert any("being drawn" in text or "position" in text or "starting" in text for text in shown)


async def test_a_paused_server_says_so_and_resumes(world: World) -> None:
    server = world.server
    async with running(world.config, server):
        paused = await server.slash(world.mod, world.channel, "queue pause", {})
        await server.wait_for(lambda a: a.interaction is paused and a.kind == "message")
        asked = await server.slash(world.alice, world.channel, "imagine", {"prompt": "a tree", "steps": 1, "count": 1})
        ack = (await server.wait_for(lambda a: a.interaction is asked and a.kind == "message")).message
        assert "this server's moderators have paused the queue" in ack.content
        resumed = await server.slash(world.mod, world.channel, "queue resume", {})
        await server.wait_for(lambda a: a.interaction is resumed and a.kind == "message")
        await server.wait_for(message_for(asked, files=True), TIMEOUT)


def tiny_x4_upscaler(directory: Path) -> Path:
    """A tiny x4 upscaler whose VAE scales by 4 like the released one's (the shared fixture's by 2)."""
    family = tiny_family("x4-upscaler")
    family = replace(family, vae=replace(family.vae, ch_mult=(1, 2, 4)))
    path = directory / "x4.safetensors"
    safetensors.torch.save_file(random_state_dict(family), path)
    return path


async def imagine_from_upload(world: World, prompt: str) -> tuple[Message, str]:
    """An img2img result of the 64x64 `png_upload` (small: Zoom Out then works on 128 to 192 pixels,
    which the tiny VAE, whose attention sees every latent pixel, decodes quickly), and its job id."""
    asked = await world.server.slash(world.alice, world.channel, "imagine",
                                     {"prompt": prompt, "image": png_upload("photo.png")})
    result = (await world.server.wait_for(message_for(asked, files=True), TIMEOUT)).message
    assert png_info(result.attachments[0].data)[0] == (64, 64)
    return result, result.buttons()[0]["custom_id"].split(":")[3]


async def test_zoom_out_of_an_upscale_delivers_the_outpainted_canvas(world: World) -> None:
    server = world.server
    async with running(world.config, server):
        first, job_id = await imagine_from_upload(world, "a harbour")
        upscale = await server.press_button(world.alice, first, f"atelier:v1:upscale:{job_id}:0")
        upscaled = (await server.wait_for(message_for(upscale, files=True), TIMEOUT)).message
        assert png_info(upscaled.attachments[0].data)[0] == (128, 128)  # hires 2x: no upscaler configured
        upscaled_id = upscaled.buttons()[0]["custom_id"].split(":")[3]
        zoom = await server.press_button(world.bob, upscaled, f"atelier:v1:zoom:{upscaled_id}:0")
        zoomed = (await server.wait_for(message_for(zoom, files=True), TIMEOUT)).message
        size, parameters = png_info(zoomed.attachments[0].data)
        # A quarter of the 128-pixel side, 32 pixels, added on every side: the outpainted canvas.
        assert size == (192, 192) and parameters.startswith("a harbour\n")
        assert "Size: 192x192, " in parameters and parameters.endswith("Model: tiny, Denoising strength: 1")
        assert f"<@{world.bob.id}>" in zoomed.content and "outpaint" in zoomed.content
        assert labels(zoomed) == ["U1", "🔄", "V1"]  # a drawn image again, with its own buttons


async def test_with_an_upscaler_configured_u_upscales_4x_and_the_upscaler_cannot_draw(
        world: World, tmp_path: Path) -> None:
    server = world.server
    x4 = tiny_x4_upscaler(tmp_path)  # also configured as "spare", not named the upscaler: found by its family
    models = (*world.config.models, ModelSettings(name="x4", checkpoint=x4), ModelSettings(name="spare", checkpoint=x4))
    generation = world.config.generation.model_copy(update=dict(upscaler="x4", upscaler_steps=2,
                                                                max_pixels=128 * 128))
    config = world.config.model_copy(update=dict(models=models, generation=generation))
    async with running(config, server) as bot:
        async def offered() -> list[str]:
            choices = await server.autocomplete(world.alice, world.channel, "imagine", {"prompt": "x", "model": ""},
                                                "model")
            return [c["value"] for c in choices]

        assert await offered() == ["tiny", "spare"]  # spare's file was not read yet
        for model, others in (("x4", "tiny, spare"), ("spare", "tiny")):
            refused = await server.slash(world.alice, world.channel, "imagine", {"prompt": "x", "model": model})
            answer = (await server.wait_for(lambda a, i=refused: a.interaction is i and a.kind == "message")).message
            assert answer.ephemeral and answer.content == (f"{model} is an upscaler: it only enlarges images (the U "
                                                           f"buttons use it) and cannot draw; pick one of: {others}")
        assert await offered() == ["tiny"]

        first, job_id = await imagine_from_upload(world, "a lighthouse")
        upscale = await server.press_button(world.bob, first, f"atelier:v1:upscale:{job_id}:0")
        upscaled = (await server.wait_for(message_for(upscale, files=True), TIMEOUT)).message
        size, parameters = png_info(upscaled.attachments[0].data)
        assert size == (4 * 64, 4 * 64) and parameters.startswith("a lighthouse\n")
        # The upscaler's own settings (the source ran Euler at guidance 7), on the 64x64 input.
        assert "Steps: 2, Sampler: DPM++ 2M Karras, CFG scale: 9, " in parameters
        assert "Size: 64x64, " in parameters and parameters.endswith("Model: x4, Hires upscale: 4")
        assert labels(upscaled) == ["Vary (Subtle)", "Vary (Strong)", "Zoom Out", "🔄"]
        upscaled_id = upscaled.buttons()[0]["custom_id"].split(":")[3]
        job = await stored.get_job(bot.studio.db, upscaled_id)  # charged the x4 UNet's work on a 64x64 latent
        assert job.request.upscale_factor == 4 and job.cost == pytest.approx(2 * 64 * 64 * 64 * X4_UNET_FLOPS_RATIO / 512**2)

        # Zoom Out of the 256x256 result: drawn by the model that drew the original, within the limits.
        zoom = await server.press_button(world.bob, upscaled, f"atelier:v1:zoom:{upscaled_id}:0")
        ack = await server.wait_for(lambda a: a.interaction is zoom and a.kind == "edit" and "-# " in (a.content or ""))
        assert "the result would be 192x192, over the limit (16384 pixels" in ack.content
        zoomed = (await server.wait_for(message_for(zoom, files=True), TIMEOUT)).message
        size, parameters = png_info(zoomed.attachments[0].data)
        assert size == (128, 128) and "Steps: 2, Sampler: Euler, CFG scale: 7, " in parameters
        assert parameters.endswith("Model: tiny, Denoising strength: 1")


# -- issue 12: refusals that name everything, the place in line while paused, cancel inside a batch --

async def test_one_refusal_names_every_limit_the_request_breaks(world: World) -> None:
    server = world.server
    async with running(world.config, server):
        limited = await server.slash(world.mod, world.channel, "limits set",
                                     {"scope": "user", "target": world.carol, "max_steps": 2, "max_count": 1})
        await server.wait_for(lambda a: a.interaction is limited and a.kind == "message")
        asked = await server.slash(world.carol, world.channel, "imagine", {"prompt": "a cat", "steps": 5, "count": 2})
        assert (await private_answer(server, asked)).content == (
            "This request cannot run here, for 2 reasons:\n"
            "- Your limit here is 2 steps; you asked for 5.\n"
            "- Your limit here is 1 images per request; you asked for 2.")


async def test_a_paused_queue_shows_places_that_move_when_a_job_ahead_is_cancelled(world: World) -> None:
    server = world.server
    async with running(world.config, server):
        paused = await server.slash(world.mod, world.channel, "queue pause", {})
        await server.wait_for(lambda a: a.interaction is paused and a.kind == "message")
        acks = []
        for user in (world.alice, world.bob, world.carol):
            asked = await server.slash(user, world.channel, "imagine", {"prompt": "a tree", "steps": 1})
            acks.append((await server.wait_for(lambda a, i=asked: a.interaction is i and a.kind == "message")).message)
        held = "; this server's moderators have paused the queue for now."
        assert [ack.content.endswith(f"position {n}{held}") for n, ack in enumerate(acks, start=1)] == [True] * 3
        since = len(server.actions)
        pressed = await server.press_button(world.alice, acks[0], acks[0].buttons()[0]["custom_id"])
        await server.wait_for(lambda a: a.interaction is pressed and a.kind == "message")
        for n, ack in ((1, acks[1]), (2, acks[2])):  # both move up one place, still paused
            await server.wait_for(lambda a, m=ack, n=n: a.kind == "edit" and a.message is m
                                  and (a.content or "").endswith(f"position {n}{held}"), since=since)


async def test_a_job_cancelled_in_a_shared_batch_is_answered_at_once_and_its_mates_images_are_unchanged(
        world: World) -> None:
    """Alice's and Bob's requests run as one batch; Bob cancels while it runs: he is told before the
    batch ends, and Alice's image equals the one of the same batch run without the cancel."""
    server = world.server
    async with running(world.config, server) as bot:
        async def shared_batch(cancel: bool) -> bytes:
            bot.studio.queue.pause()  # both wait, then leave together in one batch
            asked = [await server.slash(user, world.channel, "imagine", {"prompt": "a lighthouse", "steps": 10,
                                                                          "seed": seed})
                     for user, seed in ((world.alice, 11), (world.bob, 12))]
            acks = [(await server.wait_for(lambda a, i=i: a.interaction is i and a.kind == "message")).message
                    for i in asked]
            jobs = [bot.studio.queue.get(ack.buttons()[0]["custom_id"].split(":")[3]) for ack in acks]
            bot.studio.queue.resume()
            async with asyncio.timeout(TIMEOUT):  # the runner takes both at once: one batch
                while any(job.state is not JobState.RUNNING for job in jobs):
                    await asyncio.sleep(0.01)
            assert jobs[0].started_at == jobs[1].started_at
            if cancel:
                await server.press_button(world.bob, acks[1], acks[1].buttons()[0]["custom_id"])
                await server.wait_for(lambda a: a.kind == "edit" and a.message is acks[1]
                                      and "was cancelled" in (a.content or ""), TIMEOUT)
                assert not [a for a in server.actions if message_for(asked[0], files=True)(a)]  # still drawing
                assert jobs[0].state is JobState.RUNNING
            result = (await server.wait_for(message_for(asked[0], files=True), TIMEOUT)).message
            if not cancel:
                await server.wait_for(message_for(asked[1], files=True), TIMEOUT)
            return result.attachments[0].data

        cancelled, plain = await shared_batch(cancel=True), await shared_batch(cancel=False)
        with Image.open(io.BytesIO(cancelled)) as a, Image.open(io.BytesIO(plain)) as b:
            difference = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert difference.max() <= 1  # one pixel level: the smaller UNet batch's kernel rounding at most
        rows = await bot.studio.db.fetch_all("SELECT owner_id, state FROM jobs")
        assert sorted((row["owner_id"] == world.bob.id, row["state"]) for row in rows) == [
            (False, "done"), (False, "done"), (True, "cancelled"), (True, "done")]
