"""The loopback Discord server, proven with a real discord.py bot logging in, syncing and answering."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands
from PIL import Image

from tests.discord_server import (
    Action,
    Channel,
    DiscordServer,
    Guild,
    Message,
    Upload,
    User,
    point_discord_py_at,
)

PING_FILE = b"pong bytes \x00\x01\x02"
MODELS = ["sd15-base", "sd15-inpaint", "sd21-v"]


class CountButton(discord.ui.DynamicItem[discord.ui.Button], template=r"count:v1:(?P<count>\d+)"):
    """A persistent button whose whole state lives in its custom id, so it works after a restart."""

    def __init__(self, count: int) -> None:
        super().__init__(discord.ui.Button(label=f"count {count}", custom_id=f"count:v1:{count}"))
        self.count = count

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button,
                             match: re.Match[str]) -> CountButton:
        return cls(int(match["count"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        view = discord.ui.View(timeout=None).add_item(CountButton(self.count + 1))
        await interaction.response.edit_message(content=f"{self.count + 1} by {interaction.user.name}", view=view)


class AckButton(discord.ui.DynamicItem[discord.ui.Button], template=r"ack:v1"):
    """Acknowledges with a deferred update (type 6), then edits its message through '@original'."""

    def __init__(self) -> None:
        super().__init__(discord.ui.Button(label="ack", custom_id="ack:v1"))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button,
                             match: re.Match[str]) -> AckButton:
        return cls()

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        await interaction.edit_original_response(content=f"acked by {interaction.user.name}", view=None)


class RemixModal(discord.ui.Modal, title="Remix"):
    prompt = discord.ui.TextInput(label="Prompt", custom_id="prompt")
    strength = discord.ui.TextInput(label="Strength", custom_id="strength", required=False, default="0.6")

    def __init__(self, target: discord.Message) -> None:
        super().__init__(custom_id="remix:v1")
        self.target = target

    async def on_submit(self, interaction: discord.Interaction) -> None:
        source = self.target.attachments[0]
        digest = hashlib.sha256(await source.read()).hexdigest()[:12]
        await interaction.response.send_message(
            f"remix of {source.filename} ({digest}) as {self.prompt.value!r} at {self.strength.value}"
        )


@dataclass
class Seen:
    """What the test bot observed, for the test to assert on."""

    messages: list[discord.Message] = field(default_factory=list)
    errors: list[discord.HTTPException] = field(default_factory=list)
    release_followup: asyncio.Event = field(default_factory=asyncio.Event)
    followup_done: asyncio.Event = field(default_factory=asyncio.Event)


class ExampleBot(commands.Bot):
    """A small but typical bot: guild commands, files, a persistent button, a modal, a context menu."""

    def __init__(self, guild_id: int, seen: Seen, *, message_content: bool = False) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        intents.guild_messages = True
        intents.message_content = message_content
        super().__init__(command_prefix=commands.when_mentioned, intents=intents, guild_ready_timeout=0.05)
        self.home = discord.Object(guild_id)
        self.seen = seen

    async def setup_hook(self) -> None:
        self.add_dynamic_items(CountButton, AckButton)
        tree = self.tree
        seen = self.seen

        @tree.error
        async def record(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
            seen.errors.append(error.original if isinstance(error, app_commands.CommandInvokeError) else error)

        @tree.command(guild=self.home, description="Answer with a file and a counter button")
        async def ping(interaction: discord.Interaction) -> None:
            view = discord.ui.View(timeout=None).add_item(CountButton(0))
            file = discord.File(io.BytesIO(PING_FILE), filename="pong.bin")
            await interaction.response.send_message("pong", file=file, view=view)

        @tree.command(guild=self.home, description="Describe an image")
        @app_commands.describe(prompt="what to draw")
        async def imagine(interaction: discord.Interaction, prompt: app_commands.Range[str, 1, 50],
                          image: discord.Attachment, model: str, count: app_commands.Range[int, 1, 4] = 1) -> None:
            data = await image.read()
            await interaction.response.send_message(
                f"{prompt} x{count} on {model} from {image.filename} {image.content_type} {image.width}x{image.height} "
                f"{hashlib.sha256(data).hexdigest()[:12]}", ephemeral=True
            )

        @imagine.autocomplete("model")
        async def complete_model(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
            return [app_commands.Choice(name=m, value=m) for m in MODELS if m.startswith(current)]

        limits = app_commands.Group(name="limits", description="Moderator limits", guild_ids=[self.home.id])
        limits_set = app_commands.Group(name="set", description="Set a limit", parent=limits)

        @limits_set.command(name="daily", description="Daily images")
        async def daily(interaction: discord.Interaction, images: int, role: discord.Role) -> None:
            assert isinstance(interaction.user, discord.Member)
            if not interaction.permissions.manage_guild:
                await interaction.response.send_message("moderators only", ephemeral=True)
                return
            await interaction.response.send_message(f"{role.name}: {images}/day (by {interaction.user.display_name})")

        tree.add_command(limits)

        @tree.command(guild=self.home, description="Answer late, after a defer")
        async def slow(interaction: discord.Interaction) -> None:
            await interaction.response.defer(thinking=True)
            await seen.release_followup.wait()
            try:
                await interaction.followup.send("finally")
            except discord.HTTPException as error:
                seen.errors.append(error)
            seen.followup_done.set()

        @tree.command(guild=self.home, description="Post in another channel")
        async def announce(interaction: discord.Interaction, channel: discord.TextChannel) -> None:
            try:
                await channel.send("announcement")
            except discord.Forbidden as error:
                seen.errors.append(error)
                await interaction.response.send_message(f"I cannot post in {channel.mention}", ephemeral=True)
                return
            await interaction.response.send_message("posted", ephemeral=True)

        @tree.command(guild=self.home, description="Use the webhook and channel routes a bot needs")
        async def roundtrip(interaction: discord.Interaction) -> None:
            channel = interaction.channel
            assert isinstance(channel, discord.TextChannel)
            await interaction.response.defer(thinking=True)
            await interaction.followup.send("first", file=discord.File(io.BytesIO(b"one"), filename="one.txt"))
            second = await interaction.followup.send("second", ephemeral=True, wait=True)
            await second.edit(content="second, edited")
            original = await interaction.edit_original_response(content="first, edited", attachments=[])
            posted = await channel.send("in channel", view=discord.ui.View().add_item(AckButton()))
            fetched = await channel.fetch_message(posted.id)
            history = [m.content async for m in channel.history(limit=10)]
            await interaction.followup.send(f"{fetched.content}; {history}; {len(original.attachments)} files")
            await second.delete()

        @tree.command(guild=self.home, description="Defer in public, then answer in private")
        async def private(interaction: discord.Interaction) -> None:
            await interaction.response.defer(thinking=True)
            await interaction.delete_original_response()
            await interaction.followup.send("only you", ephemeral=True)

        @tree.context_menu(name="Remix", guild=self.home)
        async def remix(interaction: discord.Interaction, message: discord.Message) -> None:
            await interaction.response.send_modal(RemixModal(message))

        @tree.command(description="Greet, and whisper in DMs")
        async def hello(interaction: discord.Interaction) -> None:
            await interaction.user.send(f"psst {interaction.user.name}")
            await interaction.response.send_message("hello")

        await tree.sync(guild=self.home)
        await tree.sync()

    async def on_message(self, message: discord.Message) -> None:
        if message.author == self.user:
            return
        self.seen.messages.append(message)
        if self.user in message.mentions and message.reference is not None:
            replied = message.reference.resolved
            fetched = await message.channel.fetch_message(message.reference.message_id)
            await message.reply(f"heard {message.content!r} about {_files(replied)}, fetched {_files(fetched)}")


def _files(message: object) -> str:
    """The file names a message carries, as the bot sees them."""
    names = [a.filename for a in message.attachments] if isinstance(message, discord.Message) else []
    return ",".join(names) or "nothing"


async def eventually(condition: Callable[[], object], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class World:
    server: DiscordServer
    guild: Guild
    channel: Channel
    alice: User
    mod: User


@pytest.fixture
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    """A guild with #art, alice and a moderator; parametrize indirectly to pass DiscordServer options."""
    async with DiscordServer(**getattr(request, "param", {})) as server:
        guild = await server.create_guild("studio")
        channel = await server.create_channel(guild, "art")
        alice, mod = server.create_user("alice"), server.create_user("mod")
        manage_guild = discord.Permissions(manage_guild=True).value
        moderators = await server.create_role(guild, "moderators", permissions=manage_guild)
        await server.add_member(guild, alice)
        await server.add_member(guild, mod, roles=[moderators])
        with point_discord_py_at(server):
            yield World(server, guild, channel, alice, mod)
        assert server.log.server_errors == []


