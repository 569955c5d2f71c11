"""`atelier bench engine`: how fast the native engine runs, beside diffusers when it is installed.

Random weights in the real SD 1.x / 2.x architectures (speed does not depend on the values):
per-step UNet time with classifier-free guidance (a UNet batch of 2B), full-image latency of a
txt2img run (text encoding, sampling, VAE decode), and peak VRAM. When diffusers is importable the
same UNet figures are taken for its UNet2DConditionModel of the same architecture in the same run,
and printed as ratios (ours / diffusers: below 1 is faster). diffusers is only a yardstick here;
the engine never imports it.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable

import torch

from generation.pipeline import LoadedModel, txt2img
from generation.request import SAMPLER_NAMES, GenerationRequest
from generation.schedules import DiscreteSchedule
from models.families import SD1, SD2_V, Family
from models.stable_diffusion import StableDiffusion

FAMILIES = {"sd1": SD1, "sd2": SD2_V}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atelier bench engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="default: float16 on CUDA, float32 on the CPU")
    parser.add_argument("--sizes", default="512,768", help="square image sides, comma-separated")
    parser.add_argument("--batches", default="1,4", help="images per batch, comma-separated")
    parser.add_argument("--steps", type=int, default=25, help="steps of the full-image run")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default="dpmpp_2m_karras")
    parser.add_argument("--iters", type=int, default=20, help="timed UNet calls per configuration")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers comparison")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    family = FAMILIES[args.family]
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    model = _random_model(family, device, dtype)
    reference = None if args.no_diffusers or not importlib.util.find_spec("diffusers") else _diffusers_unet(family, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.family} UNet, random weights, {dtype}, {name}, torch {torch.__version__}")
    header = f"{'size':>5} {'batch':>5} | {'UNet ms/step':>12} {'image s':>8} {'peak GiB':>8}"
    if reference is not None:
        header += f" | {'diffusers ms/step':>17} {'ratio':>6}"
    print(header)
    unets = [model.network.unet] + ([] if reference is None else [_diffusers_call(reference)])
    for size in sizes:
        for batch in batches:
            ours, *theirs = _unet_step_ms(unets, family, size, batch, device, dtype, args.iters)
            latency, peak = _image_latency(model, size, batch, args.steps, args.sampler)
            line = f"{size:>5} {batch:>5} | {ours:>12.2f} {latency:>8.2f} {peak:>8.2f}"
            if theirs:
                line += f" | {theirs[0]:>17.2f} {ours / theirs[0]:>6.2f}"
            print(line, flush=True)
    return 0


def _random_model(family: Family, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    with torch.device(device):
        network = StableDiffusion(family).to(dtype).eval().requires_grad_(False)
    network.first_stage_model.float()
    if device.type == "cuda":
        network.model.to(memory_format=torch.channels_last)
    schedule = DiscreteSchedule.linear(family.linear_start, family.linear_end, family.timesteps)
    return LoadedModel(f"random-{family.name}", network, schedule, "0000000000", device, dtype)


def _diffusers_unet(family: Family, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    sd2 = family.text.kind == "open_clip"
    config = dict(
        cross_attention_dim=family.unet.context_dim,
        attention_head_dim=[5, 10, 20, 20] if sd2 else 8,
        use_linear_projection=sd2,
    )
    with torch.device(device):
        unet = UNet2DConditionModel(**config).to(dtype).eval().requires_grad_(False)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    return unet


def _diffusers_call(unet: torch.nn.Module) -> Callable[..., torch.Tensor]:
    return lambda x, t, context: unet(x, t, encoder_hidden_states=context).sample


@torch.inference_mode()
def _unet_step_ms(
    unets: list[Callable[..., torch.Tensor]], family: Family, size: int, batch: int,
    device: torch.device, dtype: torch.dtype, iters: int,
) -> list[float]:
    """Median ms of one guided step (a UNet call on 2 x batch latents) of each UNet, their calls
    taken in turn so that whatever else loads the machine weighs on all of them alike."""
    side = size // 8
    x = torch.randn(2 * batch, family.unet.in_channels, side, side, device=device, dtype=dtype)
    t = torch.full((2 * batch,), 500.0, device=device)
    context = torch.randn(2 * batch, 77, family.unet.context_dim, device=device, dtype=dtype)
    for unet in unets:
        for _ in range(3):
            unet(x, t, context)
    times: list[list[float]] = [[] for _ in unets]
    for _ in range(iters):
        for unet, taken in zip(unets, times, strict=True):
            _sync(device)
            start = time.perf_counter()
            unet(x, t, context)
            _sync(device)
            taken.append((time.perf_counter() - start) * 1000)
    return [statistics.median(taken) for taken in times]


def _image_latency(model: LoadedModel, size: int, batch: int, steps: int, sampler: str) -> tuple[float, float]:
    """Seconds of one whole txt2img run of `batch` images, and the run's peak GiB on CUDA."""
    request = GenerationRequest(prompt="a lighthouse at dusk, oil painting", negative_prompt="blurry",
                                model=model.name, sampler=sampler, steps=steps, guidance=7.0, seed=1,
                                width=size, height=size, count=batch)
    txt2img(model, [request])  # warm-up: kernels, allocator
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    _sync(model.device)
    start = time.perf_counter()
    txt2img(model, [request])
    _sync(model.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(model.device) / 2**30 if model.device.type == "cuda" else float("nan")
    return seconds, peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
