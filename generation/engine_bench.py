"""`atelier bench engine`: how fast the native engine runs, beside diffusers when it is installed.

Random weights in the real SD 1.x / 2.x / SDXL (base, refiner) architectures (speed does not
depend on the values; they are drawn directly in the run's dtype on the device, so SDXL's 3.5
billion parameters never exist in float32 on the way): per-step UNet time with classifier-free
guidance (a UNet batch of 2B), full-image latency of a txt2img run (text encoding, sampling, VAE
decode), and peak VRAM. When diffusers is importable the same UNet figures are taken for its
UNet2DConditionModel of the same architecture in the same run (for SDXL with
`addition_embed_type="text_time"`, given the pooled text and the size ids as `added_cond_kwargs`,
as ours gets its ADM vector), and printed as ratios (ours / diffusers: below 1 is faster).
diffusers is only a yardstick here; the engine never imports it.

With `--compile` the engine's compiled UNet (generation/compiled.py, as the bot runs it) is timed
beside its eager one: each shape's compile seconds (cold, or warm from the inductor cache when
`--cache-dir` is reused), the compiled step, the whole image and images/s; `--diffusers-compile`
compiles diffusers' UNet the same way for a like-for-like ratio. A second table then gives the
other compiled parts, as `[generation] compile_parts` runs them: the VAE decode per size and batch
and the text towers' encode of a batch's prompts and negative prompts (2 x batch chunks of 77
tokens through every tower, SDXL's pooled output included), eager against compiled ms: a part
whose compiled figure is no better belongs out of `compile_parts`. `--compile-parts` picks the
parts timed. `--fuse-projections off` times the original's separate attention projections (A/B
against the default fused ones); `--context-kv` prints instead what the text context's K/V
projections cost per UNet call (analytic, meta device: nothing runs). `--step-cache N` adds a
table of cached steps (`[generation] step_cache_interval`, approximate): ms per UNet call exact
and averaged over a cycle of one full call and N - 1 shallow ones, whole-image seconds exact and
cached, and the PSNR of the cached images against the exact ones of the same seeds; with
`--compile`, both through the compiled UNet. `--family tiny` is a small SD 1.x layout for
structure checks of the command on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from PIL import Image

from generation.compiled import (
    Bucketing,
    CompiledCall,
    Compiling,
    GraphKey,
    compiled_calls,
    describe_unet,
    text_key,
    torch_compiler,
    tower_calls,
    unet_key,
    vae_key,
)
from generation.pipeline import LoadedModel, half_decoder, resolve_vae_dtype, txt2img
from generation.request import SAMPLER_NAMES, GenerationRequest
from generation.schedules import DiscreteSchedule
from generation.settings import CompilePart
from generation.settings import GenerationSettings
from generation.step_cache import INTERVALS, UNetCalls
from models.families import SD1, SD2_V, SDXL, SDXL_REFINER, SIZE_KEY_VALUES, Family
from models.flops import context_projection_cost
from models.stable_diffusion import StableDiffusion

#: SD 1.x with two UNet levels of 32 and 64 channels, a 2x VAE and a 2-layer text tower: the
#: same code paths as the real thing, in milliseconds per step on a CPU.
TINY = replace(
    SD1,
    unet=replace(SD1.unet, model_channels=32, attention_resolutions=(2,), num_res_blocks=1, channel_mult=(1, 2),
                 context_dim=32),
    vae=replace(SD1.vae, ch=32, ch_mult=(1, 2), num_res_blocks=1),
    text=replace(SD1.text, width=32, layers=2, mlp_width=64),
)
FAMILIES = {"tiny": TINY, "sd1": SD1, "sd2": SD2_V, "sdxl": SDXL, "sdxl-refiner": SDXL_REFINER}


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
    parser.add_argument("--vae-dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="VAE decode precision, as [generation] vae_dtype (auto: float16 on CUDA)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the compiled UNet, then the compiled VAE decode and text towers "
                             "(generation/compiled.py)")
    parser.add_argument("--compile-mode", default=None,
                        choices=("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "default"),
                        help="torch.compile mode (default: reduce-overhead on CUDA, default on the CPU)")
    parser.add_argument("--compile-batches", choices=("buckets", "exact"), default="exact",
                        help="graph rows as [generation] compile_batches; buckets pad to 1,2,4,8 images")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="inductor cache folder: reuse it for the warm-restart compile figures")
    parser.add_argument("--diffusers-compile", action="store_true", help="also compile diffusers' UNet the same way")
    parser.add_argument("--compile-parts", default="unet,vae,text",
                        help="with --compile: the parts timed compiled, comma-separated, of unet, vae, text "
                             "(as [generation] compile_parts; without unet the UNet table is eager only)")
    parser.add_argument("--sdpa-backend", choices=("flash", "efficient", "cudnn", "math"), default=None,
                        help="attention kernel for every UNet (default: PyTorch picks per call)")
    fused = "on" if GenerationSettings.model_fields["fuse_projections"].default else "off"
    parser.add_argument("--fuse-projections", choices=("on", "off"), default=fused,
                        help=f"one GEMM for q/k/v and for the context's k/v, as [generation] fuse_projections "
                             f"(default {fused})")
    parser.add_argument("--step-cache", type=int, choices=INTERVALS[1:], default=None, metavar="N",
                        help="also time cached steps of interval N (2 to 5, as [generation] step_cache_interval) "
                             "against the exact path, with the PSNR of their images")
    parser.add_argument("--context-kv", action="store_true",
                        help="print what the context's K/V projections cost per UNet call (analytic) and exit")
    args = parser.parse_args(argv)
    if args.context_kv:
        return _context_kv(args)
    parts = tuple(dict.fromkeys(args.compile_parts.split(",")))
    if unknown := [part for part in parts if part not in get_args(CompilePart)]:
        parser.error(f"--compile-parts: unknown {', '.join(unknown)}; allowed: {', '.join(get_args(CompilePart))}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    family = FAMILIES[args.family]
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    mode = args.compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    if args.cache_dir is not None:
        cached = sum(1 for _ in args.cache_dir.rglob("*")) if args.cache_dir.exists() else 0
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.cache_dir.resolve())  # before anything compiles
        print(f"inductor cache {args.cache_dir}: {cached} files before this run ({'warm' if cached else 'cold'})")

    model = _random_model(family, device, dtype, resolve_vae_dtype(args.vae_dtype, device),
                          args.fuse_projections == "on")
    compiled = None
    if args.compile and "unet" in parts:
        compiled = CompiledCall(UNetCalls(model.network.unet), torch_compiler(mode), model=model.name, device=device,
                                mode=mode, bucketing=Bucketing(args.compile_batches))
    reference = None if args.no_diffusers or not importlib.util.find_spec("diffusers") else _diffusers_unet(family, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    vae = "float32" if model.vae_decoder is None else str(next(model.vae_decoder.parameters()).dtype)
    print(f"{args.family} UNet, random weights, {dtype} (VAE decode {vae}), {name}, torch {torch.__version__}, "
          f"SDPA {args.sdpa_backend or 'auto'}, fused projections {args.fuse_projections}"
          + (f", compile mode {mode}, {args.compile_batches} rows" if compiled else ""))
    columns = [("UNet ms/step", 12), ("image s", 8), ("images/s", 8)]
    if compiled:
        columns += [("compile s", 9), ("compiled ms", 11), ("x", 5), ("image s", 8), ("images/s", 8)]
    if reference is not None:
        columns += [("diffusers ms", 12), ("ratio", 6)]
        if args.diffusers_compile:
            columns += [("compile s", 9), ("compiled ms", 11), ("ratio", 6)]
    columns += [("peak GiB", 8)]
    print(f"{'size':>5} {'batch':>5} | " + " ".join(f"{title:>{width}}" for title, width in columns))
    reference_compiled = None
    if reference is not None and args.diffusers_compile:
        reference_compiled = torch.compile(_diffusers_call(reference, family), fullgraph=True, dynamic=False,
                                           mode=mode)
    with _attention(args.sdpa_backend):
        for size in sizes:
            for batch in batches:
                figures = _figures(model, compiled, reference, reference_compiled, size, batch, args)
                print(f"{size:>5} {batch:>5} | "
                      + " ".join(f"{value:>{width}.2f}" for value, (_, width) in zip(figures, columns, strict=True)),
                      flush=True)
    if args.step_cache is not None:
        step_cache_table(model, compiled, args.step_cache, sizes, batches, args)
    if args.compile and {"vae", "text"} & set(parts):
        parts_table(model, Compiling("on", mode, Bucketing(args.compile_batches), parts=parts), sizes, batches,
                    args.iters)
    return 0


@torch.inference_mode()
def parts_table(model: LoadedModel, compiling: Compiling, sizes: list[int], batches: list[int], iters: int) -> None:
    """Print eager against compiled ms of the VAE decode (per size and batch) and of the text
    encode (per batch), with each shape's compile seconds, `compiling`'s parts in the modes the
    engine gives them. Runs after the UNet table: compiling the text towers replaces their calls
    on the model, which the eager image figures must not see."""
    others = tuple(part for part in compiling.parts if part != "unet")  # the UNet has its own table
    parts = dataclasses.replace(compiling, parts=others).compile(model)
    network, device, bucketing = parts.network, parts.device, compiling.bucketing
    calls = list(compiled_calls(parts))
    modes = ", ".join(f"{c.status().part} {c.status().mode}" for c in calls)
    print(f"\nother parts, compiled ({modes}):")
    print(f"{'part':>5} {'size':>5} {'batch':>5} | {'eager ms':>9} {'compiled ms':>11} {'x':>5} {'compile s':>9}")
    eager_decode = network.vae.decode if parts.vae_decoder is None else parts.vae_decoder
    dtype = torch.float32 if parts.vae_decoder is None else next(parts.vae_decoder.parameters()).dtype
    for size in sizes:
        side = size // network.vae_scale
        for batch in batches:
            z = torch.randn(batch, network.latent_channels, side, side, device=device, dtype=dtype)
            key = vae_key(dataclasses.replace(bucketing, guided=False).rows(batch), network.latent_channels,
                          (side, side), dtype)
            seconds = _built(parts.vae_decode, [key])
            eager_ms, compiled_ms = _median_ms([lambda: eager_decode(z), lambda: parts.vae_decode(z)], device, iters)
            print(f"{'vae':>5} {size:>5} {batch:>5} | {eager_ms:>9.2f} {compiled_ms:>11.2f} "
                  f"{eager_ms / compiled_ms:>5.2f} {seconds:>9.2f}", flush=True)
    methods = tower_calls(network)
    for batch in batches:
        vocabulary = min(tower.config.vocab_size for tower, _ in methods)
        tokens = torch.randint(0, vocabulary, (2 * batch, 77), device=device)  # prompts and negative prompts
        key = text_key(bucketing.rows(2 * batch))
        seconds = sum(_built(getattr(tower, method), [key]) for tower, method in methods)

        def eager_text() -> list[torch.Tensor]:
            return [getattr(type(tower), method)(tower, tokens) for tower, method in methods]

        def compiled_text() -> list[torch.Tensor]:
            return [getattr(tower, method)(tokens) for tower, method in methods]

        eager_ms, compiled_ms = _median_ms([eager_text, compiled_text], device, iters)
        print(f"{'text':>5} {'':>5} {batch:>5} | {eager_ms:>9.2f} {compiled_ms:>11.2f} "
              f"{eager_ms / compiled_ms:>5.2f} {seconds:>9.2f}", flush=True)


def _built(call: CompiledCall, keys: list[GraphKey]) -> float:
    """Build the keys' graphs now: the seconds of those new to `call` (nan for one that failed)."""
    known = len(call.status().graphs)
    call.warm_up(keys)
    call.wait()
    return sum(float("nan") if g.seconds is None else g.seconds for g in call.status().graphs[known:])


