"""Variations of a result: new seeds at a "subtle" or "strong" img2img strength, and the web UIs'
variation seed, which blends the start noise of two seeds for controlled txt2img variations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from generation.request import MAX_SEED, GenerationRequest, Kind
from generation.settings import GenerationSettings

Amount = Literal["subtle", "strong"]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation per image between noises a and b (B, C, h, w): keeps the norm a
    Gaussian draw has, where a straight mix would shrink it (and wash the image out)."""
    flat_a, flat_b = a.flatten(1), b.flatten(1)  # (B, N)
    cos = (flat_a / flat_a.norm(dim=1, keepdim=True) * flat_b / flat_b.norm(dim=1, keepdim=True)).sum(1)
    omega = cos.clamp(-1, 1).acos().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    so = omega.sin()
    mixed = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / so
    linear = (1 - t) * a + t * b  # (nearly) parallel noises: the limit of the formula
    return torch.where(so.abs() < 1e-6, linear, mixed)


def variation_noise(requests: Sequence[GenerationRequest], noise: torch.Tensor) -> torch.Tensor:
    """The start noise (B, C, h, w) of each image of each request: its seed's noise, slerped
    towards the noise of `variation_seed + i` (image i of the request, as seeds go) at
    `variation_strength` when the request names a variation seed."""
    rows, row = [], 0
    for request in requests:
        for i in range(request.count):
            own = noise[row : row + 1]  # (1, C, h, w)
            row += 1
            if request.variation_seed is None or request.variation_strength == 0:
                rows.append(own)
                continue
            generator = torch.Generator("cpu").manual_seed(request.variation_seed + i)
            other = torch.randn(own.shape, generator=generator, dtype=torch.float32).to(own)
            rows.append(slerp(own, other, request.variation_strength))
    return torch.cat(rows)


def variation_request(
    source: GenerationRequest, image: str, amount: Amount, seed: int, settings: GenerationSettings
) -> GenerationRequest:
    """The request for variations of one image of `source` (stored as sha256 `image`): the same
    prompt and settings, new seeds from `seed`, img2img at the configured subtle/strong strength."""
    strength = settings.variation_subtle_strength if amount == "subtle" else settings.variation_strong_strength
    changes = dict(
        kind=Kind.VARIATION,
        init_image=image,
        mask_image=None,
        strength=strength,
        seed=min(seed, MAX_SEED - source.count + 1),
        variation_seed=None,
        variation_strength=0.0,
    )
    return GenerationRequest.model_validate(source.model_dump() | changes)
