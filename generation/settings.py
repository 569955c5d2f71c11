"""Settings owned by `generation/`: the engine (`[generation]`), checkpoints (`[[models]]`) and the
queue (`[queue]`). Frozen pydantic models; `bot/config.py` reads the file and assembles them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from generation.request import ASPECTS, SamplerName

#: torch.compile modes; "reduce-overhead" and "max-autotune" replay CUDA graphs on CUDA.
CompileMode = Literal["reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "default"]
#: UNet batch rows padded up to the next bucket, or one graph per exact row count.
CompileBatches = Literal["buckets", "exact"]
#: The parts of a model that compile: the UNet, the VAE decode, the text towers.
CompilePart = Literal["unet", "vae", "text"]

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GenerationSettings(_Settings):
    """The engine: where it runs, in which precision, and the hard limits of any request."""

    #: "auto", "cpu", "cuda", "cuda:N", or a list of them (one GPU worker per entry).
    device: str | tuple[str, ...] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    default_steps: int = Field(default=25, ge=1)
    max_steps: int = Field(default=60, ge=1, le=1000)
    default_guidance: float = Field(default=7.0, ge=0.0, le=50.0)
    max_guidance: float = Field(default=20.0, ge=0.0, le=50.0)
    default_sampler: SamplerName = "dpmpp_2m_karras"
    #: Largest width x height of one image, and largest side, in pixels.
    max_pixels: int = Field(default=1024 * 1024, ge=64 * 64)
    max_side: int = Field(default=2048, ge=64, le=8192)
    default_count: int = Field(default=4, ge=1)
    #: At most 10: one Discord message carries at most 10 attachments.
    max_count: int = Field(default=4, ge=1, le=10)
    #: Decode latents in tiles above this many pixels, to bound VAE memory.
    vae_tile_above_pixels: int = Field(default=1024 * 1024, ge=64 * 64)
    #: img2img strength of the V buttons' "subtle" and "strong" variations.
    variation_subtle_strength: float = Field(default=0.35, gt=0.0, le=1.0)
    variation_strong_strength: float = Field(default=0.75, gt=0.0, le=1.0)
    #: Upscale without an x4 upscaler checkpoint: img2img strength of the "hires" pass over the
    #: Lanczos 2x image (low: add detail, keep the picture).
    hires_strength: float = Field(default=0.3, gt=0.0, le=1.0)
    #: Name of the `[[models]]` entry whose checkpoint is an x4 upscaler: the U buttons use it (4x
    #: each side) instead of hires 2x. It cannot draw, so it is never offered for anything else.
    upscaler: str | None = None
    #: The x4 run, which users cannot tune: guidance and noise level as the original demo (9, 20);
    #: 20 steps of a second-order multistep sampler stand in for its 50 DDIM steps, and matter,
    #: as its UNet runs on a latent as large as the input image.
    upscaler_sampler: SamplerName = "dpmpp_2m_karras"
    upscaler_steps: int = Field(default=20, ge=1, le=1000)
    upscaler_guidance: float = Field(default=9.0, ge=0.0, le=50.0)
    upscaler_noise_level: int = Field(default=20, ge=0, le=350)
    #: Largest input (width x height) the x4 upscaler takes; larger images are upscaled 2x by hires.
    #: The default admits every /imagine aspect of SD 1.x and 2.x results (at most 640x960).
    upscaler_max_input_pixels: int = Field(default=640 * 960, ge=64 * 64)
    #: Folders of LoRA (`<lora:NAME:WEIGHT>`) and textual-inversion files; re-read when they change.
    lora_dir: Path = Path("loras")
    embedding_dir: Path = Path("embeddings")
    #: Compiled graphs: "auto" compiles on CUDA and not on the CPU, "on" on any device, "off"
    #: never. Shapes without a ready graph run eagerly while it is built in the background.
    compile: Literal["auto", "on", "off"] = "auto"
    #: Which parts compile (when `compile` does): a part whose compiled figure in `atelier bench
    #: engine --compile` is no better belongs out of this list.
    compile_parts: tuple[CompilePart, ...] = ("unet", "vae", "text")
    #: torch.compile mode on CUDA (the CPU always uses "default": no CUDA graphs there).
    compile_mode: CompileMode = "reduce-overhead"
    compile_batches: CompileBatches = "buckets"
    #: Images per batch that get a graph ("buckets"): a batch runs padded to the next one.
    compile_buckets: tuple[int, ...] = (1, 2, 4, 8)
    #: Aspects (of the /imagine presets) at each model's native size whose graphs are built at
    #: load, in the background, for every bucket; () builds graphs only as jobs need them.
    compile_warmup: tuple[str, ...] = ("1:1",)
    #: Graphs each part of one loaded model may hold; further shapes (odd upload sizes) run eagerly.
    compile_max_graphs: int = Field(default=32, ge=1)
    #: VAE decode precision: "auto" is float16 on CUDA (an image that overflows it is decoded
    #: again in float32) and float32 on the CPU.
    vae_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    #: One GEMM for the attention projections that read the same input (self-attention's q, k, v;
    #: cross-attention's k, v of the text): the same math up to GEMM rounding, 5 projection GEMMs
    #: per transformer block instead of 8. Off runs the original's separate projections.
    fuse_projections: bool = True
    #: Cached steps (DeepCache), approximate and opt-in: of a run's UNet calls every this many is
    #: full and the calls between run only the UNet's shallow blocks on the deep feature the full
    #: one kept. 1 is off: the exact path, the original repositories' image for a seed. 2 to 5
    #: trade detail for speed (`atelier bench engine --step-cache N` prints both); the PNG
    #: metadata says "Step cache: N". Upscales (tiled) are never cached.
    step_cache_interval: int = Field(default=1, ge=1, le=5)

    @field_validator("device")
    @classmethod
    def _valid_devices(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        for device in (value,) if isinstance(value, str) else value:
            if not _DEVICE.match(device):
                raise ValueError(f"{device!r} is not a device; allowed: auto, cpu, cuda, cuda:N")
        if isinstance(value, tuple) and not value:
            raise ValueError("the device list is empty; allowed: auto, cpu, cuda, cuda:N")
        return value

    @field_validator("compile_buckets")
    @classmethod
    def _valid_buckets(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(b < 1 for b in value):
            raise ValueError(f"compile_buckets must be image counts >= 1, got {list(value)}")
        return tuple(sorted(set(value)))

    @field_validator("compile_parts")
    @classmethod
    def _distinct_parts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(value))

    @field_validator("compile_warmup")
    @classmethod
    def _valid_aspects(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for aspect in value:
            if aspect not in ASPECTS:
                raise ValueError(f"compile_warmup: unknown aspect {aspect!r}; allowed: {', '.join(ASPECTS)}")
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> GenerationSettings:
        """Defaults and the upscaler's settings (which members do not choose) within the hard limits
        every request is checked against."""
        pairs = [("default_steps", "max_steps"), ("default_count", "max_count"), ("default_guidance", "max_guidance")]
        if self.upscaler is not None:
            pairs += [("upscaler_steps", "max_steps"), ("upscaler_guidance", "max_guidance")]
        for value, limit in pairs:
            if getattr(self, value) > getattr(self, limit):
                raise ValueError(f"{value} ({getattr(self, value):g}) exceeds {limit} ({getattr(self, limit):g})")
        return self

    @property
    def devices(self) -> tuple[str, ...]:
        """The configured devices as a tuple (one runner worker each)."""
        return (self.device,) if isinstance(self.device, str) else self.device


class ModelSettings(_Settings):
    """One `[[models]]` entry: a single-file checkpoint users can pick by name."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    checkpoint: Path
    #: The original inference YAML (v1-inference.yaml, v2-inference-v.yaml...); detected if absent.
    config: Path | None = None
    #: Overrides the detected prediction type of SD 2.x checkpoints.
    prediction: Literal["epsilon", "v"] | None = None
    default: bool = False
    #: SDXL: the name of a configured SDXL refiner that finishes this model's txt2img and img2img
    #: images, running `refiner_strength` of their steps (sgm's demo; see generation/refiner.py).
    refiner: str | None = None
    refiner_strength: float = Field(default=0.15, ge=0.0, le=1.0)


