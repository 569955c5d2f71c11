"""What a user asked for, as plain validated data.

This module is the contract between the bot, the queue, the runner and storage, so it imports
neither torch nor anything of ours. Bounds here are absolute sanity bounds; the configured hard
limits and moderator limits are narrower and are enforced at submit time.
"""

from __future__ import annotations

import base64
import math
import re
import secrets
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Sampler names users may pick; `generation.samplers.SAMPLERS` implements exactly these.
SamplerName = Literal[
    "ddim",
    "plms",
    "euler",
    "euler_a",
    "heun",
    "lms",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_sde_karras",
    "unipc",
    "lcm",
]
SAMPLER_NAMES: tuple[str, ...] = SamplerName.__args__
#: UNet calls per step where it is not one: the single-step second-order samplers evaluate the
#: model twice a step (once on their last step: N steps make 2N - 1 calls, charged as 2N).
UNET_CALLS_PER_STEP = {"heun": 2, "dpmpp_sde_karras": 2}

#: Largest seed: seeds are drawn and displayed as unsigned 32-bit integers, as the web UIs do.
MAX_SEED = 2**32 - 1

#: One cost unit is one 512x512 image denoised for one step.
_UNIT_PIXELS = 512 * 512
#: SD's VAE: one latent pixel per 8x8 image pixels. The x4 upscaler's latent is as large as its
#: input image, so its UNet sees this many times the latent pixels of an SD image of that size.
_SD_PIXELS_PER_LATENT = 8 * 8
#: x4 upscaler UNet FLOPs per latent pixel over SD 1.x UNet FLOPs per latent pixel. Measured with
#: `torch.utils.flop_counter.FlopCounterMode` over one forward of `models.unet.UNetModel` built on
#: the meta device: SD1 on a 64x64 latent (the 512x512 cost unit) 1.96e8 per latent pixel; the
#: X4_UPSCALER on latents of 64x64 to 512x512 (128x128 is the upscaler's tile) 6.91e7 to 7.02e7,
#: within 2% of each other (its only self-attention is at 1/8 of the latent). tests/test_upscale.py
#: recomputes it.
X4_UNET_FLOPS_RATIO = 0.35


#: `<lora:NAME:WEIGHT>` tags, A1111's syntax: `generation.prompts` parses them, `cost` counts them.
LORA_TAG = re.compile(r"<lora:([^<>]*)>", re.I)
#: Cost units of merging one LoRA into a model's weights and restoring them afterwards. Merging is
#: done once per batch, but each job that asks for a LoRA is charged it (its batch may be alone).
#: Measured on the CPU in float32 (docs/PERFORMANCE.md, "LoRA merge, for the cost of a job"): the
#: first merge and the restore of a full-size SD 1.x LoCon (rank 32, every UNet block layer and
#: text-encoder layer) take 0.19 of one guided 512x512 UNet call (one unit), a rank-32 LoRA on
#: kohya's default targets 0.21 ("LoRA switching").
LORA_MERGE_UNITS = 0.2


#: What a batch's speed depends on: (model, width, height, images in the batch); the queue
#: measures rates by it and storage keeps them.
RateKey = tuple[str, int, int, int]

#: Job ids: 12 lower-case base32 characters (60 random bits), short enough for button custom ids.
JOB_ID_PATTERN = re.compile(r"^[a-z2-7]{12}$")


def new_job_id() -> str:
    """A fresh unguessable job id matching `JOB_ID_PATTERN`."""
    return base64.b32encode(secrets.token_bytes(8)).decode("ascii")[:12].lower()


def random_seed(count: int = 1) -> int:
    """A fresh random seed for `count` images: the last image's seed S + count - 1 is <= MAX_SEED."""
    return secrets.randbelow(MAX_SEED - count + 2)


