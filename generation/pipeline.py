"""txt2img: a batch of requests in, PIL images out, following the engine contract of issue 3.

Noise of image i of a request with seed S is randn((1, C, h, w), CPU generator seeded S + i,
float32), moved to the device; uncond is the negative prompt ("" when none) and guidance is
uncond + g * (cond - uncond) in one batched UNet call; decoding is VAE.decode(z / scale_factor)
and pixels = round(clamp((x + 1) / 2, 0, 1) * 255). Latents stay float32 whatever the weights'
precision, so a seed gives the same image in any batch and on any device up to kernel rounding.

`denoise` is the one sampling core every pipeline shares (txt2img here; img2img, inpaint, outpaint,
variations and upscale in their own modules); `run_batch` is the one entry point the runner calls.

Add-ons: a batch shares one LoRA set (the queue batches by it), merged into the weights in place
before the batch and kept until a batch asks for another set (`apply_loras`); `<lora:...>` tags
are removed from the prompts before encoding and embedding words become their vectors.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from generation import sdxl
from generation.addons import AddonError, AddonLibrary, file_hash
from generation.denoiser import GuidedDenoiser
from generation.images import ImageInputError
from generation.prompts import encode_prompts, lora_set, split_lora_tags
from generation.request import GenerationRequest, Kind
from generation.samplers import SAMPLERS, BatchNoise, Cancelled, Denoiser, Sampler
from generation.schedules import DiscreteSchedule, ddim_sigmas
from generation.settings import ModelSettings
from generation.step_cache import StepCache, SteppedUNet, UNetCalls
from generation.tiling import OVERLAP, TILE, decode_tiled
from generation.transfer import upload
from generation.variations import variation_noise
from models.families import Family
from models.loading import load_checkpoint
from models.lora import LoraMerge
from models.stable_diffusion import StableDiffusion

#: progress(step, total, x0 prediction (B, C, h, w)) after each sampler step.
Progress = Callable[[int, int, torch.Tensor], None]
#: inputs(sha256) -> the stored bytes of a request's `init_image` / `mask_image`.
Inputs = Callable[[str], bytes]
#: cancelled(i): whether request i of a batch was cancelled; asked before every UNet call.
IsCancelled = Callable[[int], bool]
#: Wraps the guided denoiser of a run (latent blending, tiling), given the run's start noise.
Wrap = Callable[[GuidedDenoiser, torch.Tensor], Denoiser]
#: Computes one of the values a run starts with (its text conditioning, its start noise).
Made = Callable[[], Any]


class Ahead:
    """What a batch's run starts with, made before the run: the runner has the batch queued behind
    the running one prepared between the running one's steps (`prepare_batch`), so the device
    finds its text encoding and start noise already queued. Each value is kept under a key of all
    it depends on and taken once; a run whose key was not prepared makes its own. The values of
    the last two preparations are kept: the running batch's (its later strength groups take
    theirs while the next batch is prepared) and the next one's."""

    def __init__(self) -> None:
        self._made: dict[tuple, Any] = {}
        self._earlier: dict[tuple, Any] = {}

    def prepare(self, values: Sequence[tuple[tuple, Made]]) -> None:
        """Make these values, dropping those of the preparation before the last (their batch ran
        or never will)."""
        self._earlier, self._made = self._made, {key: make() for key, make in values}

    def take(self, key: tuple, make: Made) -> Any:
        """The value made ahead under `key`, or `make()` now."""
        for made in (self._made, self._earlier):
            if key in made:
                return made.pop(key)
        return make()


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
    #: Decode in VAE tiles above this many output pixels (bounded memory, at a small cost in
    #: fidelity: the VAE's normalization then sees one tile at a time).
    vae_tile_above_pixels: int = 1024 * 1024
    #: SDXL: the refiner that finishes txt2img and img2img results, running `refiner_strength`
    #: of the steps (`generation.refiner`); loaded, cached and evicted with this model.
    refiner: LoadedModel | None = None
    refiner_strength: float = sdxl.DEFAULT_REFINER_STRENGTH
    #: The LoRA and embedding folders prompts may use (None: add-ons are refused).
    addons: AddonLibrary | None = None
    #: The LoRA set merged into `network`'s weights now.
    loras: LoraMerge = field(default_factory=LoraMerge, compare=False)
    #: The UNet calls of the pipelines when not the eager `UNetCalls(network.unet)` (compiled
    #: execution).
    unet: SteppedUNet | None = None
    #: A half-precision copy of the VAE's decoding half (post_quant_conv, decoder) that `decode`
    #: uses first; None decodes in float32 only.
    vae_decoder: nn.Module | None = None
    #: The next batch's text conditioning and start noise, made while this one runs.
    ahead: Ahead = field(default_factory=Ahead, compare=False)
    #: The VAE decode of `decode` when not the eager `vae_decoder` (or float32 VAE when there is
    #: none): compiled execution.
    vae_decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: Cached steps (`generation.step_cache`): every this many UNet calls of a run is full, the
    #: others shallow; 1 is the exact path. Runs on tiles (upscales) are never cached.
    step_cache_interval: int = 1

    @property
    def native_size(self) -> int:
        return self.network.family.native_size


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


