"""UNet work per latent pixel, counted from a UNet's config rather than assumed from its family
name: the distilled SDXL models (SSD-1B, Vega) are "sdxl" by family and do far less work. Also
what one part of a call costs (`context_projection_cost`), to decide whether it is worth saving."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from models.families import SD1, UNetConfig
from models.unet import UNetModel

#: The cost unit's latent side: SD 1.x at 512x512.
SD_UNIT_LATENT = 64


def unet_flops_per_latent_pixel(config: UNetConfig, latent_side: int) -> float:
    """FLOPs of one UNet call on one square `latent_side` latent, per latent pixel, with one
    77-token text chunk: counted by `FlopCounterMode` over a UNet built on the meta device (no
    memory, no compute; about a second for SDXL)."""
    with torch.device("meta"), torch.no_grad():
        unet = UNetModel(config)
        with FlopCounterMode(display=False) as counter:
            unet(*_inputs(config, latent_side, 1, 77))
    return counter.get_total_flops() / latent_side**2


def _inputs(config: UNetConfig, latent_side: int, rows: int, tokens: int) -> tuple[torch.Tensor, ...]:
    """(x, timesteps, context, y) of a UNet call, zeros on the current device."""
    y = None
    if config.num_classes is not None:  # the x4 upscaler's noise levels
        y = torch.zeros(rows, dtype=torch.long)
    elif config.adm_in_channels is not None:  # SDXL's ADM vector
        y = torch.zeros(rows, config.adm_in_channels)
    x = torch.zeros(rows, config.in_channels, latent_side, latent_side)
    return x, torch.zeros(rows), torch.zeros(rows, tokens, config.context_dim), y


def unet_flops_ratio(config: UNetConfig, latent_side: int) -> float:
    """What `GenerationRequest.unet_flops_ratio` charges a checkpoint whose UNet is `config`: for
    an SDXL-type UNet (an ADM vector input) its work per latent pixel at `latent_side` (its native
    resolution) over SD 1.x's at the 512x512 cost unit: 2.10 for SDXL's base at 1024x1024, 2.27
    for its refiner, 1.31 for an SSD-1B layout. SD 1.x/2.x are the unit itself (1.0), and the x4
    upscaler is charged by `generation.request.X4_UNET_FLOPS_RATIO`."""
    if config.adm_in_channels is None:
        return 1.0
    return unet_flops_per_latent_pixel(config, latent_side) / unet_flops_per_latent_pixel(SD1.unet, SD_UNIT_LATENT)


@dataclass(frozen=True)
class ContextProjections:
    """What projecting the text context to K and V costs in one UNet call: the work a per-request
    K/V cache would save (the context is the same at every step)."""

    flops: float  # of the context's K and V projections
    total_flops: float  # of the whole call
    gemms: int  # context K/V GEMMs: 2 per layer that attends to the context (1 fused)
    heavy_kernels: int  # GEMMs, convolutions and attention: the kernels compiling cannot fuse away
    kernels: int  # kernels of the eager call (one launch each)
    weight_bytes: float  # of the K/V weights the GEMMs read, in float16


class _KernelCount(TorchDispatchMode):
    """Counts the kernels of a call as a GPU runs it eagerly: its aten ops less views and
    `_unsafe_view`s (metadata only), attention counted once (the meta device runs it as
    bmm-softmax-bmm; CUDA as one fused kernel); and the heavy ones among them."""

    HEAVY = ("mm", "addmm", "convolution")
    ATTENTION = ("_safe_softmax", "_softmax")
    NOT_KERNELS = ("_unsafe_view", "bmm")  # bmm: the math attention's halves

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.heavy = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        if not func.is_view and name not in self.NOT_KERNELS:
            self.kernels += 1
            self.heavy += name in self.HEAVY or name in self.ATTENTION
        return func(*args, **(kwargs or {}))


def context_projection_cost(config: UNetConfig, latent_side: int, rows: int, tokens: int = 77) -> ContextProjections:
    """`ContextProjections` of one (unfused) UNet call on `rows` square `latent_side` latents with
    a `tokens`-long context (rows = 2 x images with guidance), counted on the meta device."""
    with torch.device("meta"), torch.no_grad():
        unet = UNetModel(config)
        x, timesteps, context, y = _inputs(config, latent_side, rows, tokens)
        read_context: list[nn.Linear] = []  # the to_k / to_v layers called on the context
        for name, module in unet.named_modules():
            if name.endswith((".to_k", ".to_v")):
                module.register_forward_pre_hook(lambda m, args: read_context.append(m) if args[0] is context else None)
        with FlopCounterMode(display=False) as counter, _KernelCount() as kernels:
            unet(x, timesteps, context, y)
    weights = sum(m.weight.numel() for m in read_context)
    return ContextProjections(2.0 * rows * tokens * weights, counter.get_total_flops(), len(read_context),
                              kernels.heavy, kernels.kernels, 2.0 * weights)