class JobState(StrEnum):
    """Where a job is in its life; the queue, the runner and storage share these names."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Kind(StrEnum):
    """What the pipeline does with the request."""

    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    OUTPAINT = "outpaint"
    VARIATION = "variation"
    UPSCALE = "upscale"


_NEEDS_IMAGE = {Kind.IMG2IMG, Kind.INPAINT, Kind.OUTPAINT, Kind.VARIATION, Kind.UPSCALE}


class GenerationRequest(BaseModel):
    """One user request: up to `count` images of one model, size, sampler and step count."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind = Kind.TXT2IMG
    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str = Field(default="", max_length=4000)
    model: str = Field(min_length=1, max_length=100)
    sampler: SamplerName = "dpmpp_2m_karras"
    steps: int = Field(ge=1, le=1000)
    guidance: float = Field(ge=0.0, le=50.0)
    seed: int = Field(ge=0, le=MAX_SEED)
    width: int = Field(ge=64, le=8192, multiple_of=8)
    height: int = Field(ge=64, le=8192, multiple_of=8)
    count: int = Field(default=1, ge=1, le=16)
    #: Content hash (sha256 hex) of a stored input image, for every kind but txt2img.
    init_image: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    #: Content hash of a stored mask image (white = repaint), for inpaint.
    mask_image: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    #: img2img strength in (0, 1]: the fraction of the schedule that is re-run.
    strength: float | None = Field(default=None, gt=0.0, le=1.0)
    #: Inpaint/outpaint: radius in pixels of the Gaussian blur that feathers the mask's seam.
    mask_blur: int = Field(default=4, ge=0, le=64)
    #: Inpaint: repaint only a crop around the mask (plus `inpaint_padding` pixels) at full size.
    inpaint_only_masked: bool = False
    inpaint_padding: int = Field(default=32, ge=0, le=512)
    #: Outpaint: the sides to extend ("zoom out" = all four, "pan" = one) and by how many pixels.
    outpaint_directions: tuple[Literal["left", "right", "up", "down"], ...] = ()
    outpaint_pixels: int = Field(default=128, ge=8, le=1024, multiple_of=8)
    #: The web UIs' variation seed: start noise = slerp(seed noise, variation-seed noise, strength).
    variation_seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    variation_strength: float = Field(default=0.0, ge=0.0, le=1.0)
    #: x4 upscaler: noise level (0..350) added to the low-resolution image, as the original's.
    upscale_noise_level: int = Field(default=20, ge=0, le=350)
    #: Upscale: 4 with an x4 upscaler checkpoint (the output is its VAE's scale times the input:
    #: 4 for the released one), 2 with an ordinary one (hires); the engine checks they match.
    upscale_factor: Literal[2, 4] = 2
    #: The model's UNet FLOPs per latent pixel over SD 1.x's (`models.flops.unet_flops_ratio`
    #: of its UNet: SDXL 2.1, SSD-1B 1.3), set by whoever picks the model; `cost` counts it. The
    #: x4 upscaler has its own.
    unet_flops_ratio: float = Field(default=1.0, gt=0.0, le=10.0)

    @model_validator(mode="after")
    def _image_matches_kind(self) -> GenerationRequest:
        if self.kind in _NEEDS_IMAGE and self.init_image is None:
            raise ValueError(f"a {self.kind} request needs an input image")
        if self.kind is Kind.TXT2IMG and (self.init_image or self.mask_image):
            raise ValueError("a txt2img request takes no input image; use img2img or inpaint")
        if self.mask_image is not None and self.kind is not Kind.INPAINT:
            raise ValueError(f"a mask is only used by inpaint, not by {self.kind}")
        if self.kind is Kind.OUTPAINT and not self.outpaint_directions:
            raise ValueError("an outpaint request needs at least one direction: left, right, up, down")
        if len(set(self.outpaint_directions)) != len(self.outpaint_directions):
            raise ValueError("outpaint directions must not repeat")
        if self.upscale_factor != 2 and self.kind is not Kind.UPSCALE:
            raise ValueError(f"an upscale factor is only used by upscale, not by {self.kind}")
        if self.kind is Kind.UPSCALE and not self.x4 and self.strength is None:
            raise ValueError("a 2x upscale is an img2img pass over the enlarged image: it needs a strength")
        return self

    @property
    def x4(self) -> bool:
        """Whether this is an upscale by an x4 upscaler checkpoint."""
        return self.kind is Kind.UPSCALE and self.upscale_factor == 4

    @property
    def denoising_steps(self) -> int:
        """Steps the UNet actually runs: img2img-like requests skip the first (1 - strength); the
        x4 upscaler samples from noise, whatever the strength."""
        if self.strength is None or self.kind is Kind.TXT2IMG or self.x4:
            return self.steps
        return max(1, int(self.strength * self.steps))

    @property
    def work_pixels(self) -> float:
        """The SD image pixels whose UNet work one image of this request takes per UNet call, which
        its GPU time and memory follow. Outpaint's width x height is already the canvas, and
        inpainting only the masked part resizes its crop to width x height, so both run on width x
        height; hires runs on the 2x image; the x4 upscaler on a latent as large as the input,
        with a lighter UNet; SDXL's UNet does `unet_flops_ratio` times SD's work per pixel."""
        pixels = self.width * self.height
        if self.x4:
            return pixels * _SD_PIXELS_PER_LATENT * X4_UNET_FLOPS_RATIO
        if self.kind is Kind.UPSCALE:
            return pixels * 2 * 2 * self.unet_flops_ratio
        return pixels * self.unet_flops_ratio

    @property
    def loras(self) -> int:
        """How many LoRA files the prompt's tags name (each is merged into the weights)."""
        return len({m.group(1).partition(":")[0].strip() for m in LORA_TAG.finditer(self.prompt)})

    @property
    def cost(self) -> float:
        """GPU cost in units of one 512x512 SD image-step: work pixels x UNet calls x images, plus
        `LORA_MERGE_UNITS` per LoRA, scaled like the UNet's work (a merge walks the weights, and an
        SDXL UNet holds about three times SD's)."""
        calls = self.denoising_steps * UNET_CALLS_PER_STEP.get(self.sampler, 1)
        merges = self.loras * LORA_MERGE_UNITS * self.unet_flops_ratio
        return self.count * calls * self.work_pixels / _UNIT_PIXELS + merges

    def seeds(self) -> list[int]:
        """Seed of each image: image i of a request with seed S uses S + i (the engine contract)."""
        return [self.seed + i for i in range(self.count)]


