"""What the fake Discord knows: the world the test builds and everything the bot stored in it.

Plain dataclasses, no I/O. The REST routes and the driver mutate these; `payloads.py` turns them
into the JSON shapes discord.py parses.
"""

from __future__ import annotations

import datetime
import io
import mimetypes
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

DISCORD_EPOCH_MS = 1_420_070_400_000

# Permission bits this server reasons about (Discord's values).
ADMINISTRATOR = 1 << 3
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
USE_APPLICATION_COMMANDS = 1 << 31
ALL_PERMISSIONS = (1 << 51) - 1
EVERYONE_DEFAULT = (
    VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | ATTACH_FILES | READ_MESSAGE_HISTORY | USE_APPLICATION_COMMANDS
)
SEND_DENIED = SEND_MESSAGES | ATTACH_FILES | EMBED_LINKS

EPHEMERAL = 1 << 6  # message flag
LOADING = 1 << 7  # message flag: a deferred ("thinking") interaction response


class Snowflakes:
    """Real-looking 64-bit ids: milliseconds since Discord's epoch in the top bits, strictly increasing."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        now = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last = max(now, self._last + 1)
        return self._last


def snowflake_time(snowflake: int) -> str:
    """ISO-8601 timestamp encoded in a snowflake, as Discord writes message timestamps."""
    ms = (snowflake >> 22) + DISCORD_EPOCH_MS
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat()


def new_token() -> str:
    return secrets.token_urlsafe(48)


@dataclass(eq=False)
class User:
    id: int
    name: str
    bot: bool = False

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"


@dataclass(eq=False)
class Role:
    id: int
    guild_id: int
    name: str
    permissions: int
    position: int

    @property
    def mention(self) -> str:
        return f"<@&{self.id}>"


@dataclass(eq=False)
class Guild:
    id: int
    name: str
    owner: User
    roles: list[Role] = field(default_factory=list)  # roles[0] is @everyone (its id is the guild's)
    channels: list[Channel] = field(default_factory=list)
    members: dict[int, Member] = field(default_factory=dict)

    @property
    def everyone(self) -> Role:
        return self.roles[0]


@dataclass(eq=False)
class Member:
    user: User
    guild: Guild
    roles: list[Role] = field(default_factory=list)
    nick: str | None = None
    joined_at: str = ""

    def permissions(self, channel: Channel | None = None) -> int:
        """Guild permissions from @everyone and roles (owner and Administrator get all), less the channel's denials."""
        if self.user is self.guild.owner:
            return ALL_PERMISSIONS
        value = self.guild.everyone.permissions
        for role in self.roles:
            value |= role.permissions
        if value & ADMINISTRATOR:
            return ALL_PERMISSIONS
        if channel is not None and self.user.id in channel.denied:
            value &= ~channel.denied[self.user.id]
        return value


@dataclass(eq=False)
class Channel:
    id: int
    name: str
    guild: Guild | None  # None for a DM
    nsfw: bool = False
    recipient: User | None = None  # the other end of a DM
    denied: dict[int, int] = field(default_factory=dict)  # member id -> permission bits denied here

    @property
    def type(self) -> int:
        return 0 if self.guild is not None else 1

    @property
    def mention(self) -> str:
        return f"<#{self.id}>"


@dataclass(frozen=True)
class Upload:
    """A file on its way in: a user's attachment (driver) or one of the bot's `files[n]` parts (REST).

    Without a content type, it is guessed from the filename, as Discord does.
    """

    filename: str
    data: bytes
    content_type: str = ""

    def __post_init__(self) -> None:
        if not self.content_type:
            guessed = mimetypes.guess_type(self.filename)[0] or "application/octet-stream"
            object.__setattr__(self, "content_type", guessed)


@dataclass(eq=False)
class Attachment:
    """A stored file, served back at `url` by this server (never Discord's CDN)."""

    id: int
    filename: str
    data: bytes
    content_type: str
    url: str
    description: str | None = None
    ephemeral: bool = False
    width: int | None = None  # images only, as Discord reports them
    height: int | None = None

    @property
    def size(self) -> int:
        return len(self.data)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) when the bytes are an image Pillow can read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError):
        return None


