"""txt2img: a batch of requests in, PIL images out, following the engine contract of issue 3.

Noise of image i of a request with seed S is randn((1, C, h, w), CPU generator seeded S + i,
float32), moved to the device; uncond is the negative prompt ("" when none) and guidance is
uncond + g * (cond - uncond) in one batched UNet call; decoding is VAE.decode(z / scale_factor)
and pixels = round(clamp((x + 1) / 2, 0, 1) * 255). Latents stay float32 whatever the weights'
precision, so a seed gives the same image in any batch and on any device up to kernel rounding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from generation.denoiser import GuidedDenoiser
from generation.prompts import encode_prompts
from generation.request import GenerationRequest, Kind
from generation.samplers import SAMPLERS, BatchNoise
from generation.schedules import DiscreteSchedule
from generation.settings import ModelSettings
from models.loading import load_checkpoint
from models.stable_diffusion import StableDiffusion

#: progress(step, total, x0 prediction (B, C, h, w)) after each sampler step.
Progress = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint ready to sample on one device, with what the PNG metadata names it by."""

    name: str
    network: StableDiffusion
    schedule: DiscreteSchedule
    #: The web UIs' "Model hash": the first 10 hex digits of the file's sha256.
    short_hash: str
    device: torch.device
    dtype: torch.dtype

    @property
    def native_size(self) -> int:
        """The side the family was trained at: 768 for SD 2.x v-prediction, else 512; scaled
        down with the VAE for tiny test checkpoints (whose VAE downsamples less than 8x)."""
        side = 768 if self.network.family.prediction == "v" and self.network.family.text.kind == "open_clip" else 512
        return side * self.network.vae_scale // 8


def resolve_device(device: str) -> torch.device:
    """"auto" is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" is float16 on CUDA and float32 on the CPU (where half precision is slow)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(settings: ModelSettings, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load the checkpoint of `settings` onto `device`. The VAE stays float32: SD's VAE overflows
    float16 on some images and decodes them black."""
    network = load_checkpoint(settings.checkpoint, settings.config, settings.prediction, device, dtype)
    network.first_stage_model.float()
    if device.type == "cuda":
        network.model.to(memory_format=torch.channels_last)
    family = network.family
    schedule = DiscreteSchedule.linear(family.linear_start, family.linear_end, family.timesteps)
    return LoadedModel(settings.name, network, schedule, _short_hash(settings.checkpoint), device, dtype)


def _short_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()[:10]


def check_batch(requests: Sequence[GenerationRequest]) -> None:
    """One batch is one model, kind, size, sampler and step count (the queue's batch key)."""
    first = requests[0]
    for request in requests[1:]:
        for field in ("model", "kind", "width", "height", "sampler", "steps"):
            if getattr(request, field) != getattr(first, field):
                raise ValueError(f"requests of one batch differ in {field}")


@torch.inference_mode()
def txt2img(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> list[list[Image.Image]]:
    """The images of each request, in order; all requests run as one UNet batch."""
    images = decode(model.network, sample_latents(model, requests, progress, cancelled))
    grouped, start = [], 0
    for request in requests:
        grouped.append(images[start : start + request.count])
        start += request.count
    return grouped


@torch.inference_mode()
def sample_latents(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """The final latents (B, C, h, w), float32, of every image of every request, in order."""
    check_batch(requests)
    first = requests[0]
    if first.kind is not Kind.TXT2IMG:
        raise ValueError(f"txt2img cannot run a {first.kind} request")
    network, f = model.network, model.network.vae_scale
    if first.width % f or first.height % f:
        raise ValueError(f"width and height must be multiples of {f} for this model")

    per_image = [r for r in requests for _ in range(r.count)]
    seeds = [seed for r in requests for seed in r.seeds()]
    cond, uncond = encode_conditioning(network, per_image, model.device)
    guidance = torch.tensor([r.guidance for r in per_image], device=model.device)
    sampler = SAMPLERS[first.sampler]
    sigmas = sampler.sigmas(model.schedule, first.steps)
    noise = BatchNoise(seeds, (network.latent_channels, first.height // f, first.width // f), model.device, torch.float32)
    x = noise.initial() * sampler.start_scale(float(sigmas[0]))
    denoiser = GuidedDenoiser(_unet_in(model), model.schedule, cond, uncond, guidance, network.family.prediction)
    return sampler.sample(denoiser, x, sigmas, noise=noise, progress=progress, cancelled=cancelled)


def encode_conditioning(
    network: StableDiffusion, per_image: Sequence[GenerationRequest], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond), each (B, 77k, D): every distinct prompt and negative prompt is encoded once,
    all in one text-encoder call, padded to a common chunk count."""
    texts = list(dict.fromkeys(t for r in per_image for t in (r.prompt, r.negative_prompt)))
    encoded = encode_prompts(network.text_encoder, texts, device)  # (U, 77k, D)
    row = {text: i for i, text in enumerate(texts)}
    cond = encoded[[row[r.prompt] for r in per_image]]
    uncond = encoded[[row[r.negative_prompt] for r in per_image]]
    return cond, uncond


def _unet_in(model: LoadedModel) -> Callable[..., torch.Tensor]:
    """The UNet taking float32 latents: inputs cast to the weights' dtype, output back to float32."""
    unet = model.network.unet

    def run(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return unet(x.to(model.dtype), t, context.to(model.dtype)).float()

    return run


def decode(network: StableDiffusion, latents: torch.Tensor) -> list[Image.Image]:
    """VAE.decode(z / scale_factor), then round(clamp((x + 1) / 2, 0, 1) * 255) per pixel."""
    x = network.vae.decode(latents.float() / network.family.scale_factor)  # (B, 3, H, W)
    pixels = ((x + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