def resolve_vae_dtype(vae_dtype: str, device: torch.device) -> torch.dtype:
    """"auto" is float16 on CUDA (decode overflows are caught and redone in float32) and float32
    on the CPU."""
    if vae_dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, vae_dtype)


def load_model(
    settings: ModelSettings,
    device: torch.device,
    dtype: torch.dtype,
    vae_tile_above_pixels: int = 1024 * 1024,
    short_hash: str | None = None,
    addons: AddonLibrary | None = None,
    vae_dtype: torch.dtype = torch.float32,
    fuse_projections: bool = True,
    step_cache_interval: int = 1,
) -> LoadedModel:
    """Load the checkpoint of `settings` onto `device`. The VAE stays float32: SD's VAE overflows
    float16 on some images and decodes them black; a half `vae_dtype` adds a copy of its decoding
    half in that dtype, which `decode` tries first. `short_hash`: the file's known `checkpoint_hash`;
    `addons`: the LoRA and embedding folders its prompts may use; `fuse_projections`: one GEMM
    for the attention projections that read the same input ([generation] fuse_projections);
    `step_cache_interval`: cached steps ([generation] step_cache_interval, 1: off)."""
    network = load_checkpoint(settings.checkpoint, settings.config, settings.prediction, device, dtype,
                              vae_dtype=torch.float32, fuse_projections=fuse_projections)
    if device.type == "cuda":
        network.model.to(memory_format=torch.channels_last)
    family = network.family
    schedule = DiscreteSchedule.linear(family.linear_start, family.linear_end, family.timesteps)
    short_hash = short_hash or checkpoint_hash(settings.checkpoint)
    decoder = half_decoder(network, vae_dtype)
    return LoadedModel(settings.name, network, schedule, short_hash, device, dtype, vae_tile_above_pixels,
                       addons=addons, vae_decoder=decoder, step_cache_interval=step_cache_interval)


def safe_vae_dtype(dtype: torch.dtype, family: Family) -> torch.dtype:
    """`dtype`, unless the family's VAE cannot decode in it (SDXL's overflows float16: every image
    would be decoded twice): then bfloat16, which has float32's range, where allowed, else float32."""
    if str(dtype).removeprefix("torch.") in family.vae_dtypes:
        return dtype
    return torch.bfloat16 if "bfloat16" in family.vae_dtypes else torch.float32


def half_decoder(network: StableDiffusion, dtype: torch.dtype) -> nn.Module | None:
    """The VAE's decode, post_quant_conv then decoder, copied in `dtype` made safe for the family
    (`safe_vae_dtype`); None when that is float32 (the float32 VAE stays for encoding and for images
    the copy cannot decode)."""
    dtype = safe_vae_dtype(dtype, network.family)
    if dtype == torch.float32:
        return None
    vae = network.vae
    return nn.Sequential(copy.deepcopy(vae.post_quant_conv), copy.deepcopy(vae.decoder)).to(dtype)


def checkpoint_hash(path: Path) -> str:
    """The web UIs' "Model hash": the first 10 hex digits of the file's sha256 (seconds for a
    multi-GB file: callers that reload a model keep it)."""
    return file_hash(path)[:10]


#: What the requests of one `run_batch` call share (the queue's batch key).
BATCH_KEY = ("model", "kind", "width", "height", "sampler", "steps")


