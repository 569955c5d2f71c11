"""A loopback Discord-compatible API server for end-to-end tests of the real discord.py client.

REST under `{server.url}/api/v10` and the gateway websocket at `server.gateway_url`, both on
127.0.0.1 with an ephemeral port. It stores every message, file and component the bot sends, and
lets a test act as Discord's users: slash commands, buttons, context menus, modals and messages
arrive at the bot as gateway events shaped like Discord's.

    async with DiscordServer() as server:
        guild = await server.create_guild("studio")
        channel = await server.create_channel(guild, "art")
        alice = server.create_user("alice")
        await server.add_member(guild, alice)
        with point_discord_py_at(server):          # or set the bot's api_base/gateway_url config
            await bot.login(server.token); task = asyncio.create_task(bot.connect())
            await server.wait_for_bot()
            interaction = await server.slash(alice, channel, "imagine", {"prompt": "a cat"})
            action = await server.wait_for(lambda a: a.interaction is interaction and a.kind == "message")

Driver API (`DiscordServer`; all gestures are async and return what they created)
- lifetime: `async with DiscordServer(bot_name=, upload_limit=, reject_double_ack=, response_deadline=)`;
  `url`, `gateway_url`, `token`, `bot` (User), `application_id`; `await wait_for_bot(timeout)`,
  `bot_connected`; `await disconnect_bot(code=4000)` (RESUME is refused, the bot identifies again;
  discord.py waits 5 s before re-identifying).
- world: `create_user(name) -> User`; `await create_guild(name, owner=) -> Guild` (the bot is a member);
  `await create_channel(guild, name, nsfw=) -> Channel`; `await create_role(guild, name, permissions=int)
  -> Role`; `await add_member(guild, user, roles=, nick=) -> Member`; `await refuse_bot_messages(channel)`
  (bot posts there get 403/50013); `dm_channel(user) -> Channel` (global commands work there).
  Each change reaches a connected bot as its gateway event.
- gestures: `slash(user, channel, "limits set", options) -> Interaction` (option types, choices and
  ranges checked against the command the bot synced, as Discord's client does; `Upload(filename, data)`
  for attachment options; `default_member_permissions` is not enforced, so the bot's own checks are);
  `autocomplete(user, channel, command, options, focused) -> choices`; `press_button(user, message,
  custom_id)`; `context_menu(user, message_or_user, name, channel=)`; `submit_modal(user,
  interaction_or_custom_id, values, channel=)`; `post_message(user, channel, content, attachments=,
  reference=, mentions=) -> Message`. As on Discord, a bot without the message-content intent gets
  other members' messages with content, embeds, attachments and components empty (in gateway events,
  as a reply's `referenced_message`, and from REST GET message(s)) unless they mention the bot or are
  in a DM; the message a context menu targets stays whole.
- tokens: `expire_token(interaction_or_token)`, `expire_all_tokens()`: webhooks then answer 401/50027
  and callbacks 404/10062.
- inspection: `actions` (the ordered `Action` log: kind "callback" | "message" | "edit" | "delete",
  with `message`, `interaction`, `callback_type`, `content` at that moment and `at`, a monotonic
  time); `await wait_for(predicate, timeout, since=)` fails listing everything the bot did and every
  refused request; `messages(channel)`; `responses(interaction)`; `commands(guild=None)`;
  `log.refusals` / `log.server_errors` (a route this server lacks: fail the test).
- stored objects: `Message` (`content`, `components`, `buttons()`, `custom_ids()`, `attachments`
  of `Attachment` with `data` bytes, `filename`, `content_type`, `url`; `ephemeral`, `reference`,
  `interaction`), `Interaction` (`original`, `followups`, `modal`, `choices`, `callback_types`, `token`).
"""

from .discord_py import point_discord_py_at
from .driver import DiscordServer
from .log import Action
from .state import Attachment, Channel, Guild, Interaction, Member, Message, Role, Upload, User

__all__ = [
    "Action",
    "Attachment",
    "Channel",
    "DiscordServer",
    "Guild",
    "Interaction",
    "Member",
    "Message",
    "Role",
    "Upload",
    "User",
    "point_discord_py_at",
]
