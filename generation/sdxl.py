"""SDXL sampling as Stability-AI's `generative-models` (sgm) runs it, so that a seed gives its image.

- Sigmas: LegacyDDPMDiscretization (`schedules.legacy_ddpm_sigmas`) for every sampler but the
  `_karras` ones (Karras spacing, as the web UIs); `euler`
  is then sgm's EulerEDMSampler (s_churn 0) and `dpmpp_2m` its DPMPP2MSampler, both started from
  noise * sqrt(1 + sigma_0^2) as sgm's `prepare_sampling_loop` does.
- Conditioning: both text towers' hidden states side by side as the context; the ADM vector is
  the pooled bigG embedding, then Fourier features of original size (H, W), crop (0, 0) and
  target size (H, W) (base), or of original size, crop and aesthetic score (refiner: 6.0 for the
  prompt, 2.5 for the negative). An empty negative prompt on the base is sgm's
  `force_uc_zero_embeddings=["txt"]`: zero context and zero pooled, size features kept.
- img2img: Img2ImgDiscretizationWrapper (keep the lowest max(1, int(strength * (K + 1))) of the
  K + 1 sigmas), the start latent z0 + sigma_0 * noise.
- Refiner ("Finish denoising with refiner" of sgm's demo): p = clamp(int(r (K + 1)) - 1, 0, K);
  the base runs the first K - p steps (Txt2NoisyDiscretizationWrapper), the refiner the last p
  from the base's latent as it is (Img2ImgDiscretizationWrapper(r), no new noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch

from generation.addons import AddonLibrary
from generation.prompts import encode_prompts, encode_prompts_pooled, split_lora_tags
from generation.request import GenerationRequest
from generation.samplers import SAMPLERS, Sampler
from generation.schedules import karras_sigmas, legacy_ddpm_sigmas
from generation.transfer import upload
from models.stable_diffusion import StableDiffusion

#: sgm demo's aesthetic scores for the refiner: (prompt, negative prompt).
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5
#: `--refiner-strength` when none is given (sgm demo's "Refinement strength").
DEFAULT_REFINER_STRENGTH = 0.15


def sampler(name: str) -> Sampler:
    """The sampler `name` on sgm's sigmas, started from VP noise as sgm starts every sampler; a
    Karras sampler keeps its Karras spacing over the SDXL schedule's sigma range, as the web UIs
    run it (sgm has no Karras sampler to match)."""
    chosen = SAMPLERS[name]
    if chosen.spacing is karras_sigmas:
        return chosen
    return replace(chosen, spacing=legacy_ddpm_sigmas, vp_start=True)


def img2img_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """Img2ImgDiscretizationWrapper: the lowest max(1, int(strength * len(sigmas))) sigmas."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return sigmas[-max(int(strength * len(sigmas)), 1) :]


def refiner_steps(steps: int, strength: float) -> int:
    """p, the steps the refiner runs of a K-step schedule: clamp(int(r (K + 1)) - 1, 0, K)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"refiner strength must be in [0, 1], got {strength}")
    return min(max(int(strength * (steps + 1)) - 1, 0), steps)


def start(
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    init: torch.Tensor | None,
    strength: float,
    noised: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sigmas to sample, the VE start latent at their first level), as sgm starts them.

    Without init: txt2img, noise * sqrt(1 + sigma_0^2). With init (B, C, h, w): img2img on the
    Img2ImgDiscretizationWrapper's tail, init + tail_0 * noise; with `noised`, init is already the
    VP latent at tail_0 (the refiner's input) and is only rescaled: init * sqrt(1 + tail_0^2)."""
    if init is None:
        return sigmas, noise * math.sqrt(1 + float(sigmas[0]) ** 2)
    tail = img2img_sigmas(sigmas, strength)
    first = float(tail[0])
    if noised:
        return tail, init * math.sqrt(1 + first**2)
    return tail, init + first * noise


def sizes(
    keys: Sequence[str], height: int, width: int, count: int, aesthetic: float
) -> dict[str, torch.Tensor]:
    """The size conditioning of `count` images generated at height x width: original = target
    size = (height, width), crop (0, 0), the aesthetic score (refiner), as sgm's demo sets them."""
    values = {
        "original_size_as_tuple": [height, width],
        "crop_coords_top_left": [0, 0],
        "target_size_as_tuple": [height, width],
        "aesthetic_score": [aesthetic],
    }
    return {key: torch.tensor([values[key]] * count, dtype=torch.float32) for key in keys}


def encode_conditioning(
    network: StableDiffusion,
    per_image: Sequence[GenerationRequest],
    device: torch.device,
    size: tuple[int, int],
    addons: AddonLibrary | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cond, uncond) contexts (B, 77k, D) and ADM vectors (B, adm) of one SDXL batch generated
    at size = (height, width). Every distinct text, without its `<lora:...>` tags, is encoded
    once per tower; the pooled embedding is the bigG tower's for each text's first 77-token
    chunk, from the same run of that tower as its context. Embedding words of `addons` become
    each tower's own vectors (clip_l, clip_g), in the pooled embedding too."""
    conditioner = network.conditioner
    refiner = conditioner.config.refiner
    prompts = [split_lora_tags(r.prompt)[0] for r in per_image]
    texts = list(dict.fromkeys(t for p, r in zip(prompts, per_image) for t in (p, r.negative_prompt)))
    towers = conditioner.texts
    vectors = addons.vectors_for(network, texts) if addons is not None else [{} for _ in towers]
    contexts = [encode_prompts(t, texts, device, v) for t, v in zip(towers[:-1], vectors[:-1], strict=True)]
    last, pooled = encode_prompts_pooled(conditioner.pooled_tower, texts, device, vectors[-1])  # (U, 77k, D), (U, P)
    context = torch.cat([*contexts, last], dim=-1)
    row = {text: i for i, text in enumerate(texts)}
    cond_rows = upload([row[p] for p in prompts], device)
    uncond_rows = upload([row[r.negative_prompt] for r in per_image], device)
    cond, uncond = context[cond_rows], context[uncond_rows]
    pooled_cond, pooled_uncond = pooled[cond_rows], pooled[uncond_rows]
    if not refiner:  # sgm's zeroed unconditional text for an empty negative prompt
        zero = upload([r.negative_prompt == "" for r in per_image], device)
        uncond = torch.where(zero[:, None, None], torch.zeros_like(uncond), uncond)
        pooled_uncond = torch.where(zero[:, None], torch.zeros_like(pooled_uncond), pooled_uncond)
    b, keys = len(per_image), conditioner.config.sizes
    y_cond = conditioner.vector(pooled_cond, _on(sizes(keys, *size, b, AESTHETIC_SCORE), device))
    y_uncond = conditioner.vector(pooled_uncond, _on(sizes(keys, *size, b, NEGATIVE_AESTHETIC_SCORE), device))
    return cond, uncond, y_cond, y_uncond


def _on(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: upload(tensor, device) for key, tensor in tensors.items()}