def check_batch(requests: Sequence[GenerationRequest], key: tuple[str, ...] = (*BATCH_KEY, "strength")) -> None:
    """One UNet batch is one model, kind, size, sampler, step count, LoRA set and strength
    (strength decides where in the schedule sampling starts)."""
    first = requests[0]
    for request in requests[1:]:
        for name in key:
            if getattr(request, name) != getattr(first, name):
                raise ValueError(f"requests of one batch differ in {name}")
        if lora_set(request.prompt) != lora_set(first.prompt):
            raise ValueError("requests of one batch differ in their LoRAs")


def apply_loras(model: LoadedModel, requests: Sequence[GenerationRequest]) -> None:
    """Check the batch's add-on syntax and names, and merge its LoRA set into the model's weights
    (kept from the previous batch when it is the same set, restored exactly when it is none). The
    x4 upscaler takes no add-ons: upscaling an image made with a LoRA runs without it."""
    if requests[0].x4:
        model.loras.restore(model.network)
        return
    wanted = lora_set(requests[0].prompt)
    if model.addons is None:
        if wanted or any(split_lora_tags(r.prompt + r.negative_prompt)[1] for r in requests):
            raise AddonError("this bot has no LoRA folder configured: remove the <lora:...> tags")
        model.loras.restore(model.network)
        return
    listing = model.addons.loras()  # the folder read once for the whole batch
    for request in requests:
        model.addons.check_prompt(request.prompt, request.negative_prompt, listing)
    key = model.addons.lora_key(wanted, listing)
    if key != model.loras.applied:
        model.loras.apply(model.network, model.addons.loras_for(model.network, wanted, listing), key)


def run_batch(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    inputs: Inputs,
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
) -> list[list[Image.Image]]:
    """THE entry point for the runner: the images of each request, in order, for any `Kind`.

    The requests share the queue's batch key (model, kind, width, height, sampler, steps, LoRA
    set: merged into the weights first, see `apply_loras`); those
    of equal strength run as one UNet batch (strength decides where sampling starts, so requests
    of different strengths run one sub-batch after another). `inputs(sha256)` returns the stored
    bytes of each request's `init_image` / `mask_image`. Sizes: txt2img, img2img, variation and
    inpaint return width x height; outpaint's width x height is the extended canvas; upscale's
    width x height is the INPUT size and the result is larger (x4 upscaler: vae_scale times, 4 for
    real checkpoints; other checkpoints: twice). Raises `generation.images.ImageInputError`, whose
    message is for the user as is, for unusable input images, and `generation.samplers.Cancelled`
    once `cancelled(i)` is true for every request i. A request cancelled before that leaves the
    UNet batch at the next step (see `denoise`); its images are whatever its latents held, or
    none when every request of its strength was cancelled."""
    check_batch(requests, BATCH_KEY)
    apply_loras(model, requests)
    run = _pipeline(requests[0].kind, refined=model.refiner is not None)
    results: list[list[Image.Image]] = [[] for _ in requests]
    for indices in _by_strength(requests):
        part = None if cancelled is None else (lambda i, indices=indices: cancelled(indices[i]))
        try:
            images = run(model, [requests[i] for i in indices], inputs, progress, part)
        except Cancelled:
            if cancelled is None or all(cancelled(i) for i in range(len(requests))):
                raise
            continue  # only this strength's requests were cancelled: theirs stay without images
        for i, request_images in zip(indices, images, strict=True):
            results[i] = request_images
    return results


@torch.inference_mode()
def prepare_batch(model: LoadedModel, requests: Sequence[GenerationRequest]) -> None:
    """Queue a batch's text encoding and start noise on the device before its `run_batch` (which
    then takes them, see `Ahead`), while another batch still runs: only under the LoRA set merged
    now, since merging another would change the running batch's weights (that batch makes its own
    when it runs). Upscales are left alone: their latents are sized by their input images."""
    first = requests[0]
    check_batch(requests, BATCH_KEY)
    if first.kind is Kind.UPSCALE:
        return
    wanted = () if first.x4 else lora_set(first.prompt)
    if wanted and (model.addons is None or model.addons.lora_key(wanted) != model.loras.applied):
        return
    if not wanted and model.loras.applied:
        return
    size = latent_size(model, first)
    parts = [[requests[i] for i in indices] for indices in _by_strength(requests)]
    model.ahead.prepare([made(model, part, size) for part in parts for made in (_conditioning, _start_noise)])


