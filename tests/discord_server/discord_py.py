"""Pointing discord.py at the loopback server, for tests only (the bot assigns these from its config)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import discord
import yarl

from .driver import DiscordServer


@contextmanager
def point_discord_py_at(server: DiscordServer) -> Iterator[None]:
    """Send discord.py's REST and gateway traffic to `server`, restoring Discord's hosts afterwards.

    REST URLs are `Route.BASE + path`. A non-sharded `Client` opens `DiscordWebSocket.DEFAULT_GATEWAY`
    directly (only `AutoShardedClient` asks `/gateway/bot`); after READY it reconnects to the
    `resume_gateway_url` the server sent.
    """
    saved = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = f"{server.url}/api/v10"
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(server.gateway_url)
    try:
        yield
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = saved