@dataclass(eq=False)
class Message:
    id: int
    channel: Channel
    author: User
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    flags: int = 0
    mentions: list[User] = field(default_factory=list)
    reference: Message | None = None
    interaction: Interaction | None = None  # the interaction this message answers (original or followup)
    webhook_id: int | None = None
    edited_timestamp: str | None = None
    deleted: bool = False

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & LOADING)

    def buttons(self) -> list[dict[str, Any]]:
        """Every button on the message, in reading order, whatever layout components hold it."""
        found: list[dict[str, Any]] = []

        def walk(component: dict[str, Any]) -> None:
            if component.get("type") == 2:
                found.append(component)
            for child in component.get("components", []):
                walk(child)
            if "accessory" in component:
                walk(component["accessory"])

        for component in self.components:
            walk(component)
        return found

    def custom_ids(self) -> list[str]:
        return [button["custom_id"] for button in self.buttons() if "custom_id" in button]


@dataclass(eq=False)
class Interaction:
    """One gesture sent to the bot and everything the bot answered to it."""

    id: int
    token: str
    type: int
    user: User
    channel: Channel
    payload: dict[str, Any]
    callback_types: list[int] = field(default_factory=list)
    original: Message | None = None
    followups: list[Message] = field(default_factory=list)
    modal: dict[str, Any] | None = None  # the modal the bot opened in answer (callback type 9)
    choices: list[dict[str, Any]] | None = None  # autocomplete answer (callback type 8)
    received_at: float = field(default_factory=time.monotonic)

    @property
    def acknowledged(self) -> bool:
        return bool(self.callback_types)


@dataclass
class State:
    """Everything the server holds. One per server; nothing global."""

    ids: Snowflakes
    bot: User
    application_id: int
    bot_token: str
    guilds: dict[int, Guild] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    users: dict[int, User] = field(default_factory=dict)
    messages: dict[int, Message] = field(default_factory=dict)
    attachments: dict[int, Attachment] = field(default_factory=dict)
    interactions: dict[str, Interaction] = field(default_factory=dict)  # by token
    expired_tokens: set[str] = field(default_factory=set)
    commands: dict[int | None, list[dict[str, Any]]] = field(default_factory=dict)  # guild id (None: global)

    def member(self, guild: Guild, user: User) -> Member:
        try:
            return guild.members[user.id]
        except KeyError:
            raise LookupError(f"{user.name} is not a member of {guild.name}: add them with add_member first") from None

    def dm_channel(self, user: User) -> Channel:
        """The DM channel between `user` and the bot, opened on first use."""
        channel = next((c for c in self.channels.values() if c.recipient is user), None)
        if channel is None:
            channel = Channel(self.ids.next(), user.name, None, recipient=user)
            self.channels[channel.id] = channel
        return channel

    def channel_messages(self, channel: Channel) -> list[Message]:
        return [m for m in self.messages.values() if m.channel is channel and not m.deleted]

    def live_interaction(self, token: str) -> Interaction | None:
        """The interaction a webhook token belongs to, or None when unknown or expired."""
        if token in self.expired_tokens:
            return None
        return self.interactions.get(token)

    def find_command(self, guild: Guild | None, name: str, command_type: int) -> dict[str, Any]:
        """The synced command a user would pick: the guild's own first, then global ones usable there.

        Discord also hides commands from members lacking `default_member_permissions`; this does not,
        as if an admin had granted them, so that the bot's own permission checks are what tests see.
        """
        if guild is None:
            candidates = [c for c in self.commands.get(None, []) if _usable_in_dm(c)]
        else:
            candidates = self.commands.get(guild.id, []) + self.commands.get(None, [])
        for command in candidates:
            if command["name"] == name and command["type"] == command_type:
                return command
        known = sorted(c["name"] for c in candidates if c["type"] == command_type)
        where = "in DMs" if guild is None else f"in {guild.name}"
        raise LookupError(f"the bot has synced no command {name!r} of type {command_type} usable {where}; "
                          f"there are {known}")


def _usable_in_dm(command: dict[str, Any]) -> bool:
    contexts = command.get("contexts")
    return command.get("dm_permission") is not False and (contexts is None or 1 in contexts)