def check_models(models: tuple[ModelSettings, ...]) -> tuple[ModelSettings, ...]:
    """Names are unique, at most one model is the default, and refiners name other models."""
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
    defaults = [m.name for m in models if m.default]
    if len(defaults) > 1:
        raise ValueError(f"at most one model may be the default; found {', '.join(defaults)}")
    for model in models:
        if model.refiner is not None and (model.refiner == model.name or model.refiner not in names):
            raise ValueError(
                f"model {model.name}: refiner {model.refiner!r} must name another [[models]] entry; "
                f"configured: {', '.join(names)}"
            )
    return models


def check_upscaler(upscaler: str | None, models: tuple[ModelSettings, ...]) -> None:
    """The upscaler is a configured model, not the default one, and not the only one: it cannot draw."""
    if upscaler is None:
        return
    names = [m.name for m in models]
    if upscaler not in names:
        configured = f"configured: {', '.join(names)}" if names else "no [[models]] are configured"
        raise ValueError(f"generation.upscaler: {upscaler!r} is not a [[models]] name; {configured}")
    if any(m.default and m.name == upscaler for m in models):
        raise ValueError(f"generation.upscaler: {upscaler!r} is marked default = true, but an upscaler cannot "
                         "draw; mark another [[models]] entry as the default")
    if names == [upscaler]:
        raise ValueError(f"generation.upscaler: {upscaler!r} is the only model, and an upscaler cannot draw; "
                         "add a [[models]] entry with an SD 1.x or 2.x checkpoint")


def default_model(models: tuple[ModelSettings, ...], upscaler: str | None = None) -> ModelSettings | None:
    """The model marked default, else the first configured one that is not the `upscaler`."""
    drawing = [m for m in models if m.name != upscaler]
    return next((m for m in drawing if m.default), drawing[0] if drawing else None)


class QueueSettings(_Settings):
    """The fair-share queue and the GPU runner."""

    #: Queued (not yet running) jobs one user may have.
    max_queued_per_user: int = Field(default=5, ge=1)
    #: Jobs of one user running at once, across all GPUs.
    max_running_per_user: int = Field(default=1, ge=1)
    #: Queued jobs across everyone; submissions past it are refused.
    max_queued_total: int = Field(default=500, ge=1)
    #: Images one GPU batch may hold (the runner lowers it when VRAM is short).
    max_batch_images: int = Field(default=8, ge=1, le=64)
    #: Seconds one job may run before it is stopped and failed.
    job_timeout_s: float = Field(default=600.0, gt=0)
    #: Seconds a running batch may take to finish at shutdown before it is left for restart; then
    #: as long again for finished results to be posted (the rest are posted at the next start).
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    #: Fair-share weight by Discord role name (default weight 1).
    role_weights: dict[str, float] = Field(default_factory=dict)

    @field_validator("role_weights")
    @classmethod
    def _positive_weights(cls, value: dict[str, float]) -> dict[str, float]:
        for role, weight in value.items():
            if weight <= 0:
                raise ValueError(f"role weight of {role!r} must be > 0, got {weight}")
        return value
