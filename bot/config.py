"""Reads `config.toml` and assembles each package's settings into one frozen `AppConfig`.

Every mistake in the file is refused at start-up with a line naming the file, the key and what is
allowed: a bot that starts with a misspelt limit silently ignored is worse than one that refuses to.
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from generation.settings import GenerationSettings, ModelSettings, QueueSettings, check_models, check_upscaler
from storage.settings import LimitsSettings, StorageSettings

#: Environment variables the bot reads; secrets never live in the file.
TOKEN_ENV = "DISCORD_TOKEN"
CONFIG_ENV = "ATELIER_CONFIG"
DEFAULT_CONFIG = Path("config.toml")


class ConfigError(Exception):
    """The configuration file is missing or invalid; the message is meant for the operator."""


class DiscordSettings(BaseModel):
    """How the bot reaches Discord (or any Discord-compatible API server) and who moderates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: REST base URL, e.g. "https://discord.com/api/v10"; unset means Discord itself.
    api_base: str | None = Field(default=None, pattern=r"^https?://\S+$")
    #: Gateway websocket URL; unset means "ask the REST server" (GET /gateway/bot).
    gateway_url: str | None = Field(default=None, pattern=r"^wss?://\S+$")
    #: Sync slash commands to this server only (instant) instead of globally (up to an hour).
    guild_id: int | None = Field(default=None, gt=0)
    #: The application's id, for the invite URL printed by the setup guide.
    application_id: int | None = Field(default=None, gt=0)
    #: Role names whose members moderate, besides members with the Manage Server permission.
    moderator_roles: tuple[str, ...] = ()
    #: Whether users may use the bot in direct messages.
    allow_dms: bool = False
    #: Ask for the privileged message-content intent (enable it in the developer portal first): then
    #: replies that mention the bot work on any member's image, not only on the bot's own results.
    message_content: bool = False
    #: Words (whole words, any case) whose prompts run only in age-restricted channels.
    nsfw_words: tuple[str, ...] = (
        "nsfw", "nude", "nudity", "naked", "porn", "hentai", "topless", "explicit",
    )
    #: LoRAs and embeddings (file stems; `*` and `?` wildcards, any case) usable only in
    #: age-restricted channels.
    nsfw_addons: tuple[str, ...] = ()
    #: Least seconds between two progress edits of one message.
    progress_interval_s: float = Field(default=1.5, ge=0.5)
    #: Attach a small preview (a cheap latent-to-RGB image, no VAE) to progress edits.
    preview: bool = False


class AppConfig(BaseModel):
    """The whole configuration; each section is owned by the package that uses it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    discord: DiscordSettings = DiscordSettings()
    generation: GenerationSettings = GenerationSettings()
    models: tuple[ModelSettings, ...] = ()
    queue: QueueSettings = QueueSettings()
    storage: StorageSettings = StorageSettings()
    limits: LimitsSettings = LimitsSettings()

    @field_validator("models")
    @classmethod
    def _models(cls, models: tuple[ModelSettings, ...]) -> tuple[ModelSettings, ...]:
        return check_models(models)

    @model_validator(mode="after")
    def _across_sections(self) -> AppConfig:
        if self.limits.max_steps is not None and self.limits.max_steps > self.generation.max_steps:
            raise ValueError(
                f"limits.max_steps ({self.limits.max_steps}) exceeds generation.max_steps "
                f"({self.generation.max_steps})"
            )
        check_upscaler(self.generation.upscaler, self.models)
        return self


def config_path(cli_path: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """`--config PATH`, else `$ATELIER_CONFIG`, else `./config.toml`."""
    return Path(cli_path or environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(path: Path) -> AppConfig:
    """Parse and validate `path`; relative paths in it resolve against its folder."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such configuration file; copy config.toml from the repository "
            f"or pass --config PATH (or set {CONFIG_ENV})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        config = AppConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"{path}: {_describe(error)}" for error in exc.errors())) from None
    return _resolve_paths(config, path.resolve().parent)


def _describe(error: Mapping[str, typing.Any]) -> str:
    """One line: the dotted key, what is wrong, and what is allowed or what was given."""
    loc = error["loc"]
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if error["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(loc[:-1]))
        return f"{key}: unknown key; allowed here: {allowed}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    where = f"{key}: " if key else ""
    if error["type"] == "value_error":  # our own validators already name the bad value
        return f"{where}{message}"
    return f"{where}{message} (got {error['input']!r})"


def _allowed_keys(loc: tuple[typing.Any, ...]) -> list[str]:
    """The keys the settings model at `loc` accepts, for "unknown key" messages."""
    model: type[BaseModel] = AppConfig
    for part in loc:
        if isinstance(part, int):
            continue
        model = _model_in(model.model_fields[part].annotation)
    return sorted(model.model_fields)


def _model_in(annotation: typing.Any) -> type[BaseModel]:
    """The settings model inside an annotation such as `X`, `X | None` or `tuple[X, ...]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if arg is not Ellipsis and arg is not types.NoneType:
            return _model_in(arg)
    raise TypeError(f"no settings model in {annotation!r}")


def _resolve_paths(model: BaseModel, base: Path) -> typing.Any:
    """A copy of `model` whose relative `Path` values are made absolute against `base`."""
    updates: dict[str, typing.Any] = {}
    for name, value in model:
        if isinstance(value, Path) and not value.is_absolute():
            updates[name] = base / value
        elif isinstance(value, BaseModel):
            updates[name] = _resolve_paths(value, base)
        elif isinstance(value, tuple) and value and isinstance(value[0], BaseModel):
            updates[name] = tuple(_resolve_paths(item, base) for item in value)
    return model.model_copy(update=updates)
