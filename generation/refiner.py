"""SDXL's two-stage pipeline with its refiner, as sgm's demo runs "Finish denoising with refiner":
the base samples all but the last p steps of the K-step schedule, the refiner samples those p
steps from the base's latent as it is, and the refiner's VAE decodes (see `generation.sdxl`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from generation import sdxl
from generation.img2img import init_latents, strength_of
from generation.pipeline import (
    Inputs, IsCancelled, LoadedModel, Progress, decode, denoise, group, latent_size
)
from generation.request import GenerationRequest, Kind
from models.families import refines


def check_pair(base: LoadedModel, refiner: LoadedModel) -> None:
    """A refiner continues the base's latents: both SDXL, the second a refiner, same latent space."""
    names = (base.network.family.name, refiner.network.family.name)
    if not refines(*names):
        raise ValueError(f"a refiner pipeline needs an SDXL base and an SDXL refiner, got {names[0]} and {names[1]}")
    if base.network.vae_scale != refiner.network.vae_scale or base.network.latent_channels != refiner.network.latent_channels:
        raise ValueError(f"{base.name} and {refiner.name} have different latent spaces")


def finish(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    inputs: Inputs,
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
) -> list[list[Image.Image]]:
    """`refined` by the model's configured refiner (`LoadedModel.refiner`): run_batch's pipeline
    for txt2img and img2img when the model has one."""
    if model.refiner is None:
        raise ValueError(f"{model.name} has no refiner")
    return refined(model, model.refiner, requests, inputs, model.refiner_strength, progress, cancelled)


@torch.inference_mode()
def refined(
    base: LoadedModel,
    refiner: LoadedModel,
    requests: Sequence[GenerationRequest],
    inputs: Inputs,
    strength: float = sdxl.DEFAULT_REFINER_STRENGTH,
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
) -> list[list[Image.Image]]:
    """The images of each txt2img or img2img request (one batch), finished by the refiner: p =
    clamp(int(strength (K + 1)) - 1, 0, K) of the K steps run on the refiner, whose VAE decodes."""
    latents = refined_latents(base, refiner, requests, inputs, strength, progress, cancelled)
    return group(requests, decode(refiner, latents))


@torch.inference_mode()
def refined_latents(
    base: LoadedModel,
    refiner: LoadedModel,
    requests: Sequence[GenerationRequest],
    inputs: Inputs,
    strength: float = sdxl.DEFAULT_REFINER_STRENGTH,
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
) -> torch.Tensor:
    """The final latents (B, C, h, w), float32, of `refined`."""
    check_pair(base, refiner)
    first = requests[0]
    if first.kind not in (Kind.TXT2IMG, Kind.IMG2IMG):
        raise ValueError(f"the refiner finishes txt2img and img2img, not {first.kind}")
    size = latent_size(base, first)
    leave = sdxl.refiner_steps(first.steps, strength)
    init, init_strength = None, 1.0
    if first.kind is Kind.IMG2IMG:
        init_strength = strength_of(requests)
        init = init_latents(base, requests, inputs)
    latents = denoise(
        base, requests, size, init=init, strength=init_strength, leave=leave,
        progress=progress, cancelled=cancelled,
    )
    if not leave:
        return latents
    return denoise(
        refiner, requests, size, init=latents.to(refiner.device), strength=strength, noised=True,
        progress=progress, cancelled=cancelled,
    )
