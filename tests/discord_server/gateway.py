"""The gateway websocket: HELLO, IDENTIFY -> READY + GUILD_CREATE, heartbeats, and numbered dispatches.

Frames go out as plain JSON text. discord.py asks for `compress=zlib-stream` (or zstd-stream) in the
query string but only decompresses binary frames; text frames are parsed as they are
(`DiscordWebSocket.received_message`), so compression is ignored here. RESUME is refused with
INVALID_SESSION (d=false), which makes discord.py identify afresh, as Discord does for stale sessions.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from . import payloads
from .log import ActionLog
from .state import Message, State

DISPATCH, HEARTBEAT, IDENTIFY, RESUME, REQUEST_MEMBERS, INVALID_SESSION, HELLO, HEARTBEAT_ACK = 0, 1, 2, 6, 8, 9, 10, 11
GUILDS, GUILD_MEMBERS, GUILD_MESSAGES, DIRECT_MESSAGES, MESSAGE_CONTENT = 1 << 0, 1 << 1, 1 << 9, 1 << 12, 1 << 15
HEARTBEAT_INTERVAL_MS = 41_250
AUTHENTICATION_FAILED = 4004


@dataclass(eq=False)
class Session:
    ws: web.WebSocketResponse
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    intents: int = 0
    sequence: int = 0
    identified: bool = False


class Gateway:
    def __init__(self, state: State, log: ActionLog) -> None:
        self._state = state
        self._log = log
        self._sessions: list[Session] = []
        self._identified = asyncio.Condition()
        self.url = ""  # set once the server listens

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        session = Session(ws)
        self._sessions.append(session)
        try:
            hello = {"op": HELLO, "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS}, "s": None, "t": None}
            await self._send(session, hello)
            async for frame in ws:
                if frame.type is WSMsgType.TEXT:
                    await self._receive(session, json.loads(frame.data))
        finally:
            self._sessions.remove(session)
        return ws

    async def _receive(self, session: Session, payload: dict[str, Any]) -> None:
        op, data = payload.get("op"), payload.get("d")
        if op == HEARTBEAT:
            await self._send(session, {"op": HEARTBEAT_ACK, "d": None, "s": None, "t": None})
        elif op == IDENTIFY:
            await self._identify(session, data)
        elif op == RESUME:
            self._log.refusals.append(f"gateway RESUME of session {data.get('session_id')} -> INVALID_SESSION")
            await self._send(session, {"op": INVALID_SESSION, "d": False, "s": None, "t": None})
        elif op == REQUEST_MEMBERS:
            guild = self._state.guilds[int(data["guild_id"])]
            chunk = {"guild_id": str(guild.id), "members": [payloads.member(m) for m in guild.members.values()],
                     "chunk_index": 0, "chunk_count": 1, "nonce": data.get("nonce")}
            await self._dispatch_to(session, "GUILD_MEMBERS_CHUNK", chunk)

    async def _identify(self, session: Session, data: dict[str, Any]) -> None:
        if data.get("token") != self._state.bot_token:
            self._log.refusals.append("gateway IDENTIFY with a wrong token -> close 4004")
            await session.ws.close(code=AUTHENTICATION_FAILED, message=b"Authentication failed.")
            return
        session.intents = int(data.get("intents", 0))
        guilds = [g for g in self._state.guilds.values() if self._state.bot.id in g.members]
        bot = payloads.user(self._state.bot) | {"verified": True, "mfa_enabled": False, "email": None}
        ready = {
            "v": 10,
            "user": bot,
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.url,
            "application": {"id": str(self._state.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "user_settings": {},
            "auth": {},
        }
        await self._dispatch_to(session, "READY", ready)
        for guild in guilds:
            await self._dispatch_to(session, "GUILD_CREATE", payloads.guild_create(guild))
        async with self._identified:
            session.identified = True
            self._identified.notify_all()

    async def wait_for_bot(self, timeout: float) -> None:
        """Until a bot has identified and been sent its guilds."""
        async with self._identified:
            try:
                await asyncio.wait_for(self._identified.wait_for(self.connected), timeout)
            except TimeoutError:
                raise AssertionError(f"no bot identified on the gateway within {timeout}s") from None

    def connected(self) -> bool:
        return any(s.identified for s in self._sessions)

    async def dispatch(self, event: str, data: dict[str, Any], *, intent: int | None = None) -> None:
        """Send an event to every identified session subscribed to `intent` (None: always sent)."""
        for session in self._live(intent):
            await self._dispatch_to(session, event, data)

    async def dispatch_message(self, event: str, message: Message) -> None:
        """MESSAGE_CREATE/UPDATE, with content blanked as Discord does without the message-content intent."""
        if message.ephemeral:
            return
        in_dm = message.channel.guild is None
        for session in self._live(DIRECT_MESSAGES if in_dm else GUILD_MESSAGES):
            data = payloads.message_for_bot(message, self._state.bot, bool(session.intents & MESSAGE_CONTENT))
            await self._dispatch_to(session, event, data)

    def content_intent(self) -> bool:
        """Whether the bot asked for the message-content intent (REST answers follow it too, as
        Discord's follow the application's setting)."""
        return any(s.intents & MESSAGE_CONTENT for s in self._live(None))

    async def drop(self, code: int, message: bytes) -> None:
        """Close every session (the bot decides from `code` whether to resume or give up)."""
        for session in list(self._sessions):
            session.identified = False
            await session.ws.close(code=code, message=message)

    def _live(self, intent: int | None) -> list[Session]:
        return [s for s in self._sessions if s.identified and (intent is None or s.intents & intent)]

    async def _dispatch_to(self, session: Session, event: str, data: dict[str, Any]) -> None:
        session.sequence += 1
        await self._send(session, {"op": DISPATCH, "t": event, "s": session.sequence, "d": data})

    async def _send(self, session: Session, payload: dict[str, Any]) -> None:
        if not session.ws.closed:
            await session.ws.send_str(json.dumps(payload))
