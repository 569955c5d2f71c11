"""`DiscordServer`: the loopback server's lifetime and the test-facing API (world building, gestures, inspection)."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from . import payloads
from .gateway import GUILD_MEMBERS, GUILDS, Gateway
from .log import Action, ActionLog
from .rest import Options, RestApi
from .state import (
    EVERYONE_DEFAULT,
    SEND_DENIED,
    Attachment,
    Channel,
    Guild,
    Interaction,
    Member,
    Message,
    Role,
    Snowflakes,
    State,
    Upload,
    User,
    new_token,
    snowflake_time,
)

APPLICATION_COMMAND, MESSAGE_COMPONENT, AUTOCOMPLETE, MODAL_SUBMIT = 2, 3, 4, 5
CHAT_INPUT, USER_COMMAND, MESSAGE_COMMAND = 1, 2, 3
SUB_COMMAND, SUB_COMMAND_GROUP = 1, 2
STRING, INTEGER, BOOLEAN, USER, CHANNEL, ROLE, MENTIONABLE, NUMBER, ATTACHMENT = 3, 4, 5, 6, 7, 8, 9, 10, 11
BUTTON = 2
SELECTS = {3, 5, 6, 7, 8}
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024  # Discord's limit for servers without boosts


class DiscordServer:
    """A Discord-compatible API on 127.0.0.1: `async with DiscordServer() as server:`.

    reject_double_ack: a second callback to one interaction fails with 40060, as on Discord (off by
        default so tests can observe what a double response would have sent).
    response_deadline: seconds after which a callback fails with 10062 Unknown interaction (Discord's
        3-second rule; None, the default, never expires: test machines are slow).
    upload_limit: bytes per file; larger uploads fail with 413/40005.

    Close the bot before leaving the context: a bot still connected sees the gateway go away (1001)
    and keeps trying to reconnect.
    """

    def __init__(
        self,
        *,
        bot_name: str = "Atelier",
        upload_limit: int = DEFAULT_UPLOAD_LIMIT,
        reject_double_ack: bool = False,
        response_deadline: float | None = None,
    ) -> None:
        ids = Snowflakes()
        bot = User(ids.next(), bot_name, bot=True)
        token = f"{base64.b64encode(str(bot.id).encode()).decode().rstrip('=')}.{secrets.token_urlsafe(5)}." \
                f"{secrets.token_urlsafe(27)}"
        self._state = State(ids=ids, bot=bot, application_id=bot.id, bot_token=token)
        self._state.users[bot.id] = bot
        self.log = ActionLog()
        self._gateway = Gateway(self._state, self.log)
        options = Options(upload_limit, reject_double_ack, response_deadline)
        self._rest = RestApi(self._state, self._gateway, self.log, options)
        self._upload_limit = upload_limit
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ---- lifetime -----------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        body_limit = 10 * self._upload_limit + 2**20  # ten files and the JSON around them
        app = web.Application(middlewares=[self._rest.middleware], client_max_size=body_limit)
        app.router.add_get("/gateway", self._gateway.handle)
        app.router.add_routes(self._rest.routes())
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._rest.base_url = self.url
        self._gateway.url = self.gateway_url
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._gateway.drop(1001, b"server shutting down")
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def gateway_url(self) -> str:
        return f"{self.url.replace('http', 'ws', 1)}/gateway"

    @property
    def token(self) -> str:
        """The bot token this server accepts (REST `Authorization: Bot ...` and gateway IDENTIFY)."""
        return self._state.bot_token

    @property
    def bot(self) -> User:
        return self._state.bot

    @property
    def application_id(self) -> int:
        return self._state.application_id

    @property
    def bot_connected(self) -> bool:
        """Whether a bot session has identified and is still open."""
        return self._gateway.connected()

    async def disconnect_bot(self, code: int = 4000) -> None:
        """Drop the gateway connection as Discord does now and then (4000: unknown error, resumable).

        discord.py then tries to RESUME; this server refuses with INVALID_SESSION, so it identifies
        afresh and gets READY and its guilds again. `wait_for_bot()` waits for that.
        """
        await self._gateway.drop(code, b"dropped by the test")

    async def wait_for_bot(self, timeout: float = 10.0) -> None:
        """Until a bot has identified on the gateway and received its guilds."""
        await self._gateway.wait_for_bot(timeout)

    # ---- world building -----------------------------------------------------------------------
    def create_user(self, name: str) -> User:
        user = User(self._state.ids.next(), name)
        self._state.users[user.id] = user
        return user

    async def create_guild(self, name: str, *, owner: User | None = None) -> Guild:
        """A guild the bot is a member of (its @everyone may view, send, attach, embed and use commands)."""
        owner = owner or self.create_user(f"{name}-owner")
        guild = Guild(self._state.ids.next(), name, owner)
        guild.roles.append(Role(guild.id, guild.id, "@everyone", EVERYONE_DEFAULT, 0))
        self._state.guilds[guild.id] = guild
        for user in (owner, self.bot):
            guild.members[user.id] = Member(user, guild, joined_at=snowflake_time(self._state.ids.next()))
        await self._gateway.dispatch("GUILD_CREATE", payloads.guild_create(guild), intent=GUILDS)
        return guild

    async def create_channel(self, guild: Guild, name: str, *, nsfw: bool = False) -> Channel:
        channel = Channel(self._state.ids.next(), name, guild, nsfw=nsfw)
        guild.channels.append(channel)
        self._state.channels[channel.id] = channel
        await self._gateway.dispatch("CHANNEL_CREATE", payloads.channel(channel), intent=GUILDS)
        return channel

    async def create_role(self, guild: Guild, name: str, *, permissions: int = 0) -> Role:
        """`permissions` is Discord's bit field, e.g. `discord.Permissions(manage_guild=True).value`."""
        role = Role(self._state.ids.next(), guild.id, name, permissions, len(guild.roles))
        guild.roles.append(role)
        event = {"guild_id": str(guild.id), "role": payloads.role(role)}
        await self._gateway.dispatch("GUILD_ROLE_CREATE", event, intent=GUILDS)
        return role

    async def add_member(self, guild: Guild, user: User, *, roles: Iterable[Role] = (),
                         nick: str | None = None) -> Member:
        member = Member(user, guild, list(roles), nick, snowflake_time(self._state.ids.next()))
        guild.members[user.id] = member
        event = payloads.member(member) | {"guild_id": str(guild.id)}
        await self._gateway.dispatch("GUILD_MEMBER_ADD", event, intent=GUILD_MEMBERS)
        return member

    async def refuse_bot_messages(self, channel: Channel) -> None:
        """Deny the bot Send Messages (and files, embeds) here: its posts then fail with 403/50013."""
        assert channel.guild is not None, "DMs have no permission overwrites"
        channel.denied[self.bot.id] = SEND_DENIED
        await self._gateway.dispatch("CHANNEL_UPDATE", payloads.channel(channel), intent=GUILDS)

    def dm_channel(self, user: User) -> Channel:
        """The DM channel between `user` and the bot (opened on first use, by either side)."""
        return self._state.dm_channel(user)

    # ---- gestures -----------------------------------------------------------------------------
    async def slash(self, user: User, channel: Channel, command: str,
                    options: Mapping[str, Any] | None = None) -> Interaction:
        """`/command` as a user sends it. `command` may name a subcommand path ("limits set").

        Option values: str/int/float/bool, `User`, `Role`, `Channel`, or an `Upload` for attachment
        options; their types come from the command the bot synced. Like Discord's client, this refuses
        unknown options, missing required ones, values outside choices or min/max, with a ValueError.
        """
        name, *path = command.split()
        synced = self._state.find_command(channel.guild, name, CHAT_INPUT)
        resolved: dict[str, dict[str, Any]] = {}
        data = {"id": synced["id"], "name": name, "type": CHAT_INPUT,
                "options": self._options(synced, path, dict(options or {}), channel, resolved, focused=None)}
        return await self._interact(user, channel, APPLICATION_COMMAND, self._with_scope(data, synced, resolved))

    async def autocomplete(self, user: User, channel: Channel, command: str, options: Mapping[str, Any], focused: str,
                           *, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Type into option `focused` (its value is the partial text) and return the choices the bot offered."""
        name, *path = command.split()
        synced = self._state.find_command(channel.guild, name, CHAT_INPUT)
        resolved: dict[str, dict[str, Any]] = {}
        data = {"id": synced["id"], "name": name, "type": CHAT_INPUT,
                "options": self._options(synced, path, dict(options), channel, resolved, focused=focused)}
        interaction = await self._interact(user, channel, AUTOCOMPLETE, self._with_scope(data, synced, resolved))
        await self.wait_for(lambda a: a.interaction is interaction and a.callback_type == 8, timeout)
        assert interaction.choices is not None
        return interaction.choices

    async def press_button(self, user: User, message: Message, custom_id: str) -> Interaction:
        """Click the button `custom_id` on `message` (it must be there and enabled, as in Discord's client)."""
        if message.deleted:
            raise ValueError(f"message {message.id} was deleted; its buttons cannot be pressed")
        button = next((b for b in message.buttons() if b.get("custom_id") == custom_id), None)
        if button is None:
            raise ValueError(f"message {message.id} has no button {custom_id!r}; it has {message.custom_ids()}")
        if button.get("disabled"):
            raise ValueError(f"button {custom_id!r} on message {message.id} is disabled")
        data = {"custom_id": custom_id, "component_type": BUTTON}
        return await self._interact(user, message.channel, MESSAGE_COMPONENT, data, message=message)

    async def context_menu(self, user: User, target: Message | User, name: str, *,
                           channel: Channel | None = None) -> Interaction:
        """Apps > `name` on a message (message command), or on a user (user command; give the `channel`)."""
        resolved: dict[str, dict[str, Any]] = {}
        if isinstance(target, Message):
            channel, kind = target.channel, MESSAGE_COMMAND
            resolved["messages"] = {str(target.id): payloads.message(target)}
        elif channel is None:
            raise ValueError("a user context menu needs channel=, the channel it was opened in")
        else:
            kind = USER_COMMAND
            _resolve_user(target, channel, resolved)
        synced = self._state.find_command(channel.guild, name, kind)
        data = {"id": synced["id"], "name": name, "type": kind, "target_id": str(target.id)}
        return await self._interact(user, channel, APPLICATION_COMMAND, self._with_scope(data, synced, resolved))

    async def submit_modal(self, user: User, source: Interaction | str, values: Mapping[str, str | list[str]], *,
                           channel: Channel | None = None) -> Interaction:
        """Fill in and submit a modal.

        `source` is the interaction the bot answered with a modal (its inputs are checked against
        `values`: unknown ids and missing required inputs raise ValueError), or a modal custom id for
        a modal the bot opened in an earlier process (then `channel` is needed).
        """
        if isinstance(source, str):
            if channel is None:
                raise ValueError("submitting a modal by custom id needs channel=")
            rows = [{"type": 1, "components": [{"type": 4, "custom_id": key, "value": value}]}
                    for key, value in values.items()]
            data = {"custom_id": source, "components": rows}
            return await self._interact(user, channel, MODAL_SUBMIT, data)
        if source.modal is None:
            raise ValueError(f"the bot answered interaction {source.id} with callback types {source.callback_types}, "
                             "not a modal (9)")
        modal = source.modal
        inputs = _modal_inputs(modal["components"])
        unknown = set(values) - set(inputs)
        missing = [key for key, required in inputs.items() if required and key not in values]
        if unknown or missing:
            raise ValueError(f"modal {modal['custom_id']!r} has inputs {list(inputs)}; unknown {sorted(unknown)}, "
                             f"required but missing {missing}")
        data = {"custom_id": modal["custom_id"], "components": [_submitted(c, values) for c in modal["components"]]}
        message = None
        if "message" in source.payload:  # a modal opened from a button carries that button's message
            message = self._state.messages.get(int(source.payload["message"]["id"]))
        return await self._interact(user, source.channel, MODAL_SUBMIT, data, message=message)

    async def post_message(self, user: User, channel: Channel, content: str, *, attachments: Iterable[Upload] = (),
                           reference: Message | None = None, mentions: Iterable[User] = ()) -> Message:
        """A user's message, sent to a connected bot as MESSAGE_CREATE (kept in history either way).

        Mention the bot in `content` (`server.bot.mention`) as a user types it; `mentions` adds pings
        without text (like a reply's ping). Without the message-content intent the bot sees the
        content and attachments only when it is mentioned (see `payloads.message_for_bot`).
        """
        message = Message(self._state.ids.next(), channel, user, content, reference=reference)
        message.attachments = [self._upload(channel, upload) for upload in attachments]
        message.mentions = list(dict.fromkeys([*self._rest.mentions(content), *mentions]))
        self._state.messages[message.id] = message
        await self._gateway.dispatch_message("MESSAGE_CREATE", message)
        return message

    # ---- tokens -------------------------------------------------------------------------------
    def expire_token(self, interaction: Interaction | str) -> None:
        """Make an interaction's token invalid (webhooks answer 401/50027), as after Discord's 15 minutes."""
        self._state.expired_tokens.add(interaction if isinstance(interaction, str) else interaction.token)

    def expire_all_tokens(self) -> None:
        self._state.expired_tokens.update(self._state.interactions)

    # ---- inspection ---------------------------------------------------------------------------
    @property
    def actions(self) -> list[Action]:
        return self.log.actions

    async def wait_for(self, predicate: Callable[[Action], bool], timeout: float = 5.0, *, since: int = 0) -> Action:
        """The first bot action (from index `since`) matching `predicate`; fails listing what the bot did."""
        return await self.log.wait_for(predicate, timeout=timeout, since=since)

    def messages(self, channel: Channel) -> list[Message]:
        """Every message in the channel, oldest first, users' and the bot's, ephemeral ones included."""
        return self._state.channel_messages(channel)

    def responses(self, interaction: Interaction) -> list[Action]:
        """What the bot did in answer to `interaction`: callbacks, original response, followups, their edits."""
        return [a for a in self.log.actions if a.interaction is interaction]

    def commands(self, guild: Guild | None = None) -> list[dict[str, Any]]:
        """The application commands the bot synced, globally (None) or to `guild`, as Discord stored them."""
        return self._state.commands.get(None if guild is None else guild.id, [])

    # ---- internals ----------------------------------------------------------------------------
    def _upload(self, channel: Channel, upload: Upload, *, ephemeral: bool = False) -> Attachment:
        """A user's file, stored with a URL on this server (Discord's client refuses files over the limit)."""
        if len(upload.data) > self._upload_limit:
            raise ValueError(f"{upload.filename} is {len(upload.data)} bytes; the upload limit is {self._upload_limit}")
        return self._rest.store_attachment(channel, upload, ephemeral=ephemeral)

    def _with_scope(self, data: dict[str, Any], synced: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
        if "guild_id" in synced:
            data["guild_id"] = synced["guild_id"]
        if resolved:
            data["resolved"] = resolved
        return data

    def _options(self, schema: dict[str, Any], path: list[str], values: dict[str, Any], channel: Channel,
                 resolved: dict[str, dict[str, Any]], focused: str | None) -> list[dict[str, Any]]:
        """Typed interaction options for `values`, descending into subcommand groups along `path`."""
        declared = schema.get("options", [])
        if path:
            nested = (SUB_COMMAND, SUB_COMMAND_GROUP)
            step = next((o for o in declared if o["name"] == path[0] and o["type"] in nested), None)
            if step is None:
                subs = [o["name"] for o in declared if o["type"] in (SUB_COMMAND, SUB_COMMAND_GROUP)]
                raise ValueError(f"/{schema['name']} has no subcommand {path[0]!r}; it has {subs}")
            return [{"name": step["name"], "type": step["type"],
                     "options": self._options(step, path[1:], values, channel, resolved, focused)}]
        if any(o["type"] in (SUB_COMMAND, SUB_COMMAND_GROUP) for o in declared):
            raise ValueError(f"/{schema['name']} needs a subcommand: {[o['name'] for o in declared]}")
        by_name = {o["name"]: o for o in declared}
        unknown = set(values) - set(by_name)
        # While typing (autocomplete) Discord sends whatever is filled in so far.
        missing = [o["name"] for o in declared if o.get("required") and o["name"] not in values and focused is None]
        if unknown or missing:
            raise ValueError(f"/{schema['name']} takes options {list(by_name)}; unknown {sorted(unknown)}, "
                             f"required but missing {missing}")
        sent = []
        for key, value in values.items():
            option = by_name[key]
            if key == focused:
                sent.append({"name": key, "type": option["type"], "value": str(value), "focused": True})
            else:
                typed = self._option_value(option, value, channel, resolved)
                sent.append({"name": key, "type": option["type"], "value": typed})
        return sent

    def _option_value(self, option: dict[str, Any], value: Any, channel: Channel,
                      resolved: dict[str, dict[str, Any]]) -> Any:
        kind, name = option["type"], option["name"]
        expected = {STRING: str, INTEGER: int, NUMBER: (int, float), BOOLEAN: bool, USER: User, ROLE: Role,
                    CHANNEL: Channel, MENTIONABLE: (User, Role), ATTACHMENT: Upload}[kind]
        if not isinstance(value, expected) or (kind == INTEGER and isinstance(value, bool)):
            raise ValueError(f"option {name!r} has type {kind}: give a {expected}, not {value!r}")
        choices = [c["value"] for c in option.get("choices") or []]
        if choices and value not in choices:
            raise ValueError(f"option {name!r} must be one of {choices}, not {value!r}")
        low, high = option.get("min_value"), option.get("max_value")
        if kind in (INTEGER, NUMBER) and ((low is not None and value < low) or (high is not None and value > high)):
            raise ValueError(f"option {name!r} must be within [{low}, {high}], not {value}")
        low, high = option.get("min_length"), option.get("max_length")
        if kind == STRING and ((low is not None and len(value) < low) or (high is not None and len(value) > high)):
            raise ValueError(f"option {name!r} must be {low}..{high} characters long, not {len(value)}")
        if isinstance(value, User):
            _resolve_user(value, channel, resolved)
            return str(value.id)
        if isinstance(value, Role):
            resolved.setdefault("roles", {})[str(value.id)] = payloads.role(value)
            return str(value.id)
        if isinstance(value, Channel):
            resolved.setdefault("channels", {})[str(value.id)] = payloads.channel(value) | {"permissions": "0"}
            return str(value.id)
        if isinstance(value, Upload):
            stored = self._upload(channel, value, ephemeral=True)
            resolved.setdefault("attachments", {})[str(stored.id)] = payloads.attachment(stored)
            return str(stored.id)
        return value

    async def _interact(self, user: User, channel: Channel, kind: int, data: dict[str, Any], *,
                        message: Message | None = None) -> Interaction:
        """Build a realistic INTERACTION_CREATE, remember its token, and send it to the bot."""
        await self.wait_for_bot()
        interaction_id, token, guild = self._state.ids.next(), new_token(), channel.guild
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "token": token,
            "version": 1,
            "channel_id": str(channel.id),
            "channel": payloads.channel(channel),
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": self._upload_limit,
        }
        if guild is not None:
            member = self._state.member(guild, user)
            bot_member = self._state.member(guild, self.bot)
            payload |= {
                "guild_id": str(guild.id),
                "guild": {"id": str(guild.id), "locale": "en-US", "features": []},
                "guild_locale": "en-US",
                "member": payloads.member(member, channel=channel),
                "app_permissions": str(bot_member.permissions(channel)),
                "authorizing_integration_owners": payloads.integration_owners(channel),
                "context": 0,
            }
            payload["channel"]["permissions"] = payload["member"]["permissions"]
        else:
            payload |= {"user": payloads.user(user), "app_permissions": str(EVERYONE_DEFAULT),
                        "authorizing_integration_owners": payloads.integration_owners(channel), "context": 1}
        if message is not None:
            payload["message"] = payloads.message(message)
        interaction = Interaction(interaction_id, token, kind, user, channel, payload)
        self._state.interactions[interaction.token] = interaction
        await self._gateway.dispatch("INTERACTION_CREATE", payload)
        return interaction


def _resolve_user(user: User, channel: Channel, resolved: dict[str, dict[str, Any]]) -> None:
    resolved.setdefault("users", {})[str(user.id)] = payloads.user(user)
    if channel.guild is not None and user.id in channel.guild.members:
        member = channel.guild.members[user.id]
        resolved.setdefault("members", {})[str(user.id)] = payloads.member(member, channel=channel, with_user=False)


def _modal_inputs(components: list[dict[str, Any]]) -> dict[str, bool]:
    """custom id -> required, for every input in a modal (inside action rows or labels)."""
    found: dict[str, bool] = {}
    for component in components:
        children = component.get("components", []) + ([component["component"]] if "component" in component else [])
        if component.get("type") == 4 or component.get("type") in SELECTS:
            found[component["custom_id"]] = component.get("required", True)
        found |= _modal_inputs(children)
    return found


def _submitted(component: dict[str, Any], values: Mapping[str, str | list[str]]) -> dict[str, Any]:
    """The modal-submit form of one modal component, mirroring its layout as Discord does."""
    kind = component["type"]
    if kind == 1:
        return {"type": 1, "components": [_submitted(c, values) for c in component["components"]]}
    if kind == 18:
        return {"type": 18, "id": component.get("id", 0), "component": _submitted(component["component"], values)}
    if kind == 4:
        return {"type": 4, "custom_id": component["custom_id"], "value": values.get(component["custom_id"], "")}
    if kind in SELECTS:
        chosen = list(values.get(component["custom_id"], []))
        return {"type": kind, "custom_id": component["custom_id"], "values": chosen}
    return {key: value for key, value in component.items() if key in ("type", "id", "content")}