#: The /imagine aspect presets, width:height.
ASPECTS = ("1:1", "2:3", "3:2", "3:4", "4:3", "9:16", "16:9")


def aspect_size(aspect: str, native: int, family: str = "") -> tuple[int, int]:
    """Width and height of `aspect` with about the pixels of a native x native image, multiples of 64.
    SDXL families get the sizes SDXL was trained at (1024x1024, 896x1152, 832x1216, 768x1344 and
    the transposes): the short side rounded to 64, the long side the most that keeps the image
    within native x native pixels."""
    if aspect not in ASPECTS:
        raise ValueError(f"unknown aspect {aspect!r}; allowed: {', '.join(ASPECTS)}")
    a, b = (int(part) for part in aspect.split(":"))
    width, height = round_to_multiple(native * math.sqrt(a / b)), round_to_multiple(native * math.sqrt(b / a))
    if not family.startswith("sdxl") or a == b:
        return width, height
    if a < b:
        return width, native**2 // width // 64 * 64
    return native**2 // height // 64 * 64, height


def round_to_multiple(value: float, multiple: int = 64) -> int:
    """Nearest positive multiple of `multiple` (sizes must be latent- and UNet-aligned)."""
    return max(multiple, int(math.floor(value / multiple + 0.5)) * multiple)
