"""The gestures users make and the requests they become: `/imagine`, a reply to an image that
mentions the bot, the `Remix` context menu, and the result buttons.

Every value is checked here on the bot's side (Discord's own option ranges can be bypassed), and
every problem a user can cause is answered with what was wrong and what is allowed.

No `from __future__ import annotations` here: discord.py reads the command signatures' annotations
at definition time, and the option ranges come from the configuration.
"""

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

import discord
import numpy as np
from discord import app_commands
from PIL import Image
from pydantic import ValidationError

from bot.addons import Addons, without_addons
from bot.config import AppConfig
from bot.moderation import audit_cancel
from bot.policy import Requester, is_moderator
from bot.replies import DEFAULT_UPLOAD_LIMIT, Delivery, status_editor
from bot.studio import Origin, Studio
from bot.styles import STYLES
from bot.views import Action, status_view
from generation.addons import sampling_defaults
from generation.images import ImageInputError, fit_size, load_image, prepare_mask, split_alpha
from generation.outpaint import outpaint_size
from generation.prompts import PromptError
from generation.metadata import png_bytes
from generation.queue import Job, Refused, explain
from generation.request import (
    ASPECTS,
    MAX_SEED,
    SAMPLER_NAMES,
    GenerationRequest,
    Kind,
    aspect_size,
    random_seed,
)
from generation.settings import GenerationSettings, default_model
from generation.variations import variation_request
from models.families import X4_UPSCALER
from models.flops import unet_flops_ratio
from models.loading import CheckpointError, CheckpointInfo, inspect_checkpoint
from models.lora import family_label
from storage import jobs as stored
from storage.images import ImageStatus, image_file, job_images, put_input

log = logging.getLogger(__name__)

#: Longest prompt a user may type (styles add their own words around it).
MAX_PROMPT = 1000
#: Largest upload read, and largest decoded image, before anything is resized.
MAX_INPUT_BYTES = 20 * 1024 * 1024
MAX_INPUT_PIXELS = 4096 * 4096
#: img2img strength when the user gives none.
DEFAULT_STRENGTH = 0.6
#: The family name of x4 upscaler checkpoints, which only enlarge images.
UPSCALER_FAMILY = X4_UPSCALER.name
#: A request's fields worked out from a gesture's options, and its model's checkpoint: checked once
#: per gesture (`Gestures.check`), built into the request once an input image's size is known.
Checked = tuple[dict[str, Any], CheckpointInfo]
#: Flags a reply may carry, `--name value`; `--no` is the negative prompt.
_FLAG = re.compile(r"(?:^|\s)--([a-z]+)(?=\s|$)")
_FLAGS = {"no": "negative", "strength": "strength", "seed": "seed", "steps": "steps", "guidance": "guidance",
          "cfg": "guidance", "sampler": "sampler", "model": "model", "count": "count", "ar": "aspect",
          "aspect": "aspect", "style": "style"}


class UserError(Exception):
    """Something the user asked for cannot be done; the message says what and what is allowed,
    for every problem found at once (`generation.queue.explain`)."""

    def __init__(self, *problems: str) -> None:
        super().__init__(explain(problems))
        self.problems = problems


@dataclass(frozen=True)
class Options:
    """What a user typed, before it is checked."""

    prompt: str
    negative: str = ""
    count: int | None = None
    aspect: str = "1:1"
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    sampler: str | None = None
    model: str | None = None
    style: str | None = None
    strength: float | None = None


def size_for(aspect: str, native: int, family: str = "") -> tuple[int, int]:
    """Width and height of `aspect` at the model's native size (`generation.request.aspect_size`)."""
    try:
        return aspect_size(aspect, native, family)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def parse_flags(text: str) -> Options:
    """`a castle --no fog --strength 0.5 --seed 3` -> Options; the prompt is the text before the
    first flag."""
    parts = _FLAG.split(text)
    prompt, values, problems = parts[0].strip(), {}, []
    for name, value in zip(parts[1::2], parts[2::2], strict=True):
        field = _FLAGS.get(name)
        if field is None:
            problems.append(f"unknown flag --{name}; allowed: {', '.join('--' + f for f in _FLAGS)}")
        else:
            values[field] = value.strip()
    converters = {"strength": float, "seed": int, "steps": int, "guidance": float, "count": int}
    typed: dict[str, object] = {}
    for field, value in values.items():
        try:
            typed[field] = converters.get(field, str)(value)
        except ValueError:
            problems.append(f"--{field} needs a number, not {value!r}")
    if problems:
        raise UserError(*problems)
    return Options(prompt=prompt, **typed)


