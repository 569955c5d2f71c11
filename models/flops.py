"""UNet work per latent pixel, counted from a UNet's config rather than assumed from its family
name: the distilled SDXL models (SSD-1B, Vega) are "sdxl" by family and do far less work."""

from __future__ import annotations

import torch
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
        x = torch.zeros(1, config.in_channels, latent_side, latent_side)
        context = torch.zeros(1, 77, config.context_dim)
        y = torch.zeros(1, config.adm_in_channels) if config.adm_in_channels else None
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.zeros(1), context, y=y)
    return counter.get_total_flops() / latent_side**2


def unet_flops_ratio(config: UNetConfig, latent_side: int) -> float:
    """What `GenerationRequest.unet_flops_ratio` charges a checkpoint whose UNet is `config`: for
    an SDXL-type UNet (an ADM vector input) its work per latent pixel at `latent_side` (its native
    resolution) over SD 1.x's at the 512x512 cost unit: 2.10 for SDXL's base at 1024x1024, 2.27
    for its refiner, 1.31 for an SSD-1B layout. SD 1.x/2.x are the unit itself (1.0), and the x4
    upscaler is charged by `generation.request.X4_UNET_FLOPS_RATIO`."""
    if config.adm_in_channels is None:
        return 1.0
    return unet_flops_per_latent_pixel(config, latent_side) / unet_flops_per_latent_pixel(SD1.unet, SD_UNIT_LATENT)