def _context_kv(args: argparse.Namespace) -> int:
    """The context K/V projections' share of one guided UNet call at each size and batch."""
    print(f"{args.family} UNet, context K/V projections per call (77 tokens; analytic: FLOPs and kernels "
          f"counted on the meta device)")
    for size in (int(s) for s in args.sizes.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            c = context_projection_cost(FAMILIES[args.family].unet, size // 8, 2 * batch)
            print(f"{size}px, {2 * batch} rows: {c.flops / 1e9:.1f} of {c.total_flops / 1e9:.0f} GFLOP "
                  f"({c.flops / c.total_flops:.2%}); {c.gemms} GEMMs of {c.heavy_kernels} GEMM, convolution and "
                  f"attention kernels ({c.gemms / c.heavy_kernels:.1%}) and of {c.kernels} eager kernels "
                  f"({c.gemms / c.kernels:.1%}); they read {c.weight_bytes / 2**20:.0f} MiB of float16 weights")
    return 0


def _attention(backend: str | None) -> contextlib.AbstractContextManager:
    """Only `backend`'s SDPA kernel for the whole run, or PyTorch's own choice per call."""
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return sdpa_kernel(getattr(SDPBackend, names[backend]))


def _figures(model: LoadedModel, compiled: CompiledCall | None, reference: torch.nn.Module | None,
             reference_compiled: Callable[..., torch.Tensor] | None, size: int, batch: int,
             args: argparse.Namespace) -> list[float]:
    """One row of the table, in the order of its columns."""
    family, device, dtype = model.network.family, model.device, model.dtype
    unets: list[Callable[..., torch.Tensor]] = [model.network.unet]
    compile_s = []
    side = size // model.network.vae_scale
    if compiled is not None:
        rows = Bucketing(args.compile_batches).rows(2 * batch)
        key = unet_key(rows, family.unet.in_channels, (side, side), 77, family.unet.context_dim, dtype,
                       family.unet.adm_in_channels)
        compiled.warm_up([key])
        compiled.wait()
        (graph,) = [g for g in compiled.status().graphs if g.key == describe_unet(key)]
        compile_s.append(graph.seconds if graph.seconds is not None else float("nan"))
        unets.append(compiled)
    if reference is not None:
        unets.append(_diffusers_call(reference, family))
        if reference_compiled is not None:
            start = time.perf_counter()
            _unet_step_ms([reference_compiled], family, side, batch, device, dtype, 1)  # compiles
            compile_s.append(time.perf_counter() - start)
            unets.append(reference_compiled)
    ms = _unet_step_ms(unets, family, side, batch, device, dtype, args.iters)
    latency, peak, _ = _image_latency(model, size, batch, args.steps, args.sampler)
    figures = [ms[0], latency, batch / latency]
    if compiled is not None:
        compiled_latency, compiled_peak, _ = _image_latency(dataclasses.replace(model, unet=compiled), size, batch,
                                                         args.steps, args.sampler)
        peak = max(peak, compiled_peak)
        figures += [compile_s[0], ms[1], ms[0] / ms[1], compiled_latency, batch / compiled_latency]
    if reference is not None:
        theirs = ms[1 + (compiled is not None)]
        figures += [theirs, ms[0] / theirs]
        if reference_compiled is not None:
            figures += [compile_s[-1], ms[-1], (ms[1] if compiled is not None else ms[0]) / ms[-1]]
    return [*figures, peak]


def _random_model(family: Family, device: torch.device, dtype: torch.dtype,
                  vae_dtype: torch.dtype = torch.float32, fuse_projections: bool = True) -> LoadedModel:
    with torch.device("meta"):
        network = StableDiffusion(family)
    randomise(network, device, dtype)  # the same weights fused or not
    if fuse_projections:
        network.unet.fuse_projections()
    network.eval().requires_grad_(False)
    network.first_stage_model.float()
    if device.type == "cuda":
        network.model.to(memory_format=torch.channels_last)
    schedule = DiscreteSchedule.linear(family.linear_start, family.linear_end, family.timesteps)
    decoder = half_decoder(network, vae_dtype)
    return LoadedModel(f"random-{family.name}", network, schedule, "0000000000", device, dtype, vae_decoder=decoder)


def randomise(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
    """Give a module built on the meta device random tensors made directly in `dtype` on `device`:
    norm scales 1, biases 0, every other tensor N(0, 0.02) (activations keep their scale through
    the layers: no overflow, no denormals)."""
    generator = torch.Generator(device).manual_seed(seed)
    weights = {}
    for key, meta in module.state_dict().items():
        tensor = torch.empty(meta.shape, device=device, dtype=dtype)
        if key.endswith("bias"):
            tensor.zero_()
        elif meta.dim() == 1 and key.endswith("weight"):
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        weights[key] = tensor
    module.load_state_dict(weights, strict=True, assign=True)


def _diffusers_unet(family: Family, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel of `family`'s UNet architecture, random weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_config(family))
    randomise(unet, device, dtype)
    unet.eval().requires_grad_(False)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    return unet


def diffusers_config(family: Family) -> dict:
    """UNet2DConditionModel's arguments for `family`'s UNet: levels, heads, per-level transformer
    depths, and SDXL's "text_time" added conditioning."""
    u = family.unet
    levels = range(len(u.channel_mult))
    channels = [u.model_channels * m for m in u.channel_mult]
    attends = [2**level in u.attention_resolutions for level in levels]
    config = dict(
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        block_out_channels=channels,
        layers_per_block=u.num_res_blocks,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        # diffusers' `attention_head_dim` is the head COUNT per level (its historical misnomer)
        attention_head_dim=[u.heads(c)[0] for c in channels],
        # per level; the last entry is also the middle block's (the last level's own where it
        # attends: equal in every sgm family)
        transformer_layers_per_block=[max(1, u.input_depths[level * u.num_res_blocks]) for level in levels[:-1]]
        + [u.middle_depth],
        cross_attention_dim=u.context_dim,
        use_linear_projection=u.use_linear_in_transformer,
    )
    if u.adm_in_channels is not None:
        outdim = family.conditioner.outdim
        config |= dict(addition_embed_type="text_time", addition_time_embed_dim=outdim,
                       projection_class_embeddings_input_dim=u.adm_in_channels)
    return config


def _diffusers_call(unet: torch.nn.Module, family: Family) -> Callable[..., torch.Tensor]:
    """diffusers' UNet as ours is called, (x, t, context, y): for SDXL the ADM vector's pooled-text
    part becomes `text_embeds` and the first of its size features `time_ids` (diffusers embeds the
    size values itself; only the shapes matter here)."""
    if family.conditioner is None:
        return lambda x, t, context, y=None: unet(x, t, encoder_hidden_states=context).sample
    pooled = family.conditioner.texts[-1].projection_dim
    ids = sum(SIZE_KEY_VALUES[key] for key in family.conditioner.sizes)

    def call(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        added = {"text_embeds": y[:, :pooled], "time_ids": y[:, pooled : pooled + ids]}
        return unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample

    return call


@torch.inference_mode()
def step_cache_table(model: LoadedModel, compiled: CompiledCall | None, interval: int, sizes: list[int],
                     batches: list[int], args: argparse.Namespace) -> None:
    """Print what cached steps of `interval` save and cost at each size and batch: ms per guided
    UNet call exact, of the full call keeping the deep feature, of the shallow call, and per call
    over a cycle (one full, interval - 1 shallow); whole txt2img seconds exact and cached; the
    PSNR (dB, uint8 pixels, mean and worst image) of the cached images against the exact ones of
    the same seeds. Through `compiled` when given (its graphs built first)."""
    network, device, dtype = model.network, model.device, model.dtype
    family = network.family
    exact = model if compiled is None else dataclasses.replace(model, unet=compiled)
    cached = dataclasses.replace(exact, step_cache_interval=interval)
    calls = UNetCalls(network.unet) if compiled is None else compiled
    print(f"\ncached steps, interval {interval} ({'compiled' if compiled else 'eager'}; {args.steps} steps of "
          f"{args.sampler}; PSNR of the decoded images against the exact path, same seeds):")
    print(f"{'size':>5} {'batch':>5} | {'exact ms':>8} {'full ms':>8} {'shallow ms':>10} {'cached ms':>9} {'x':>5} | "
          f"{'exact s':>8} {'cached s':>8} {'x':>5} | {'PSNR dB':>7} {'worst':>6}")
    for size in sizes:
        side = size // network.vae_scale
        for batch in batches:
            if compiled is not None:
                keys = [unet_key(Bucketing(args.compile_batches).rows(2 * batch), family.unet.in_channels,
                                 (side, side), 77, family.unet.context_dim, dtype, family.unet.adm_in_channels, call,
                                 network.unet.deep_channels) for call in ("exact", "keep", "shallow")]
                _built(compiled, keys)
            x, t, context, y = _unet_inputs(family, side, batch, device, dtype)
            deep = calls(x, t, context, y, keep=True)[1]
            exact_ms, full_ms, shallow_ms = _median_ms(
                [lambda: calls(x, t, context, y), lambda: calls(x, t, context, y, keep=True),
                 lambda: calls(x, t, context, y, deep=deep)], device, args.iters)
            cycle_ms = (full_ms + (interval - 1) * shallow_ms) / interval
            exact_s, _, exact_images = _image_latency(exact, size, batch, args.steps, args.sampler)
            cached_s, _, cached_images = _image_latency(cached, size, batch, args.steps, args.sampler)
            psnr = [_psnr(a, b) for a, b in zip(exact_images, cached_images, strict=True)]
            print(f"{size:>5} {batch:>5} | {exact_ms:>8.2f} {full_ms:>8.2f} {shallow_ms:>10.2f} {cycle_ms:>9.2f} "
                  f"{exact_ms / cycle_ms:>5.2f} | {exact_s:>8.3f} {cached_s:>8.3f} {exact_s / cached_s:>5.2f} | "
                  f"{statistics.mean(psnr):>7.2f} {min(psnr):>6.2f}", flush=True)


def _psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB of b against a, 8-bit pixels (inf when equal)."""
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def _unet_inputs(family: Family, side: int, batch: int, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x, t, context, y) of one guided step of `batch` images (2 x batch UNet rows) at latent `side`."""
    x = torch.randn(2 * batch, family.unet.in_channels, side, side, device=device, dtype=dtype)
    t = torch.full((2 * batch,), 500.0, device=device)
    context = torch.randn(2 * batch, 77, family.unet.context_dim, device=device, dtype=dtype)
    adm = family.unet.adm_in_channels
    y = None if adm is None else torch.randn(2 * batch, adm, device=device, dtype=dtype)  # SDXL's ADM vector
    return x, t, context, y


@torch.inference_mode()
def _unet_step_ms(
    unets: list[Callable[..., torch.Tensor]], family: Family, side: int, batch: int,
    device: torch.device, dtype: torch.dtype, iters: int,
) -> list[float]:
    """Median ms of one guided step (a UNet call on 2 x batch latents of `side`) of each UNet."""
    x, t, context, y = _unet_inputs(family, side, batch, device, dtype)
    return _median_ms([lambda unet=unet: unet(x, t, context, y) for unet in unets], device, iters)


@torch.inference_mode()
def _median_ms(calls: list[Callable[[], object]], device: torch.device, iters: int) -> list[float]:
    """Median ms of each call after 3 warm-up calls, the calls taken in turn so that whatever else
    loads the machine weighs on all of them alike."""
    for call in calls:
        for _ in range(3):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(iters):
        for call, taken in zip(calls, times, strict=True):
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            taken.append((time.perf_counter() - start) * 1000)
    return [statistics.median(taken) for taken in times]


def _image_latency(model: LoadedModel, size: int, batch: int, steps: int,
                   sampler: str) -> tuple[float, float, list[Image.Image]]:
    """Seconds of one whole txt2img run of `batch` images, the run's peak GiB on CUDA, its images."""
    request = GenerationRequest(prompt="a lighthouse at dusk, oil painting", negative_prompt="blurry",
                                model=model.name, sampler=sampler, steps=steps, guidance=7.0, seed=1,
                                width=size, height=size, count=batch)
    txt2img(model, [request])  # warm-up: kernels, allocator
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    sync(model.device)
    start = time.perf_counter()
    (images,) = txt2img(model, [request])
    sync(model.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(model.device) / 2**30 if model.device.type == "cuda" else float("nan")
    return seconds, peak, images


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings must not end before the GPU does)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
