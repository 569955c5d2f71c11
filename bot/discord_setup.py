"""What the bot needs from Discord, in one place: intents, permissions, the invite URL and the guide
printed when no token is set (a first run should teach, not crash)."""

from __future__ import annotations

import discord

from bot.config import TOKEN_ENV, DiscordSettings

#: Channel permissions the bot uses: read the channel, post results with files and buttons,
#: reply in threads, and read the message a user replied to.
PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    embed_links=True,
    attach_files=True,
    read_message_history=True,
)
SCOPES = ("bot", "applications.commands")


def intents(settings: DiscordSettings) -> discord.Intents:
    """The minimum: guilds and their messages (a message that mentions the bot carries its content
    without the privileged message-content intent), plus direct messages when allowed, and the
    message-content intent when the operator enabled it (to see other members' images)."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_messages = True
    wanted.dm_messages = settings.allow_dms
    wanted.message_content = settings.message_content
    return wanted


def _content_step(settings: DiscordSettings) -> str:
    """The setup guide's word on the message-content intent, as `[discord] message_content` is set."""
    dms = " and Direct Messages" if settings.allow_dms else ""
    if settings.message_content:
        return f"""enable "Message Content Intent" (Bot > Privileged Gateway Intents):
     [discord] message_content = true asks for it, besides Guilds and Guild Messages{dms}."""
    return f"""none are needed. Atelier uses only the Guilds and Guild Messages intents{dms};
     a message that mentions the bot carries its text without the Message Content intent. Replies
     then work on the bot's own images (Remix works on any); to reply to other members' images,
     enable that intent here and set [discord] message_content = true."""


def invite_url(application_id: int) -> str:
    """The OAuth2 URL that adds the bot to a server with exactly the permissions it needs."""
    return discord.utils.oauth_url(application_id, permissions=PERMISSIONS, scopes=SCOPES)


def setup_guide(settings: DiscordSettings) -> str:
    """Step-by-step instructions for creating the Discord application and running the bot."""
    if settings.application_id is not None:
        invite = f"Invite the bot to your server with:\n     {invite_url(settings.application_id)}"
    else:
        invite = (
            "Copy the Application ID (General Information) into config.toml as\n"
            "     [discord] application_id = ...  and `atelier run` prints the invite URL."
        )
    return f"""\
{TOKEN_ENV} is not set, so Atelier cannot log in to Discord. To create the bot:

  1. Open https://discord.com/developers/applications and press "New Application".
  2. In "Bot", press "Reset Token", copy the token and export it (never put it in config.toml):
         export {TOKEN_ENV}='paste-the-token-here'
  3. Privileged gateway intents: {_content_step(settings)}
  4. The bot needs the scopes {" and ".join(SCOPES)} and these channel permissions:
     View Channels, Send Messages, Send Messages in Threads, Embed Links, Attach Files,
     Read Message History (permissions integer {PERMISSIONS.value}).
  5. {invite}
  6. Run `atelier run` again (or `make run`). Set [discord] guild_id to see the commands at once
     in one server; global commands can take up to an hour to appear.
"""