def _by_strength(requests: Sequence[GenerationRequest]) -> list[list[int]]:
    """The indices of a batch's requests by strength, in order: each group samples as one UNet
    batch (strength decides where sampling starts)."""
    groups: dict[float | None, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request.strength, []).append(i)
    return list(groups.values())


def _pipeline(kind: Kind, refined: bool = False) -> Callable[..., list[list[Image.Image]]]:
    """The pipeline function of a kind: (model, requests, inputs, progress, cancelled) -> images;
    `refined`: the model has a refiner, which finishes txt2img and img2img."""
    # Imported here: these modules build on this one.
    from generation import img2img, inpaint, outpaint, refiner, upscale

    if refined and kind in (Kind.TXT2IMG, Kind.IMG2IMG):
        return refiner.finish
    if kind is Kind.TXT2IMG:
        return lambda model, requests, _inputs, progress, cancelled: txt2img(model, requests, progress, cancelled)

    return {
        Kind.IMG2IMG: img2img.img2img,
        Kind.VARIATION: img2img.img2img,
        Kind.INPAINT: inpaint.inpaint,
        Kind.OUTPAINT: outpaint.outpaint,
        Kind.UPSCALE: upscale.upscale,
    }[kind]


@torch.inference_mode()
def txt2img(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
) -> list[list[Image.Image]]:
    """The images of each request, in order; all requests run as one UNet batch."""
    return group(requests, decode(model, sample_latents(model, requests, progress, cancelled)))


def group(requests: Sequence[GenerationRequest], images: list[Image.Image]) -> list[list[Image.Image]]:
    """Split a batch's images, in order, into one list per request."""
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
    cancelled: IsCancelled | None = None,
) -> torch.Tensor:
    """The final txt2img latents (B, C, h, w), float32, of every image of every request, in order."""
    first = requests[0]
    if first.kind is not Kind.TXT2IMG:
        raise ValueError(f"txt2img cannot run a {first.kind} request")
    return denoise(model, requests, latent_size(model, first), progress=progress, cancelled=cancelled)


def denoise(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    latent_size: tuple[int, int],
    *,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    concat: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    wrap: Wrap | None = None,
    progress: Progress | None = None,
    cancelled: IsCancelled | None = None,
    leave: int = 0,
    noised: bool = False,
) -> torch.Tensor:
    """The sampling core of every pipeline: final latents (B, C, h, w), float32, one per image.

    init (B, C, h, w): clean latents x0 to start from at `strength` (img2img, see `start`);
    without it sampling starts from the seeds' noise. concat (B, c, h, w): extra UNet input
    channels (inpainting mask + masked latent, the upscaler's low-res image); labels (B,): the
    UNet's class input (the upscaler's noise level). wrap: replaces the guided denoiser.
    The images of a cancelled request leave the UNet batch at the next call, the others' latents
    come out as in a run without it;
    sampling stops once every request is cancelled.
    SDXL (a family with a conditioner) samples as sgm does (`generation.sdxl`). For a refiner
    (`generation.refiner`): leave the last `leave` steps undone, returning the VP latent where
    sampling stopped; `noised`: init is such a latent, continued without new noise."""
    check_batch(requests)
    first, network = requests[0], model.network
    per_image = [r for r in requests for _ in range(r.count)]
    cond, uncond, vector, vector_uncond = model.ahead.take(*_conditioning(model, requests, latent_size))
    sdxl_like = network.family.conditioner is not None
    sampler = sdxl.sampler(first.sampler) if sdxl_like else SAMPLERS[first.sampler]
    guidance = torch.tensor([r.guidance for r in per_image])  # (B,), read once by the denoiser
    noise, initial = model.ahead.take(*_start_noise(model, requests, latent_size))
    initial = variation_noise(requests, initial)  # (B, C, h, w)
    sigmas = sampler.sigmas(model.schedule, first.steps)
    if not sdxl_like:
        sigmas, x = start(sampler, sigmas, first.steps, initial, init, strength)
    else:
        sigmas, x = sdxl.start(sigmas, initial, init, strength, noised)
    if leave:
        sigmas = sigmas[: max(len(sigmas) - leave, 1)]
    owner = [i for i, r in enumerate(requests) for _ in range(r.count)]  # request of each image
    live = None if cancelled is None else (lambda: [row for row, i in enumerate(owner) if not cancelled(i)])
    if labels is not None:  # the x4 upscaler's noise levels: each row's class input, as SDXL's vectors
        vector = vector_uncond = labels
    step_cache = StepCache(model.step_cache_interval) if model.step_cache_interval > 1 else None
    guided = GuidedDenoiser(
        _unet_in(model), model.schedule, cond, uncond, guidance, network.family.prediction, concat, live,
        vector, vector_uncond, step_cache,
    )
    denoiser = guided if wrap is None else wrap(guided, initial)
    stop = None if live is None else (lambda: not live())  # every request has at least one image
    return sampler.sample(denoiser, x, sigmas, noise=noise, progress=progress, cancelled=stop)