def _check(problems: list[str], name: str, value: float, low: float, high: float) -> None:
    """Adds to `problems` when `value` is outside [low, high]."""
    if not low <= value <= high:
        problems.append(f"{name} must be between {_number(low)} and {_number(high)}; you gave {_number(value)}")


def _number(value: float) -> str:
    """Integers in full (a seed of 4294967296, not 4.29497e+09), other numbers short (0.5, not 0.500000)."""
    return str(value) if isinstance(value, int) else f"{value:g}"


class Gestures:
    """Turns gestures into jobs: builds and checks requests, submits them, and acknowledges."""

    def __init__(self, client: discord.Client, studio: Studio, delivery: Delivery) -> None:
        self._client = client
        self._studio = studio
        self._delivery = delivery
        self._config: AppConfig = studio.config
        #: What each model's file holds (family, native size), read on first use.
        self._checkpoints: dict[str, CheckpointInfo] = {}
        #: Each model's `GenerationRequest.unet_flops_ratio`, counted from its UNet on first use.
        self._flops_ratios: dict[str, float] = {}
        self.addons = Addons(studio.addons, studio.db, self._config.discord)

    async def checkpoint(self, model: str) -> CheckpointInfo:
        """What the file of the configured `model` holds, read once, off the loop."""
        if model not in self._checkpoints:
            settings = next(m for m in self._config.models if m.name == model)
            try:
                info = await asyncio.to_thread(
                    inspect_checkpoint, settings.checkpoint, settings.config, settings.prediction)
                # at the native size's latent (8x VAEs: tiny test files are measured smaller)
                self._flops_ratios[model] = await asyncio.to_thread(unet_flops_ratio, info.unet, info.native_size // 8)
                self._checkpoints[model] = info
            except CheckpointError:
                log.exception("the checkpoint of model %s cannot be read", model)
                raise UserError(f"the checkpoint of model {model} cannot be read; ask the bot's operator "
                                "(`atelier doctor` says why)") from None
        return self._checkpoints[model]

    def drawing_models(self) -> list[str]:
        """The models users may pick: all configured but the upscaler and any found to be one."""
        upscaler, known = self._config.generation.upscaler, self._checkpoints
        return [m.name for m in self._config.models
                if m.name != upscaler and (m.name not in known or known[m.name].family != UPSCALER_FAMILY)]

    # -- requests --

    async def request(self, options: Options, *, kind: Kind = Kind.TXT2IMG, size: tuple[int, int] | None = None,
                      init_image: str | None = None, mask_image: str | None = None,
                      checked: Checked | None = None) -> GenerationRequest:
        """A checked request; `size` (an input image's) replaces the aspect's. Raises `UserError`
        naming every problem of `options` at once. `checked`: what `check` returned for these
        options, not worked out again."""
        fields, checkpoint = checked if checked is not None else await self._fields(options, kind)
        width, height = size or size_for(options.aspect, checkpoint.native_size, checkpoint.family)
        try:
            return GenerationRequest(kind=kind, width=width, height=height, init_image=init_image,
                                     mask_image=mask_image, **fields)
        except ValidationError as error:
            raise UserError(*(e["msg"] for e in error.errors())) from None

    async def check(self, options: Options, kind: Kind, *, also: tuple[str, ...] = ()) -> Checked:
        """Raise `UserError` naming every problem of `options`, with `also` (problems the caller
        found first), before slow work such as decoding an image; else the checked fields, for
        `request` once the image's size is known."""
        try:
            checked = await self._fields(options, kind)
        except UserError as error:
            raise UserError(*also, *error.problems) from None
        if also:
            raise UserError(*also)
        return checked

    async def _fields(self, options: Options, kind: Kind) -> Checked:
        """The request's fields from `options` and its model's checkpoint, or `UserError` with
        every problem found."""
        g, problems = self._config.generation, []
        default = default_model(self._config.models, g.upscaler)
        if default is None:
            raise UserError("no models are configured on this bot; ask its operator")
        model, checkpoint = options.model or default.name, None
        if model not in (m.name for m in self._config.models):
            problems.append(f"unknown model {model!r}; available: {', '.join(self.drawing_models())}")
        else:
            checkpoint = None if model == g.upscaler else await self.checkpoint(model)
            if checkpoint is None or checkpoint.family == UPSCALER_FAMILY:
                problems.append(f"{model} is an upscaler: it only enlarges images (the U buttons use it) and "
                                f"cannot draw; pick one of: {', '.join(self.drawing_models())}")
        prompt, negative = options.prompt.strip(), options.negative
        if not prompt:
            problems.append("the prompt is empty; describe what to draw")
        if len(prompt) > MAX_PROMPT:
            problems.append(f"the prompt is {len(prompt)} characters long; the most allowed is {MAX_PROMPT}")
        if options.style is not None:
            if options.style not in STYLES:
                problems.append(f"unknown style {options.style!r}; allowed: {', '.join(STYLES)}")
            else:
                prompt, negative = STYLES[options.style].apply(prompt, negative)
        try:
            lcm = await asyncio.to_thread(self.addons.library.lcm_hint, prompt, model)  # reads new LoRA files
        except PromptError as error:  # a malformed <lora:...> tag
            problems.append(str(error))
            lcm = False
        sampler, steps, guidance = sampling_defaults(  # an LCM model or LoRA has its own defaults
            lcm, (g.default_sampler, g.default_steps, g.default_guidance), options.sampler, options.steps,
            options.guidance)
        if sampler not in SAMPLER_NAMES:
            problems.append(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLER_NAMES)}")
        count = g.default_count if options.count is None else options.count
        _check(problems, "count", count, 1, g.max_count)
        _check(problems, "steps", steps, 1, g.max_steps)
        _check(problems, "guidance", guidance, 0, g.max_guidance)
        seed = random_seed(max(1, count)) if options.seed is None else options.seed
        _check(problems, "seed", seed, 0, MAX_SEED - max(1, count) + 1)
        strength = None
        if kind is not Kind.TXT2IMG:
            strength = DEFAULT_STRENGTH if options.strength is None else options.strength
            _check(problems, "strength", strength, 0.01, 1.0)
        if problems or checkpoint is None:
            raise UserError(*problems)
        return dict(prompt=prompt, negative_prompt=negative, model=model, sampler=sampler, steps=steps,
                    guidance=guidance, seed=seed, count=count, strength=strength,
                    unet_flops_ratio=self._flops_ratios[model]), checkpoint

    async def from_image(self, options: Options, source: bytes, mask: bytes | None,
                         checked: Checked | None = None) -> tuple[GenerationRequest, list[str]]:
        """img2img of `source`, or inpaint when a mask is given or the source has transparent
        pixels; with notes on what was changed (a downscaled image, a resized mask). Decoding runs
        off the loop; an unusable mask is refused now, not after waiting in the queue. `checked`:
        the options as the caller already checked them (img2img and inpaint take the same fields)."""
        g = self._config.generation
        if checked is None:
            checked = await self.check(options, Kind.IMG2IMG)  # the options' problems, before any decoding
        try:
            rgb, mask_png, mask_notes = await asyncio.to_thread(_decode_inputs, source, mask)
        except ImageInputError as error:
            raise UserError(str(error)) from None
        width, height, notes = fit_size(*rgb.size, g.max_pixels, g.max_side)
        notes += mask_notes
        init = await put_input(self._studio.db, await asyncio.to_thread(png_bytes, rgb))
        mask_sha = await put_input(self._studio.db, mask_png) if mask_png is not None else None
        kind = Kind.INPAINT if mask_sha is not None else Kind.IMG2IMG
        request = await self.request(options, kind=kind, size=(width, height), init_image=init, mask_image=mask_sha,
                                     checked=checked)
        return request, notes

    # -- submitting and acknowledging --

    async def submit_interaction(self, interaction: discord.Interaction, request: GenerationRequest,
                                 parent: tuple[str, int] | None = None, notes: list[str] | None = None) -> Job | None:
        """Queue `request` for the interaction's user and answer with the status message."""
        if (missing := _missing_permissions(interaction.app_permissions, interaction.guild)) is not None:
            await _say(interaction, missing)
            return None
        requester = Requester.of(interaction.user, interaction.channel)
        origin = Origin(
            channel_id=interaction.channel_id or 0, interaction_id=interaction.id,
            interaction_token=interaction.token, token_expires_at=interaction.expires_at.timestamp(),
            parent_job_id=parent[0] if parent else None, parent_index=parent[1] if parent else None)
        try:
            job = await self._submit(request, requester, origin)
        except Refused as refused:
            await _say(interaction, str(refused))
            return None
        self._delivery.expect(job.id, requester.user_id, interaction.filesize_limit)
        text = self._ack_text(job, notes or [])
        if interaction.response.is_done():  # deferred before slow work: the placeholder becomes the status
            message_id: int | None = (await interaction.edit_original_response(content=text, view=status_view(job.id))).id
        else:
            message_id = (await interaction.response.send_message(text, view=status_view(job.id))).message_id
        if message_id is None:  # Discord always returns it; without it only the interaction can edit
            self._delivery.acknowledged(job.id, text, interaction.edit_original_response)
            return job
        await stored.set_message(self._studio.db, job.id, message_id)  # before a result can replace it
        self._delivery.acknowledged(job.id, text, status_editor(interaction, message_id))
        return job

    async def submit_message(self, message: discord.Message, request: GenerationRequest,
                             notes: list[str]) -> Job | None:
        """Queue `request` for the author of `message` and reply to it with the status message (the
        caller checked that the bot may post there)."""
        requester = Requester.of(message.author, message.channel)
        try:
            job = await self._submit(request, requester, Origin(channel_id=message.channel.id))
        except Refused as refused:
            await message.reply(str(refused), mention_author=False)
            return None
        self._delivery.expect(job.id, requester.user_id,
                              message.guild.filesize_limit if message.guild else DEFAULT_UPLOAD_LIMIT)
        text = self._ack_text(job, notes)
        status = await message.reply(text, view=status_view(job.id), mention_author=False)
        self._delivery.acknowledged(job.id, text, status.edit)
        await stored.set_message(self._studio.db, job.id, status.id)
        return job

    async def _submit(self, request: GenerationRequest, requester: Requester, origin: Origin) -> Job:
        """Every path's one way into the queue: the problems of its LoRAs and embeddings are
        refused (`Refused`) together with the studio's own reasons."""
        try:
            info = await self.checkpoint(request.model)
            family = family_label(info.context_dim, info.family)
        except UserError:  # unreadable: the runner says so
            family = None
        problems = await self.addons.problems(request, requester, family)
        return await self._studio.submit(request, requester, origin, problems)

    def _ack_text(self, job: Job, notes: list[str]) -> str:
        """The queue position and ETA, and what was changed about the input (as Discord subtext)."""
        text = self._delivery.queued_text(job.id, job.owner_id, self._studio.estimates.get(job.id))
        return "\n".join([text, *(f"-# {note}" for note in notes)])

    # -- /imagine --

    def imagine_command(self) -> app_commands.Command:
        g = self._config.generation

        @app_commands.command(name="imagine", description="Draw images from a prompt")
        @app_commands.describe(
            prompt="What to draw", negative="What to keep out of the image", count="How many images",
            aspect="Width:height", steps="Denoising steps (more: slower, finer)", guidance="How closely to follow "
            "the prompt", seed="Start from this seed (same seed, same image)", sampler="Sampling method",
            model="Checkpoint", style="A style preset", image="An image to start from (img2img)",
            mask="White where the image should be repainted (inpaint)", strength="How much of the image to "
            "change, 0.01-1 (img2img)")
        @app_commands.choices(
            aspect=[app_commands.Choice(name=a, value=a) for a in ASPECTS],
            sampler=[app_commands.Choice(name=s, value=s) for s in SAMPLER_NAMES],
            style=[app_commands.Choice(name=s.label, value=key) for key, s in STYLES.items()])
        async def imagine(
            interaction: discord.Interaction,
            prompt: app_commands.Range[str, 1, MAX_PROMPT],
            negative: app_commands.Range[str, 1, MAX_PROMPT] | None = None,
            count: app_commands.Range[int, 1, g.max_count] | None = None,
            aspect: str = "1:1",
            steps: app_commands.Range[int, 1, g.max_steps] | None = None,
            guidance: app_commands.Range[float, 0.0, g.max_guidance] | None = None,
            seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
            sampler: str | None = None,
            model: str | None = None,
            style: str | None = None,
            image: discord.Attachment | None = None,
            mask: discord.Attachment | None = None,
            strength: app_commands.Range[float, 0.01, 1.0] | None = None,
        ) -> None:
            if (missing := _missing_permissions(interaction.app_permissions, interaction.guild)) is not None:
                await _say(interaction, missing)  # before downloading anything
                return
            options = Options(prompt, negative or "", count, aspect, steps, guidance, seed, sampler, model, style,
                              strength)
            notes: list[str] = []
            try:
                if image is None and (mask is not None or strength is not None):
                    what = "a mask needs an image to repaint" if mask else "strength says how much of an image to change"
                    raise UserError(f"{what}: add the image option too")
                if image is None:
                    request = await self.request(options)
                else:
                    await _defer(interaction)
                    source = await _read(image, "image")
                    request, notes = await self.from_image(options, source,
                                                           await _read(mask, "mask") if mask else None)
            except UserError as error:
                await _say(interaction, str(error))
                return
            await self.submit_interaction(interaction, request, notes=notes)

        @imagine.autocomplete("prompt")
        async def complete_prompt(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
            return await self.addons.complete_prompt(Requester.of(interaction.user, interaction.channel), current)

        @imagine.autocomplete("model")
        async def complete_model(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
            return [app_commands.Choice(name=m, value=m) for m in self.drawing_models()
                    if current.lower() in m.lower()][:25]

        return imagine

    # -- reply to an image, and Remix --

    async def on_message(self, message: discord.Message) -> None:
        """A reply that mentions the bot: img2img (or inpaint) of the replied-to image."""
        me = self._client.user
        # raw_mentions: written in the text, not the ping a reply to the bot's own message carries.
        if message.author.bot or me is None or me.id not in message.raw_mentions:
            return
        if await _told_cannot_post(message):
            return
        if message.reference is None or message.reference.message_id is None:
            await message.reply("Reply to a message with an image and mention me with a prompt, e.g. "
                                f"`{me.mention} a watercolour city --strength 0.5`.", mention_author=False)
            return
        try:
            target = message.reference.resolved
            if not isinstance(target, discord.Message):
                target = await message.channel.fetch_message(message.reference.message_id)
            source = _first_image(target)
            if source is None:
                raise UserError(self._no_image(target))
            text = re.sub(rf"<@!?{me.id}>", "", message.content)
            options = parse_flags(text)
            attached = _first_image(message)
            mask = await _read(attached, "mask") if attached else None
            if mask is not None and not await asyncio.to_thread(is_mask, mask):
                raise UserError("the image on your reply is not a mask; attach a black-and-white image (white = "
                                "repaint), or no image for img2img")
            request, notes = await self.from_image(options, await _read(source, "image"), mask)
        except UserError as error:
            await message.reply(str(error), mention_author=False)
            return
        except discord.HTTPException:
            await message.reply("I could not read the message you replied to: it was deleted, or I lack Read "
                                "Message History here.", mention_author=False)
            return
        await self.submit_message(message, request, notes)

    def _no_image(self, target: discord.Message) -> str:
        """Why the replied-to message shows no image: it has none, or Discord hid it from the bot
        (another member's message that does not mention it, without the message-content intent)."""
        me = self._client.user
        shown = (self._client.intents.message_content or target.guild is None or me is None
                 or target.author.id == me.id or any(user.id == me.id for user in target.mentions))
        if shown:
            return "the message you replied to has no image; reply to a message with a PNG, JPEG or WebP image"
        return ("I cannot see images in other members' messages (Discord shows them to me only with the Message "
                "Content intent), so replies work on my own results. For this image use Remix: right-click or "
                "long-press the message, then Apps > Remix. Or ask the bot's operator to enable "
                "`[discord] message_content`.")

    def remix_menu(self) -> app_commands.ContextMenu:
        async def remix(interaction: discord.Interaction, message: discord.Message) -> None:
            source = _first_image(message)
            if source is None:
                await _say(interaction, "That message has no image to remix; use Remix on a message with an image.")
                return
            await interaction.response.send_modal(RemixModal(self, source))

        return app_commands.ContextMenu(name="Remix", callback=remix)

    # -- buttons --

    async def press(self, interaction: discord.Interaction, action: Action, job_id: str, index: int) -> None:
        db = self._studio.db
        job = await stored.get_job(db, job_id)
        if job is None:
            await _say(interaction, f"Job `{job_id}` no longer exists (it was deleted), so its buttons no longer "
                                    "work. Start again with /imagine.")
            return
        images = await job_images(db, job_id)
        if index >= len(images):
            await _say(interaction, f"Job `{job_id}` has no image {index + 1}.")
            return
        if any(image.status is not ImageStatus.OK for image in images):
            await _say(interaction, f"The images of job `{job_id}` have expired and are no longer stored, so its "
                                    "buttons no longer work. Start again with /imagine.")
            return
        source, notes = job.request, []
        try:
            if action == "rerun":
                request = source.model_copy(update={"seed": random_seed(source.count)})
            else:
                await _defer(interaction)
                image = images[index]
                try:
                    data = await asyncio.to_thread(image_file(db, image).read_bytes)
                except FileNotFoundError:  # deleted behind the database's back: as good as expired
                    raise UserError(f"The images of job `{job_id}` are no longer stored, so its buttons no "
                                    "longer work. Start again with /imagine.") from None
                sha = await put_input(db, data)
                if source.x4:  # the upscaler cannot vary or zoom out: the model that drew the image does
                    source = await self._drawn_by(job)
                request, notes = derived_request(action, source, sha, (image.width, image.height),
                                                 self._config.generation)
                if request.x4:  # the upscaler is another model: the drawing model's add-ons do not fit it
                    request = await without_addons(request, self.addons)
                if request.x4 and (await self.checkpoint(request.model)).family != UPSCALER_FAMILY:
                    log.error("[generation] upscaler = %r is not an x4 upscaler checkpoint", request.model)
                    raise UserError(f"This bot's upscaler, {request.model}, is not an x4 upscaler checkpoint; ask "
                                    "its operator to fix `[generation] upscaler`.")
        except (UserError, ImageInputError) as error:
            await _say(interaction, str(error))
            return
        await self.submit_interaction(interaction, request, parent=(job_id, index), notes=notes)

    async def _drawn_by(self, job: stored.Job) -> GenerationRequest:
        """An x4 upscale's request with the model, sampler, steps and guidance of the job whose
        image it upscaled (the nearest ancestor not made by the upscaler: reruns are upscales too)."""
        detail = await stored.job_detail(self._studio.db, job.id)
        drawn = next((p.request for p in detail.parents if not p.request.x4), None) if detail else None
        if drawn is None:
            raise UserError(f"Job `{job.id}` no longer says which model drew the image it upscaled, so it cannot "
                            "be varied or zoomed out. Start again with /imagine.")
        return job.request.model_copy(update=dict(model=drawn.model, sampler=drawn.sampler, steps=drawn.steps,
                                                  guidance=drawn.guidance, prompt=drawn.prompt,
                                                  negative_prompt=drawn.negative_prompt))

    async def cancel(self, interaction: discord.Interaction, job_id: str) -> None:
        requester = Requester.of(interaction.user, interaction.channel)
        moderator = is_moderator(requester, self._config.discord)
        try:
            job = await self._studio.cancel(job_id, by=requester.user_id, moderator=moderator)
        except Refused as refused:
            await _say(interaction, str(refused))
            return
        if job.owner_id != requester.user_id:  # a moderator's cancel of someone else's job
            await audit_cancel(self._studio.db, interaction, job)
        done = "cancelled" if job.state.value == "cancelled" else "stops at its next step"
        await _say(interaction, f"Job `{job_id}` {done}.")


def derived_request(action: Action, source: GenerationRequest, sha: str, size: tuple[int, int],
                    settings: GenerationSettings) -> tuple[GenerationRequest, list[str]]:
    """The request a button makes from one result image (stored as input `sha`, `size` pixels),
    with notes for the user: variations at the configured strengths, an upscale (by the configured
    x4 upscaler up to its input limit, else hires 2x), or a zoom out (outpaint on every side).
    `source` must be a request of a model that draws (not the upscaler)."""
    seed = random_seed(source.count)
    # Results of an upscale can exceed the size limits: vary and zoom out work within them.
    width, height = size if action == "upscale" else fit_size(*size, settings.max_pixels, settings.max_side)[:2]
    count = 1 if action == "upscale" else source.count
    base = source.model_copy(update={"width": width, "height": height, "count": count, "upscale_factor": 2})
    if action in ("vary", "subtle", "strong"):
        amount: Literal["subtle", "strong"] = "subtle" if action == "subtle" else "strong"
        return variation_request(base, sha, amount, seed, settings), []
    common = dict(init_image=sha, mask_image=None, seed=seed, variation_seed=None, variation_strength=0.0)
    if action == "upscale":
        changes, notes = _upscale_changes(width, height, settings)
        changes |= common
    else:  # zoom out: extend every side by a quarter of the shorter one, the image shrunk to fit the limits
        sides = ("left", "right", "up", "down")
        pixels = max(8, min(width, height) // 4 // 8 * 8)
        canvas_w, canvas_h, notes = outpaint_size(width, height, sides, pixels, settings.max_pixels,
                                                  settings.max_side)
        changes = dict(kind=Kind.OUTPAINT, strength=1.0, outpaint_directions=sides, outpaint_pixels=pixels,
                       width=canvas_w, height=canvas_h, **common)
    try:
        return GenerationRequest.model_validate(base.model_dump() | changes), notes
    except ValidationError as error:
        raise UserError(*(e["msg"] for e in error.errors())) from None


def _upscale_changes(width: int, height: int, settings: GenerationSettings) -> tuple[dict, list[str]]:
    """An upscale of a width x height image: by the x4 upscaler with its own settings when one is
    configured and the image is within its input limit, else hires 2x (with a note why, if so)."""
    hires = dict(kind=Kind.UPSCALE, upscale_factor=2, strength=settings.hires_strength)
    if settings.upscaler is None:
        return hires, []
    if width * height > settings.upscaler_max_input_pixels:
        return hires, [f"the image is {width}x{height} = {width * height} pixels, over the x4 upscaler's limit of "
                       f"{settings.upscaler_max_input_pixels}: it was upscaled 2x instead"]
    return dict(kind=Kind.UPSCALE, upscale_factor=4, strength=None, model=settings.upscaler,
                sampler=settings.upscaler_sampler, steps=settings.upscaler_steps,
                guidance=settings.upscaler_guidance, upscale_noise_level=settings.upscaler_noise_level), []


class RemixModal(discord.ui.Modal, title="Remix"):
    """Prompt, negative prompt and strength for an img2img (or inpaint) of a message's image."""

    prompt = discord.ui.TextInput(label="Prompt", custom_id="prompt", max_length=MAX_PROMPT)
    negative = discord.ui.TextInput(label="Negative prompt", custom_id="negative", required=False,
                                    max_length=MAX_PROMPT)
    strength = discord.ui.TextInput(label="Strength (0.01-1: how much to change)", custom_id="strength",
                                    required=False, default=str(DEFAULT_STRENGTH), max_length=5)

    def __init__(self, gestures: Gestures, source: discord.Attachment) -> None:
        super().__init__(custom_id="atelier:v1:remix")
        self._gestures = gestures
        self._source = source

    async def on_submit(self, interaction: discord.Interaction) -> None:
        try:
            strength, problems = None, ()
            try:
                strength = float(self.strength.value) if self.strength.value else None
            except ValueError:  # told with whatever else the form got wrong
                problems = (f"strength must be a number between 0.01 and 1, not {self.strength.value!r}",)
            options = Options(prompt=self.prompt.value, negative=self.negative.value, strength=strength)
            checked = await self._gestures.check(options, Kind.IMG2IMG, also=problems)
            await _defer(interaction)
            request, notes = await self._gestures.from_image(options, await _read(self._source, "image"), None,
                                                             checked)
        except UserError as error:
            await _say(interaction, str(error))
            return
        await self._gestures.submit_interaction(interaction, request, notes=notes)


def _first_image(message: discord.Message) -> discord.Attachment | None:
    return next((a for a in message.attachments if (a.content_type or "").startswith("image/")
                 or a.filename.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))), None)


async def _read(attachment: discord.Attachment, what: str) -> bytes:
    """The attachment's bytes, from the URL the API server gave (no host is hard-coded)."""
    if attachment.size > MAX_INPUT_BYTES:
        raise UserError(f"the {what} is {attachment.size / 2**20:.1f} MB; the most allowed is "
                        f"{MAX_INPUT_BYTES // 2**20} MB")
    try:
        return await attachment.read()
    except discord.HTTPException as error:
        raise UserError(f"I could not download the {what} ({error.status}); try uploading it again") from None


def is_mask(data: bytes) -> bool:
    """Whether an image is a black-and-white mask: grey (R = G = B, up to compression noise) and
    nearly all of it near black or near white."""
    try:
        image = load_image(data, MAX_INPUT_PIXELS, "mask").convert("RGB")
    except ImageInputError:
        return False
    red, green, blue = (np.asarray(channel, dtype=np.int16) for channel in image.split())
    grey = max(np.abs(red - green).max(), np.abs(green - blue).max()) <= 16
    extreme = np.mean((red < 32) | (red > 223)) >= 0.98
    return bool(grey and extreme)


def _decode_inputs(source: bytes, mask: bytes | None) -> tuple[Image.Image, bytes | None, list[str]]:
    """The source as RGB; the mask (the given one, else the source's transparency) checked and made
    black and white at the source's size, as PNG; and notes on what was changed about the mask."""
    rgb, alpha_mask = split_alpha(load_image(source, MAX_INPUT_PIXELS))
    mask_image = load_image(mask, MAX_INPUT_PIXELS, "mask") if mask is not None else alpha_mask
    if mask_image is None:
        return rgb, None, []
    binary, notes = prepare_mask(mask_image, rgb.size)
    return rgb, png_bytes(binary), notes


def _missing_permissions(have: discord.Permissions, guild: discord.Guild | None) -> str | None:
    """Why results could not be posted in a channel where the bot `have`s these permissions."""
    if guild is None:
        return None
    missing = [name for name, ok in (("View Channel", have.view_channel), ("Send Messages", have.send_messages),
                                     ("Attach Files", have.attach_files)) if not ok]
    if not missing:
        return None
    return (f"I cannot post in this channel: I am missing {', '.join(missing)}. Ask a moderator to allow it, or use "
            "me in another channel.")


async def _told_cannot_post(message: discord.Message) -> bool:
    """Whether the bot cannot post results where `message` was sent; then its author is told in
    private (a reply there would fail too), before anything is downloaded."""
    me = message.guild.me if message.guild else None
    missing = _missing_permissions(message.channel.permissions_for(me), message.guild) if me else None
    if missing is None:
        return False
    with contextlib.suppress(discord.HTTPException):
        await message.author.send(f"{missing} (in <#{message.channel.id}>)")
    return True


async def _defer(interaction: discord.Interaction) -> None:
    """Slow work ahead (a download, image decoding and hashing): acknowledge now, as Discord wants
    an answer within 3 seconds; the public "thinking" placeholder later becomes the status message
    (or, on an error, gives way to a private answer: see `_say`)."""
    if not interaction.response.is_done():
        await interaction.response.defer(thinking=True)


async def _say(interaction: discord.Interaction, text: str) -> None:
    """An answer only the user sees. After `_defer`, the public placeholder is deleted and the
    answer follows privately: Discord keeps a deferred answer's visibility, so editing the
    placeholder would tell the whole channel about one member's bad upload."""
    if not interaction.response.is_done():
        await interaction.response.send_message(text, ephemeral=True)
        return
    with contextlib.suppress(discord.NotFound):
        await interaction.delete_original_response()
    await interaction.followup.send(text, ephemeral=True)
