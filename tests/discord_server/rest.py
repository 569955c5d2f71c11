"""The REST API under /api/v10 (plus served attachments), as much of it as discord.py and a bot use.

Errors carry Discord's JSON codes so discord.py raises the same exceptions it would against Discord.
Anything unknown answers 404 and is recorded in `ActionLog.server_errors`, so a missing route shows
up in test failures instead of as a mystery. Handler bugs answer 400, not 500: discord.py retries
5xx with sleeps, which would turn a server bug into a slow test.
"""

from __future__ import annotations

import json
import re
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from . import payloads
from .gateway import Gateway
from .log import Action, ActionLog
from .state import (
    ATTACH_FILES,
    EPHEMERAL,
    LOADING,
    SEND_MESSAGES,
    VIEW_CHANNEL,
    Attachment,
    Channel,
    Guild,
    Interaction,
    Message,
    State,
    Upload,
    User,
    image_size,
    snowflake_time,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_CONTENT = 2000
MAX_ROWS = 5
MAX_PER_ROW = 5
MAX_CUSTOM_ID = 100
RATE_LIMIT_HEADERS = {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "49", "X-RateLimit-Reset-After": "1.0"}


@dataclass(frozen=True)
class Options:
    """Behaviours a test may switch (see `DiscordServer`)."""

    upload_limit: int
    reject_double_ack: bool
    response_deadline: float | None


class ApiError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class RestApi:
    def __init__(self, state: State, gateway: Gateway, log: ActionLog, options: Options) -> None:
        self._state = state
        self._gateway = gateway
        self._log = log
        self._options = options
        self.base_url = ""  # set once the server listens

    # ---- wiring -------------------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        api = "/api/v10"
        bot = self._bot_only
        return [
            web.get(f"{api}/gateway", self._gateway_url),
            web.get(f"{api}/gateway/bot", bot(self._gateway_url)),
            web.get(f"{api}/users/@me", bot(self._me)),
            web.get(f"{api}/oauth2/applications/@me", bot(self._application)),
            web.get(f"{api}/applications/{{app}}/commands", bot(self._get_commands)),
            web.put(f"{api}/applications/{{app}}/commands", bot(self._put_commands)),
            web.post(f"{api}/applications/{{app}}/commands", bot(self._post_command)),
            web.get(f"{api}/applications/{{app}}/guilds/{{guild}}/commands", bot(self._get_commands)),
            web.put(f"{api}/applications/{{app}}/guilds/{{guild}}/commands", bot(self._put_commands)),
            web.post(f"{api}/applications/{{app}}/guilds/{{guild}}/commands", bot(self._post_command)),
            web.post(f"{api}/interactions/{{id}}/{{token}}/callback", self._callback),
            web.post(f"{api}/webhooks/{{app}}/{{token}}", self._followup),
            web.get(f"{api}/webhooks/{{app}}/{{token}}/messages/{{message}}", self._get_webhook_message),
            web.patch(f"{api}/webhooks/{{app}}/{{token}}/messages/{{message}}", self._edit_webhook_message),
            web.delete(f"{api}/webhooks/{{app}}/{{token}}/messages/{{message}}", self._delete_webhook_message),
            web.get(f"{api}/channels/{{channel}}", bot(self._get_channel)),
            web.get(f"{api}/channels/{{channel}}/messages", bot(self._list_messages)),
            web.post(f"{api}/channels/{{channel}}/messages", bot(self._create_message)),
            web.get(f"{api}/channels/{{channel}}/messages/{{message}}", bot(self._get_message)),
            web.patch(f"{api}/channels/{{channel}}/messages/{{message}}", bot(self._edit_message)),
            web.delete(f"{api}/channels/{{channel}}/messages/{{message}}", bot(self._delete_message)),
            web.post(f"{api}/channels/{{channel}}/typing", bot(self._typing)),
            web.post(f"{api}/users/@me/channels", bot(self._open_dm)),
            web.get(f"{api}/users/{{user}}", bot(self._get_user)),
            web.get(f"{api}/guilds/{{guild}}", bot(self._get_guild)),
            web.get(f"{api}/guilds/{{guild}}/channels", bot(self._get_guild_channels)),
            web.get(f"{api}/guilds/{{guild}}/roles", bot(self._get_roles)),
            web.get(f"{api}/guilds/{{guild}}/members/{{user}}", bot(self._get_member)),
            web.get("/attachments/{channel}/{id}/{filename}", self._serve_attachment),
            web.route("*", "/{tail:.*}", self._unknown),
        ]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        where = f"{request.method} {request.path}"
        try:
            response = await handler(request)
        except ApiError as error:
            self._log.refusals.append(f"{where} -> {error.status} {error.code} {error.message}")
            response = _json({"code": error.code, "message": error.message}, status=error.status)
        except web.HTTPException:
            raise
        except Exception as error:  # a bug in this server: make it loud but fast
            self._log.server_errors.append(f"{where} -> {error!r}\n{traceback.format_exc()}")
            response = _json({"code": 0, "message": f"test server bug: {error!r}"}, status=400)
        if not response.prepared:  # a websocket's headers are long gone
            response.headers.update(RATE_LIMIT_HEADERS)
        return response

    def _bot_only(self, handler: Handler) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            if request.headers.get("Authorization") != f"Bot {self._state.bot_token}":
                raise ApiError(401, 0, "401: Unauthorized")
            return await handler(request)

        return checked

    async def _unknown(self, request: web.Request) -> web.Response:
        self._log.server_errors.append(f"{request.method} {request.path}: no such route on the test server")
        return _json({"code": 0, "message": "404: Not Found"}, status=404)

    # ---- identity ---------------------------------------------------------------------------
    async def _gateway_url(self, request: web.Request) -> web.Response:
        limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
        return _json({"url": self._gateway.url, "shards": 1, "session_start_limit": limit})

    async def _me(self, request: web.Request) -> web.Response:
        return _json(payloads.user(self._state.bot) | {"verified": True, "mfa_enabled": False})

    async def _application(self, request: web.Request) -> web.Response:
        owner = next(iter(g.owner for g in self._state.guilds.values()), self._state.bot)
        return _json(
            {
                "id": str(self._state.application_id),
                "name": self._state.bot.name,
                "icon": None,
                "description": "",
                "summary": "",
                "rpc_origins": [],
                "bot_public": True,
                "bot_require_code_grant": False,
                "bot": payloads.user(self._state.bot),
                "owner": payloads.user(owner),
                "team": None,
                "verify_key": "0" * 64,
                "flags": 0,
                "interactions_endpoint_url": None,
                "tags": [],
            }
        )

    # ---- application commands ---------------------------------------------------------------
    def _scope(self, request: web.Request) -> int | None:
        if int(request.match_info["app"]) != self._state.application_id:
            raise ApiError(403, 50001, "Missing Access")
        guild = request.match_info.get("guild")
        if guild is not None and int(guild) not in self._state.guilds:
            raise ApiError(404, 10004, "Unknown Guild")
        return None if guild is None else int(guild)

    async def _get_commands(self, request: web.Request) -> web.Response:
        return _json(self._state.commands.get(self._scope(request), []))

    async def _put_commands(self, request: web.Request) -> web.Response:
        scope = self._scope(request)
        previous = self._state.commands.get(scope, [])
        self._state.commands[scope] = [self._command(scope, c, previous) for c in await request.json()]
        return _json(self._state.commands[scope])

    async def _post_command(self, request: web.Request) -> web.Response:
        scope = self._scope(request)
        previous = self._state.commands.get(scope, [])
        command = self._command(scope, await request.json(), previous)
        self._state.commands[scope] = [c for c in previous if c["id"] != command["id"]] + [command]
        return _json(command, status=201)

    def _command(self, scope: int | None, sent: dict[str, Any], previous: list[dict[str, Any]]) -> dict[str, Any]:
        """Discord's stored form of a command; re-syncing a name keeps its id, as Discord does."""
        kind = sent.get("type", 1)
        same = next((c for c in previous if c["name"] == sent["name"] and c["type"] == kind), None)
        command = {
            "description": "",
            "options": [],
            "default_member_permissions": None,
            "dm_permission": True,
            "nsfw": False,
            "contexts": None,
            "integration_types": [0],
            **sent,
            "type": kind,
            "id": same["id"] if same else str(self._state.ids.next()),
            "application_id": str(self._state.application_id),
            "version": str(self._state.ids.next()),
        }
        if scope is not None:
            command["guild_id"] = str(scope)
        return command

    # ---- interactions -------------------------------------------------------------------------
    async def _callback(self, request: web.Request) -> web.Response:
        interaction = self._state.live_interaction(request.match_info["token"])
        if interaction is None or str(interaction.id) != request.match_info["id"]:
            raise ApiError(404, 10062, "Unknown interaction")
        age = time.monotonic() - interaction.received_at
        if self._options.response_deadline is not None and age > self._options.response_deadline:
            raise ApiError(404, 10062, "Unknown interaction")
        if interaction.acknowledged and self._options.reject_double_ack:
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        body, uploads = await self._read_body(request)
        kind, data = body["type"], body.get("data") or {}
        self._check_callback_type(interaction, kind)
        # Build and validate first: a refused callback must leave no trace.
        created: Message | None = None
        updated: tuple[Message, Message] | None = None  # (the component's message, its edited form)
        if kind == 4:
            created = self._build_message(interaction.channel, data, uploads, interaction)
        elif kind == 5:
            flags = LOADING | (int(data.get("flags", 0)) & EPHEMERAL)
            created = self._build_message(interaction.channel, {"flags": flags}, {}, interaction)
        elif kind == 7:
            target = self._component_message(interaction)
            updated = target, self._edited(target, data, uploads)
        interaction.callback_types.append(kind)
        self._log.append(Action("callback", interaction=interaction, callback_type=kind))
        message = created or (updated[0] if updated else None)
        if created is not None:
            interaction.original = created
            await self._publish(created)
        elif updated is not None:
            await self._commit_edit(*updated, interaction)
        elif kind == 8:
            interaction.choices = data.get("choices", [])
        elif kind == 9:
            interaction.modal = data
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        info: dict[str, Any] = {"id": str(interaction.id), "type": interaction.type}
        resource: dict[str, Any] = {"type": kind}
        if message is not None:
            info |= {
                "response_message_id": str(message.id),
                "response_message_loading": message.loading,
                "response_message_ephemeral": message.ephemeral,
            }
            resource["message"] = payloads.message(message)
        return _json({"interaction": info, "resource": resource})

    @staticmethod
    def _check_callback_type(interaction: Interaction, kind: int) -> None:
        allowed = {2: {4, 5, 9}, 3: {4, 5, 6, 7, 9}, 4: {8}, 5: {4, 5, 6, 7}}[interaction.type]
        if "message" not in interaction.payload:  # nothing to update, e.g. a modal a command opened
            allowed -= {6, 7}
        if kind not in allowed:
            raise ApiError(400, 50035, f"Invalid Form Body: callback type {kind} is not valid for interaction type "
                                       f"{interaction.type}; allowed: {sorted(allowed)}")

    def _component_message(self, interaction: Interaction) -> Message:
        return self._state.messages[int(interaction.payload["message"]["id"])]

    def _webhook_interaction(self, request: web.Request) -> Interaction:
        interaction = self._state.live_interaction(request.match_info["token"])
        if interaction is None or int(request.match_info["app"]) != self._state.application_id:
            raise ApiError(401, 50027, "Invalid Webhook Token")
        return interaction

    def _original(self, interaction: Interaction) -> Message:
        """'@original': the response message, or the component's message once an update (6/7) was sent."""
        if interaction.original is not None:
            return interaction.original
        if "message" in interaction.payload and {6, 7} & set(interaction.callback_types):
            return self._component_message(interaction)
        raise ApiError(404, 10008, "Unknown Message")

    def _webhook_message(self, request: web.Request, interaction: Interaction) -> Message:
        target = request.match_info["message"]
        if target == "@original":
            message = self._original(interaction)
        else:
            owned = [m for m in [interaction.original, *interaction.followups] if m is not None]
            message = next((m for m in owned if str(m.id) == target), None)
            if message is None:
                raise ApiError(404, 10008, "Unknown Message")
        if message.deleted:
            raise ApiError(404, 10008, "Unknown Message")
        return message

    async def _followup(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        if not interaction.acknowledged:
            raise ApiError(404, 10015, "Unknown Webhook")
        body, uploads = await self._read_body(request)
        original = interaction.original
        if original is not None and original.loading and not original.deleted and not interaction.followups:
            # The first followup after a "thinking" defer replaces the thinking message (keeping its
            # visibility), as on Discord; once that message is deleted, followups are new messages.
            await self._commit_edit(original, self._edited(original, body, uploads), interaction)
            message = original
        else:
            message = self._build_message(interaction.channel, body, uploads, interaction)
            await self._publish(message)
        interaction.followups.append(message)
        if request.query.get("wait") in ("1", "true", "True"):
            return _json(payloads.message(message))
        return web.Response(status=204)

    async def _get_webhook_message(self, request: web.Request) -> web.Response:
        message = self._webhook_message(request, self._webhook_interaction(request))
        return _json(payloads.message(message))

    async def _edit_webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        message = self._webhook_message(request, interaction)
        body, uploads = await self._read_body(request)
        await self._commit_edit(message, self._edited(message, body, uploads), interaction)
        return _json(payloads.message(message))

    async def _delete_webhook_message(self, request: web.Request) -> web.Response:
        message = self._webhook_message(request, self._webhook_interaction(request))
        await self._delete(message)
        return web.Response(status=204)

    # ---- channels and messages ----------------------------------------------------------------
    def _channel(self, request: web.Request) -> Channel:
        channel = self._state.channels.get(int(request.match_info["channel"]))
        if channel is None:
            raise ApiError(404, 10003, "Unknown Channel")
        return channel

    def _message(self, request: web.Request, channel: Channel) -> Message:
        message = self._state.messages.get(int(request.match_info["message"]))
        if message is None or message.channel is not channel or message.deleted or message.ephemeral:
            raise ApiError(404, 10008, "Unknown Message")
        return message

    def _bot_permissions(self, channel: Channel) -> int:
        if channel.guild is None:
            return VIEW_CHANNEL | SEND_MESSAGES | ATTACH_FILES
        return self._state.member(channel.guild, self._state.bot).permissions(channel)

    async def _get_channel(self, request: web.Request) -> web.Response:
        return _json(payloads.channel(self._channel(request)))

    async def _list_messages(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        limit = min(int(request.query.get("limit", 50)), 100)
        before, after = request.query.get("before"), request.query.get("after")
        found = [m for m in self._state.channel_messages(channel) if not m.ephemeral]
        if before is not None:
            found = [m for m in found if m.id < int(before)]
        if after is not None:
            found = [m for m in found if m.id > int(after)]
        newest_first = sorted(found, key=lambda m: m.id, reverse=True)
        chosen = newest_first[-limit:] if after is not None else newest_first[:limit]
        return _json([self._as_seen(m) for m in chosen])

    async def _get_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        return _json(self._as_seen(self._message(request, channel)))

    def _as_seen(self, message: Message) -> dict[str, Any]:
        """A user's message as the bot may read it (see `payloads.message_for_bot`)."""
        return payloads.message_for_bot(message, self._state.bot, self._gateway.content_intent())

    async def _create_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        body, uploads = await self._read_body(request)
        needed = VIEW_CHANNEL | SEND_MESSAGES | (ATTACH_FILES if uploads else 0)
        if self._bot_permissions(channel) & needed != needed:
            raise ApiError(403, 50013, "Missing Permissions")
        message = self._build_message(channel, body, uploads, None)
        await self._publish(message)
        return _json(payloads.message(message))

    async def _edit_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        message = self._message(request, channel)
        if message.author is not self._state.bot:
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        body, uploads = await self._read_body(request)
        await self._commit_edit(message, self._edited(message, body, uploads), None)
        return _json(payloads.message(message))

    async def _delete_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        message = self._message(request, channel)
        if message.author is not self._state.bot:
            raise ApiError(403, 50013, "Missing Permissions")
        await self._delete(message)
        return web.Response(status=204)

    async def _typing(self, request: web.Request) -> web.Response:
        self._channel(request)
        return web.Response(status=204)

    async def _open_dm(self, request: web.Request) -> web.Response:
        user = self._state.users.get(int((await request.json())["recipient_id"]))
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return _json(payloads.channel(self._state.dm_channel(user)))

    async def _get_user(self, request: web.Request) -> web.Response:
        user = self._state.users.get(int(request.match_info["user"]))
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return _json(payloads.user(user))

    # ---- guilds -------------------------------------------------------------------------------
    def _guild(self, request: web.Request) -> Guild:
        guild = self._state.guilds.get(int(request.match_info["guild"]))
        if guild is None:
            raise ApiError(404, 10004, "Unknown Guild")
        return guild

    async def _get_guild(self, request: web.Request) -> web.Response:
        return _json(payloads.guild_create(self._guild(request)))

    async def _get_guild_channels(self, request: web.Request) -> web.Response:
        return _json([payloads.channel(c) for c in self._guild(request).channels])

    async def _get_roles(self, request: web.Request) -> web.Response:
        return _json([payloads.role(r) for r in self._guild(request).roles])

    async def _get_member(self, request: web.Request) -> web.Response:
        member = self._guild(request).members.get(int(request.match_info["user"]))
        if member is None:
            raise ApiError(404, 10007, "Unknown Member")
        return _json(payloads.member(member))

    # ---- attachments --------------------------------------------------------------------------
    async def _serve_attachment(self, request: web.Request) -> web.Response:
        stored = self._state.attachments.get(int(request.match_info["id"]))
        if stored is None or stored.filename != request.match_info["filename"]:
            raise ApiError(404, 0, "404: Not Found")
        return web.Response(body=stored.data, content_type=stored.content_type)

    def store_attachment(self, channel: Channel, upload: Upload, *, description: str | None = None,
                         ephemeral: bool = False) -> Attachment:
        """Keep an uploaded file and give it a URL on this server."""
        attachment_id = self._state.ids.next()
        url = f"{self.base_url}/attachments/{channel.id}/{attachment_id}/{upload.filename}"
        width, height = image_size(upload.data) or (None, None)
        stored = Attachment(attachment_id, upload.filename, upload.data, upload.content_type, url, description,
                            ephemeral, width, height)
        self._state.attachments[attachment_id] = stored
        return stored

    # ---- message bodies -----------------------------------------------------------------------
    async def _read_body(self, request: web.Request) -> tuple[dict[str, Any], dict[int, Upload]]:
        """JSON, or multipart with `payload_json` and `files[n]` parts, as discord.py sends them."""
        if not request.content_type.startswith("multipart/"):
            return (await request.json() if request.can_read_body else {}), {}
        body: dict[str, Any] = {}
        uploads: dict[int, Upload] = {}
        reader = await request.multipart()
        async for part in reader:
            name = part.name or ""
            if name == "payload_json":
                body = json.loads(await part.text())
            elif match := re.fullmatch(r"files\[(\d+)\]", name):
                filename = part.filename or f"file{match[1]}"
                content_type = part.headers.get("Content-Type", "application/octet-stream")
                if content_type == "application/octet-stream":  # discord.py always says this; Discord guesses
                    content_type = ""
                data = bytes(await part.read())
                if len(data) > self._options.upload_limit:
                    raise ApiError(413, 40005, f"Request entity too large: {filename} is {len(data)} bytes, "
                                               f"the limit is {self._options.upload_limit}")
                uploads[int(match[1])] = Upload(filename, data, content_type)
        return body, uploads

    def _attachments(self, channel: Channel, data: dict[str, Any], uploads: dict[int, Upload],
                     existing: list[Attachment], ephemeral: bool) -> list[Attachment]:
        """The message's files: `attachments` lists those kept (by id) and new ones (by upload index)."""
        if "attachments" not in data:
            listed = [{"id": a.id} for a in existing] + [{"id": index} for index in uploads]
        else:
            listed = data["attachments"]
        kept = {a.id: a for a in existing}
        result = []
        for item in listed:
            key = int(item["id"])
            if key in uploads:
                result.append(self.store_attachment(channel, uploads[key], description=item.get("description"),
                                                    ephemeral=ephemeral))
            elif key in kept:
                result.append(kept[key])
            else:
                raise ApiError(400, 50035, f"Invalid Form Body: attachment {key} is neither kept nor uploaded")
        return result

    def _build_message(self, channel: Channel, data: dict[str, Any], uploads: dict[int, Upload],
                       interaction: Interaction | None) -> Message:
        """A new bot message from a request body, validated as Discord would, not yet published."""
        flags = int(data.get("flags", 0))
        if interaction is None:
            flags &= ~EPHEMERAL  # only interaction responses can be ephemeral
        reference = None
        if "message_reference" in data:
            reference = self._state.messages.get(int(data["message_reference"]["message_id"]))
            if reference is None and data["message_reference"].get("fail_if_not_exists", True):
                raise ApiError(400, 50035, "Invalid Form Body: message_reference: Unknown message")
        message = Message(
            id=self._state.ids.next(),
            channel=channel,
            author=self._state.bot,
            content=data.get("content") or "",
            embeds=data.get("embeds") or [],
            components=data.get("components") or [],
            flags=flags,
            reference=reference,
            interaction=interaction,
            webhook_id=self._state.application_id if interaction is not None else None,
        )
        message.attachments = self._attachments(channel, data, uploads, [], message.ephemeral)
        if not message.loading:
            _validate(message)
        message.mentions = self.mentions(message.content)
        allowed = data.get("allowed_mentions")  # absent: Discord's defaults, which ping a reply's author
        pings_author = allowed is None or allowed.get("replied_user", False)
        if reference is not None and pings_author and reference.author not in message.mentions:
            message.mentions.append(reference.author)
        return message

    async def _publish(self, message: Message) -> None:
        self._state.messages[message.id] = message
        self._log.append(Action("message", message=message, interaction=message.interaction, content=message.content))
        await self._gateway.dispatch_message("MESSAGE_CREATE", message)

    def _edited(self, message: Message, data: dict[str, Any], uploads: dict[int, Upload]) -> Message:
        """`message` as a PATCH body would leave it (fields left out stay), validated, not yet applied."""
        edited = replace(
            message,
            content=data.get("content", message.content) or "",
            embeds=data.get("embeds", message.embeds) or [],
            components=data.get("components", message.components) or [],
            attachments=self._attachments(message.channel, data, uploads, message.attachments, message.ephemeral),
        )
        _validate(edited)
        return edited

    async def _commit_edit(self, message: Message, edited: Message, interaction: Interaction | None) -> None:
        message.content, message.embeds = edited.content, edited.embeds
        message.components, message.attachments = edited.components, edited.attachments
        message.mentions = self.mentions(message.content)
        message.flags &= ~LOADING
        message.edited_timestamp = snowflake_time(self._state.ids.next())
        self._log.append(Action("edit", message=message, interaction=interaction, content=message.content))
        await self._gateway.dispatch_message("MESSAGE_UPDATE", message)

    async def _delete(self, message: Message) -> None:
        message.deleted = True
        self._log.append(Action("delete", message=message, interaction=message.interaction, content=message.content))
        if not message.ephemeral:
            event = {"id": str(message.id), "channel_id": str(message.channel.id)}
            if message.channel.guild is not None:
                event["guild_id"] = str(message.channel.guild.id)
            await self._gateway.dispatch("MESSAGE_DELETE", event)

    def mentions(self, content: str) -> list[User]:
        """The known users `<@id>` mentions in `content` name, as Discord fills a message's `mentions`."""
        ids = dict.fromkeys(int(i) for i in re.findall(r"<@!?(\d+)>", content))
        return [self._state.users[i] for i in ids if i in self._state.users]


def _json(data: Any, status: int = 200) -> web.Response:
    """Exactly `application/json`, no charset: discord.py parses a body only with that exact header."""
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


def _validate(message: Message) -> None:
    """Discord's checks on a message that a bot can fail: empty, too long, malformed buttons."""
    if not (message.content or message.embeds or message.components or message.attachments):
        raise ApiError(400, 50006, "Cannot send an empty message")
    if len(message.content) > MAX_CONTENT:
        raise ApiError(400, 50035, f"Invalid Form Body: content must be {MAX_CONTENT} or fewer in length "
                                   f"(got {len(message.content)})")
    rows = message.components
    if len(rows) > MAX_ROWS:
        raise ApiError(400, 50035, f"Invalid Form Body: at most {MAX_ROWS} component rows (got {len(rows)})")
    seen: set[str] = set()
    for row in rows:
        children = row.get("components", []) if row.get("type") == 1 else []
        if len(children) > MAX_PER_ROW:
            raise ApiError(400, 50035, f"Invalid Form Body: at most {MAX_PER_ROW} buttons in a row "
                                       f"(got {len(children)})")
        for child in children:
            custom_id = child.get("custom_id")
            if custom_id is None:
                continue
            if len(custom_id) > MAX_CUSTOM_ID or custom_id in seen:
                raise ApiError(400, 50035, f"Invalid Form Body: custom_id {custom_id!r} must be unique and at most "
                                           f"{MAX_CUSTOM_ID} characters")
            seen.add(custom_id)