@asynccontextmanager
async def running(world: World, seen: Seen, caplog: pytest.LogCaptureFixture, *,
                  message_content: bool = False) -> AsyncIterator[ExampleBot]:
    """Log a fresh bot in and connect it; on exit close it and check nothing was left unclosed."""
    bot = ExampleBot(world.guild.id, seen, message_content=message_content)
    connection: asyncio.Task[None] | None = None
    try:
        await bot.login(world.server.token)
        connection = asyncio.create_task(bot.connect(reconnect=False))
        await asyncio.wait_for(bot.wait_until_ready(), 10)
        yield bot
    finally:
        await bot.close()
        if connection is not None:
            await connection
    gc.collect()
    complaints = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or "nclosed" in r.getMessage()]
    assert complaints == []


def pressed(message: Message, content: str) -> Callable[[Action], bool]:
    def predicate(action: Action) -> bool:
        return action.kind == "edit" and action.message is message and action.content == content

    predicate.__doc__ = f"an edit of message {message.id} to {content!r}"
    return predicate


async def test_bot_syncs_answers_with_file_and_button_that_survives_restart(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    server = world.server
    async with running(world, Seen(), caplog):
        synced = {(c["name"], c["type"]) for c in server.commands(world.guild)}
        assert synced == {("ping", 1), ("imagine", 1), ("limits", 1), ("slow", 1), ("announce", 1), ("roundtrip", 1),
                          ("private", 1), ("Remix", 3)}
        assert [c["name"] for c in server.commands()] == ["hello"]

        ping = await server.slash(world.alice, world.channel, "ping")
        sent = await server.wait_for(lambda a: a.kind == "message" and a.interaction is ping)
        answer = sent.message
        assert (answer.content, answer.author) == ("pong", server.bot)
        assert [(a.filename, a.data) for a in answer.attachments] == [("pong.bin", PING_FILE)]
        assert answer.custom_ids() == ["count:v1:0"]
        assert ping.callback_types == [4] and ping.original is answer and server.messages(world.channel) == [answer]

        first = await server.press_button(world.mod, answer, "count:v1:0")
        await server.wait_for(pressed(answer, "1 by mod"))
        assert first.callback_types == [7] and answer.custom_ids() == ["count:v1:1"]
        assert answer.attachments[0].data == PING_FILE  # an edit without `attachments` keeps the file

    assert not server.bot_connected  # the old bot really is gone
    async with running(world, Seen(), caplog):  # a new process: only the custom id carries state
        await server.press_button(world.alice, answer, "count:v1:1")
        await server.wait_for(pressed(answer, "2 by alice"))
        with pytest.raises(ValueError, match=r"has no button 'count:v1:0'; it has \['count:v1:2'\]"):
            await server.press_button(world.alice, answer, "count:v1:0")


async def test_options_attachments_autocomplete_and_subcommand_permissions(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    server = world.server
    image = Upload("cat.png", png(3, 2))
    async with running(world, Seen(), caplog):
        choices = await server.autocomplete(world.alice, world.channel, "imagine", {"prompt": "a cat", "model": "sd15"},
                                            focused="model")
        assert [c["value"] for c in choices] == ["sd15-base", "sd15-inpaint"]

        asked = await server.slash(world.alice, world.channel, "imagine",
                                   {"prompt": "a cat", "image": image, "model": "sd21-v", "count": 3})
        reply = (await server.wait_for(lambda a: a.interaction is asked and a.kind == "message")).message
        digest = hashlib.sha256(image.data).hexdigest()[:12]
        assert reply.content == f"a cat x3 on sd21-v from cat.png image/png 3x2 {digest}"
        assert reply.ephemeral and reply not in [m for m in server.messages(world.channel) if not m.ephemeral]

        with pytest.raises(ValueError, match=r"within \[1, 4\]"):
            await server.slash(world.alice, world.channel, "imagine",
                               {"prompt": "a cat", "image": image, "model": "x", "count": 5})
        with pytest.raises(ValueError, match="unknown \\['seed'\\]"):
            await server.slash(world.alice, world.channel, "imagine", {"prompt": "a", "image": image, "model": "x",
                                                                        "seed": 3})

        moderators = world.guild.roles[1]
        by_mod = await server.slash(world.mod, world.channel, "limits set daily", {"images": 20, "role": moderators})
        by_alice = await server.slash(world.alice, world.channel, "limits set daily",
                                      {"images": 99, "role": moderators})
        for interaction, expected in ((by_mod, "moderators: 20/day (by Mod)"), (by_alice, "moderators only")):
            action = await server.wait_for(lambda a, i=interaction: a.interaction is i and a.kind == "message")
            assert action.content == expected


async def test_context_menu_opens_a_modal_whose_submission_reaches_the_bot(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    server = world.server
    art = b"pixels" * 100
    posted = await server.post_message(world.alice, world.channel, "my drawing", attachments=[Upload("art.webp", art)])
    async with running(world, Seen(), caplog):
        opened = await server.context_menu(world.mod, posted, "Remix")
        await server.wait_for(lambda a: a.interaction is opened and a.callback_type == 9)
        assert opened.modal is not None and opened.modal["custom_id"] == "remix:v1"

        with pytest.raises(ValueError, match=r"required but missing \['prompt'\]"):
            await server.submit_modal(world.mod, opened, {"strength": "0.3"})
        submitted = await server.submit_modal(world.mod, opened, {"prompt": "as a fox", "strength": "0.3"})
        reply = await server.wait_for(lambda a: a.interaction is submitted and a.kind == "message")
        digest = hashlib.sha256(art).hexdigest()[:12]
        assert reply.content == f"remix of art.webp ({digest}) as 'as a fox' at 0.3"


async def test_message_content_reaches_the_bot_only_when_it_is_mentioned(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the intent, other members' messages reach the bot blank: in gateway events, as the
    message a reply refers to, and through REST; the bot's own and mentioning messages do not."""
    server = world.server
    seen = Seen()
    image = await server.post_message(world.alice, world.channel, "", attachments=[Upload("base.png", b"png")])
    tagged = await server.post_message(world.alice, world.channel, f"{server.bot.mention} mine",
                                       attachments=[Upload("tagged.png", b"png")])
    async with running(world, seen, caplog):
        await server.post_message(world.alice, world.channel, "talking among humans")
        mention = await server.post_message(world.alice, world.channel, f"{server.bot.mention} make it blue",
                                            reference=image)
        reply = (await server.wait_for(lambda a: a.kind == "message" and a.message.reference is mention)).message
        assert reply.content == f"heard '{server.bot.mention} make it blue' about nothing, fetched nothing"
        assert reply.mentions == [server.bot, world.alice]  # the quoted mention, and the reply pings its author
        assert [m.content for m in seen.messages] == ["", f"{server.bot.mention} make it blue"]

        about_tagged = await server.post_message(world.alice, world.channel, f"{server.bot.mention} this",
                                                 reference=tagged)
        said = (await server.wait_for(lambda a: a.kind == "message" and a.message.reference is about_tagged)).message
        assert said.content.endswith("about tagged.png, fetched tagged.png")

        ping = await server.slash(world.alice, world.channel, "ping")
        pong = (await server.wait_for(lambda a: a.interaction is ping and a.kind == "message")).message
        about_own = await server.post_message(world.alice, world.channel, f"{server.bot.mention} again",
                                              reference=pong)
        said = (await server.wait_for(lambda a: a.kind == "message" and a.message.reference is about_own)).message
        assert said.content.endswith("about pong.bin, fetched pong.bin")


async def test_with_the_message_content_intent_the_bot_sees_every_message(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    server = world.server
    seen = Seen()
    image = await server.post_message(world.alice, world.channel, "", attachments=[Upload("base.png", b"png")])
    async with running(world, seen, caplog, message_content=True):
        await server.post_message(world.alice, world.channel, "talking among humans")
        mention = await server.post_message(world.alice, world.channel, f"{server.bot.mention} make it blue",
                                            reference=image)
        reply = (await server.wait_for(lambda a: a.kind == "message" and a.message.reference is mention)).message
        assert reply.content.endswith("about base.png, fetched base.png")
        assert seen.messages[0].content == "talking among humans"


async def test_expired_token_and_missing_permission_surface_as_discord_errors(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    server = world.server
    seen = Seen()
    closed = await server.create_channel(world.guild, "read-only")
    async with running(world, seen, caplog):
        await server.refuse_bot_messages(closed)
        slow = await server.slash(world.alice, world.channel, "slow")
        thinking = await server.wait_for(lambda a: a.interaction is slow and a.kind == "message")
        assert thinking.message.loading
        server.expire_token(slow)
        seen.release_followup.set()
        await asyncio.wait_for(seen.followup_done.wait(), 5)
        [expired] = seen.errors
        assert (type(expired), expired.status, expired.code) == (discord.HTTPException, 401, 50027)

        announce = await server.slash(world.alice, world.channel, "announce", {"channel": closed})
        reply = await server.wait_for(lambda a: a.interaction is announce and a.kind == "message")
        assert reply.content == f"I cannot post in {closed.mention}" and reply.message.ephemeral
        forbidden = seen.errors[1]
        assert isinstance(forbidden, discord.Forbidden) and forbidden.code == 50013
        assert server.messages(closed) == []


async def test_followups_edits_deletes_and_channel_routes_as_discord_py_uses_them(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    server = world.server
    async with running(world, Seen(), caplog):
        rt = await server.slash(world.alice, world.channel, "roundtrip")
        await server.wait_for(lambda a: a.interaction is rt and a.kind == "delete")
        done = [(a.kind, a.callback_type, a.content) for a in server.responses(rt)]
        assert done == [
            ("callback", 5, None),
            ("message", None, ""),  # the "thinking" message
            ("edit", None, "first"),  # the first followup after a thinking defer replaces it
            ("message", None, "second"),
            ("edit", None, "second, edited"),
            ("edit", None, "first, edited"),
            ("message", None, "in channel; ['in channel', 'first, edited']; 0 files"),
            ("delete", None, "second, edited"),
        ]
        assert rt.original is not None and rt.original.attachments == [] and not rt.original.loading
        assert [m.ephemeral for m in rt.followups] == [False, True, False] and rt.followups[1].deleted

        [posted] = [m for m in server.messages(world.channel) if m.interaction is None]
        acked = await server.press_button(world.alice, posted, "ack:v1")
        await server.wait_for(pressed(posted, "acked by alice"))
        assert acked.callback_types == [6] and posted.custom_ids() == []

        def never(action: Action) -> bool:
            """a reaction that never comes"""
            return False

        with pytest.raises(AssertionError, match=r"matched a reaction that never comes within 0.05s; since #10 the bot "
                                                 r"did:\n  10. edit .* \(ack:v1\) .*'acked by alice'"):
            await server.wait_for(never, timeout=0.05, since=len(server.actions) - 1)

        private = await server.slash(world.alice, world.channel, "private")
        whisper = await server.wait_for(lambda a: a.interaction is private and a.content == "only you")
        # Once the public "thinking" message is deleted, a followup is a new message with its own flags.
        assert [a.kind for a in server.responses(private)] == ["callback", "message", "delete", "message"]
        assert whisper.message.ephemeral and whisper.message is not private.original and private.original.deleted


@pytest.mark.parametrize("world", [{"upload_limit": 8, "reject_double_ack": True}], indirect=True)
async def test_upload_limit_and_double_acknowledgement_are_refused(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    server, seen = world.server, Seen()
    async with running(world, seen, caplog):
        ping = await server.slash(world.alice, world.channel, "ping")  # its 14-byte file is over the limit
        await eventually(lambda: seen.errors)
        [too_large] = seen.errors
        assert (too_large.status, too_large.code) == (413, 40005)
        assert ping.callback_types == [] and server.messages(world.channel) == []
        with pytest.raises(ValueError, match="upload limit is 8"):
            await server.post_message(world.alice, world.channel, "big", attachments=[Upload("big.png", b"x" * 9)])

        answered = await server.slash(world.mod, world.channel, "limits set daily",
                                      {"images": 3, "role": world.guild.everyone})
        await server.wait_for(lambda a: a.interaction is answered and a.kind == "message")
        url = f"{server.url}/api/v10/interactions/{answered.id}/{answered.token}/callback"
        async with aiohttp.ClientSession() as http, http.post(url, json={"type": 4, "data": {"content": "again"}}) as r:
            refusal = {"code": 40060, "message": "Interaction has already been acknowledged."}
            assert (r.status, await r.json()) == (400, refusal)
        assert answered.callback_types == [4]


@pytest.mark.parametrize("world", [{"response_deadline": 0.0}], indirect=True)
async def test_a_late_interaction_response_is_unknown(world: World, caplog: pytest.LogCaptureFixture) -> None:
    server, seen = world.server, Seen()
    async with running(world, seen, caplog):
        late = await server.slash(world.alice, world.channel, "announce", {"channel": world.channel})
        await server.wait_for(lambda a: a.kind == "message" and a.content == "announcement")
        await eventually(lambda: seen.errors)
        [unknown] = seen.errors
        assert isinstance(unknown, discord.NotFound) and unknown.code == 10062
        assert late.callback_types == []


async def test_a_wrong_token_cannot_log_in(world: World) -> None:
    bot = ExampleBot(world.guild.id, Seen())
    with pytest.raises(discord.LoginFailure):
        await bot.login(world.server.token + "x")
    await bot.close()


async def test_global_commands_work_in_dms_and_the_bot_can_open_one(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    server = world.server
    async with running(world, Seen(), caplog):
        dm = server.dm_channel(world.alice)
        with pytest.raises(LookupError, match=r"no command 'ping' of type 1 usable in DMs; there are \['hello'\]"):
            await server.slash(world.alice, dm, "ping")
        in_guild = await server.slash(world.alice, world.channel, "hello")
        await server.wait_for(lambda a: a.interaction is in_guild and a.kind == "message")
        in_dm = await server.slash(world.alice, dm, "hello")
        reply = await server.wait_for(lambda a: a.interaction is in_dm and a.kind == "message")
        assert reply.message.channel is dm and in_guild.original is not None
        assert in_guild.original.channel is world.channel
        assert [m.content for m in server.messages(dm)] == ["psst alice", "psst alice", "hello"]


async def test_a_dropped_gateway_connection_is_refused_resumption_and_identifies_again(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    server = world.server
    async with running(world, Seen(), caplog):
        await server.disconnect_bot()
        assert not server.bot_connected
        await server.wait_for_bot()
        assert [r for r in server.log.refusals if "RESUME" in r] != []
        ping = await server.slash(world.alice, world.channel, "ping")
        reply = await server.wait_for(lambda a: a.interaction is ping and a.kind == "message")
        assert reply.content == "pong"