def _conditioning(
    model: LoadedModel, requests: Sequence[GenerationRequest], latent_size: tuple[int, int]
) -> tuple[tuple, Made]:
    """(key, make) of the text conditioning (cond, uncond, vector, vector_uncond) of a batch's
    images: the key holds all it depends on (texts, counts, the merged LoRA set, SDXL's size)."""
    network, first = model.network, requests[0]
    per_image = [r for r in requests for _ in range(r.count)]
    key = ("conditioning", tuple((r.prompt, r.negative_prompt, r.count) for r in requests), model.loras.applied,
           first.x4, latent_size)
    if network.family.conditioner is None:
        addons = None if first.x4 else model.addons  # the x4 upscaler takes no add-ons (see apply_loras)
        return key, lambda: (*encode_conditioning(network, per_image, model.device, addons), None, None)
    pixels = (latent_size[0] * network.vae_scale, latent_size[1] * network.vae_scale)
    return key, lambda: sdxl.encode_conditioning(network, per_image, model.device, pixels, model.addons)


def _start_noise(
    model: LoadedModel, requests: Sequence[GenerationRequest], latent_size: tuple[int, int]
) -> tuple[tuple, Made]:
    """(key, make) of a batch's noise source and its start noise, (BatchNoise, (B, C, h, w)): the
    source's generators continue from where the start noise left them, for the later draws."""
    seeds = [seed for r in requests for seed in r.seeds()]

    def make() -> tuple[BatchNoise, torch.Tensor]:
        noise = BatchNoise(seeds, (model.network.latent_channels, *latent_size), model.device, torch.float32)
        return noise, noise.initial()

    return ("noise", tuple(seeds), latent_size), make


def start(
    sampler: Sampler,
    sigmas: torch.Tensor,
    steps: int,
    noise: torch.Tensor,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sigmas to sample, the VE start latent at their first level).

    Without init: the seeds' noise at the top of the schedule, as txt2img. With init, the img2img
    contract of issue 4: t_enc = max(1, int(strength * steps)) and the last t_enc steps, the tail
    sigmas[-(t_enc + 1):], are sampled. The start latent:
    - on the original's DDIM timesteps (`ddim`, `plms`), the original img2img script's, off-by-one
      included so results match it: DDIMSampler.stochastic_encode, sqrt(a) x0 + sqrt(1 - a) noise,
      at the level one ABOVE the tail (its ddim_timesteps[t_enc]), then denoised as if it were at
      the tail's first level (its decode starts at ddim_timesteps[t_enc - 1]);
    - on every other schedule, as the web UIs run k-diffusion img2img: x0 + tail[0] * noise.
    Strength 1 with no level above the tail is txt2img's pure-noise start."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    t_enc = max(1, int(strength * steps))
    original = sampler.spacing is ddim_sigmas
    if init is None or (original and t_enc + 1 >= len(sigmas)):
        return sigmas, noise * sampler.start_scale(float(sigmas[0]))
    tail = sigmas[-(t_enc + 1) :]
    first = float(tail[0])
    if not original:
        return tail, init + first * noise
    encode_sigma = float(sigmas[-(t_enc + 2)])
    vp = (init + encode_sigma * noise) / math.sqrt(1 + encode_sigma**2)  # stochastic_encode
    return tail, vp * math.sqrt(1 + first**2)


