"""The discord.py client: opens the studio in `setup_hook`, registers the persistent buttons and the
commands, and closes the studio gracefully (drain, grace period) in `close`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import discord
import yarl
from discord import app_commands
from discord.ext import commands

from bot import policy
from bot.account import account_commands
from bot.commands import Gestures
from bot.config import AppConfig
from bot.discord_setup import intents, invite_url
from bot.moderation import moderation_commands
from bot.replies import Delivery
from bot.studio import Studio
from bot.views import CancelButton, JobButton
from generation.engine import memory_budget
from generation.pipeline import resolve_device
from generation.request import JobState
from storage import jobs as stored

log = logging.getLogger(__name__)


class AtelierBot(commands.Bot):
    """`await bot.start(token)`; `await bot.close()` shuts the studio down gracefully."""

    def __init__(self, config: AppConfig, *, guild_ready_timeout: float = 2.0) -> None:
        super().__init__(command_prefix=commands.when_mentioned, intents=intents(config.discord),
                         help_command=None, guild_ready_timeout=guild_ready_timeout)
        self.config = config
        self._stack = contextlib.AsyncExitStack()
        self.studio: Studio | None = None
        self.gestures: Gestures | None = None
        self.delivery: Delivery | None = None
        self._saved_urls: tuple[str, yarl.URL] | None = None

    async def login(self, token: str) -> None:
        """Point discord.py at `[discord] api_base` / `gateway_url` first: it keeps both URLs on
        classes. With only `api_base`, the gateway URL comes from that server's GET /gateway/bot."""
        settings = self.config.discord
        self._saved_urls = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        if settings.api_base is not None:
            discord.http.Route.BASE = settings.api_base.rstrip("/")
        await super().login(token)
        gateway = settings.gateway_url
        if gateway is None and settings.api_base is not None:
            _, gateway, _ = await self.http.get_bot_gateway()
        if gateway is not None:
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)

    async def setup_hook(self) -> None:
        config = self.config
        devices = tuple(str(resolve_device(d)) for d in config.generation.devices)
        budget = min(memory_budget(d) for d in devices)
        studio = await self._stack.enter_async_context(
            Studio.open(config, devices, budget, refusal=policy.problems))
        self.delivery = Delivery(self, studio.db, config.discord)
        self.studio, self.gestures = studio, Gestures(self, studio, self.delivery)
        self.add_dynamic_items(JobButton, CancelButton)
        self.tree.error(self._command_failed)
        home = discord.Object(config.discord.guild_id) if config.discord.guild_id else None
        for command in (
            self.gestures.imagine_command(),
            self.gestures.remix_menu(),
            *moderation_commands(studio.db, studio.queue, config, studio.cancel, studio.pause),
            *account_commands(studio.db, studio.queue, config),
        ):
            self.tree.add_command(command, guild=home)
        await self.tree.sync(guild=home)
        for job in await stored.jobs_by_state(studio.db, JobState.QUEUED):  # restored from before a restart
            if job.message_id is not None:
                channel = self.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
                self.delivery.resume(job, channel.get_partial_message(job.message_id).edit)
        studio.start(self.delivery)

    async def _command_failed(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """A bug of ours, or Discord failing us: log it with the command, tell the user plainly."""
        name = interaction.command.qualified_name if interaction.command else "?"
        log.error("/%s failed for user %s", name, interaction.user.id, exc_info=error)
        text = "Something went wrong on my side; it has been logged for the bot's operators. Please try again."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            log.warning("could not tell user %s that /%s failed", interaction.user.id, name)

    async def on_ready(self) -> None:
        log.info("logged in as %s; invite: %s", self.user, invite_url(self.application_id or 0))
        print(f"Atelier is online as {self.user}. Invite it with:\n  {invite_url(self.application_id or 0)}",
              flush=True)

    async def on_message(self, message: discord.Message) -> None:
        if self.gestures is not None:
            await self.gestures.on_message(message)

    async def close(self) -> None:
        """Stop taking jobs, give the running batch its grace period, then disconnect."""
        if self.studio is not None:
            await self.studio.shutdown()
        if self.delivery is not None:  # results of the last batch, while the database is open
            await self.delivery.aclose()
        await self._stack.aclose()
        await super().close()
        if self._saved_urls is not None:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._saved_urls


async def run_bot(config: AppConfig, token: str) -> None:
    """Run until the connection ends for good or SIGTERM / Ctrl-C arrives, then shut down
    gracefully: no new jobs, the running batch gets `[queue] shutdown_grace_s`, the rest is
    persisted for the next start. Raises `discord.LoginFailure` for a refused token."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bot = AtelierBot(config)
    running = asyncio.create_task(bot.start(token), name="discord")
    stopping = asyncio.create_task(stop.wait(), name="signals")
    try:
        await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        await bot.close()
        await asyncio.wait([running], timeout=10)  # start() returns once the bot is closed
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    if running.done() and not running.cancelled():
        running.result()  # a refused token or a connection that could not be made