def encode_conditioning(
    network: StableDiffusion,
    per_image: Sequence[GenerationRequest],
    device: torch.device,
    addons: AddonLibrary | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond), each (B, 77k, D): every distinct prompt and negative prompt, without its
    `<lora:...>` tags, is encoded once, all in one text-encoder call, padded to a common chunk
    count; embedding words of `addons` become their vectors."""
    prompts = [split_lora_tags(r.prompt)[0] for r in per_image]
    texts = list(dict.fromkeys(t for p, r in zip(prompts, per_image) for t in (p, r.negative_prompt)))
    embeddings = addons.vectors_for(network, texts)[0] if addons is not None else {}
    encoded = encode_prompts(network.text_encoder, texts, device, embeddings)  # (U, 77k, D)
    row = {text: i for i, text in enumerate(texts)}
    cond = encoded[upload([row[p] for p in prompts], device)]
    uncond = encoded[upload([row[r.negative_prompt] for r in per_image], device)]
    return cond, uncond


def _unet_in(model: LoadedModel) -> SteppedUNet:
    """The UNet's calls (`UNetCalls`) taking float32 latents: inputs cast to the weights' dtype,
    output back to float32 (a kept deep feature stays in the weights' dtype, as the calls take
    it). y (N, ...): each UNet row's class input: SDXL's ADM vectors (cast with the weights, the
    dtype compiled graphs are keyed by) or the x4 upscaler's integer noise levels."""
    unet = UNetCalls(model.network.unet) if model.unet is None else model.unet

    def run(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
            deep: torch.Tensor | None = None, keep: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if y is not None and y.is_floating_point():
            y = y.to(model.dtype)
        out = unet(x.to(model.dtype), t, context.to(model.dtype), y=y, deep=deep, keep=keep)
        return (out[0].float(), out[1]) if keep else out.float()

    return run


def latent_size(model: LoadedModel, request: GenerationRequest) -> tuple[int, int]:
    """(h, w) of the latents of `request`'s images, whose sides must be multiples of the VAE's
    scale (an ImageInputError: the size comes from an uploaded image)."""
    f = model.network.vae_scale
    if request.width % f or request.height % f:
        raise ImageInputError(f"width and height must be multiples of {f} for this model")
    return request.height // f, request.width // f


def to_pixels(images: Sequence[Image.Image], device: torch.device) -> torch.Tensor:
    """RGB images of one size -> (B, 3, H, W) float32 x / 127.5 - 1, the original inpainting
    script's scaling (its img2img script's 2 x / 255 - 1 differs in the last bit at most)."""
    arrays = [torch.from_numpy(np.array(image.convert("RGB"))) for image in images]
    return (torch.stack(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(device)


def encode(network: StableDiffusion, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scale_factor * the VAE posterior's mean (B, C, H/f, W/f)."""
    return network.vae.encode(pixels.float()).mean * network.family.scale_factor


def decode(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
    """VAE.decode(z / scale_factor), then round(clamp((x + 1) / 2, 0, 1) * 255) per pixel; in
    tiles (float32) when the images are larger than `model.vae_tile_above_pixels`."""
    network, (h, w) = model.network, latents.shape[-2:]
    if h * w * network.vae_scale**2 > model.vae_tile_above_pixels:
        return to_images(decode_tiled(network, latents, TILE, OVERLAP))
    z = latents.float() / network.family.scale_factor
    if model.vae_decoder is None:
        return to_images((network.vae.decode if model.vae_decode is None else model.vae_decode)(z))
    half = model.vae_decoder if model.vae_decode is None else model.vae_decode
    x = half(z.to(next(model.vae_decoder.parameters()).dtype)).float()  # (B, 3, H, W)
    overflowed = ~torch.isfinite(x).flatten(1).all(dim=1)  # (B,)
    if overflowed.any():  # those images again in float32 (one read back per batch, after sampling)
        x[overflowed] = network.vae.decode(z[overflowed])
    return to_images(x)


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """Decoded images (B, 3, H, W) in about [-1, 1] -> PIL: round(clamp((x + 1) / 2, 0, 1) * 255),
    read back in one copy."""
    pixels = ((x + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return [Image.fromarray(p) for p in pixels.cpu().numpy()]
