"""Tiles: run a function over overlapping tiles of a large input and blend the outputs with linear
ramps over the overlaps, so the VAE (and the upscaler's UNet) work in bounded memory at any size."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from models.stable_diffusion import StableDiffusion

#: Latent tile side and overlap: 128 latents are 512 pixels through an 8x VAE (the x4 upscaler's
#: 4x VAE: a 512-pixel output tile), small enough for any GPU, large enough for little overhead.
TILE, OVERLAP = 128, 32


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of side `tile` covering [0, size), neighbours overlapping >= `overlap`."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return [*starts, size - tile]


def _ramp(length: int, overlap: int, device: torch.device) -> Tensor:
    """Weights along one side of a tile: rising over the first `overlap`, falling over the last."""
    i = torch.arange(length, device=device, dtype=torch.float32)
    return torch.minimum((i + 1) / (overlap + 1), (length - i) / (overlap + 1)).clamp(max=1.0)  # (length,)


def tiled(fn: Callable[[slice, slice], Tensor], size: tuple[int, int], tile: int, overlap: int, scale: float) -> Tensor:
    """fn over overlapping tiles of an input of `size` (h, w), outputs (B, C, th * scale, tw *
    scale) blended with linear ramps into one (B, C, h * scale, w * scale). A pointwise fn gives
    exactly its untiled result (the weights are normalized)."""
    out = weight = None
    for top in tile_starts(size[0], tile, overlap):
        for left in tile_starts(size[1], tile, overlap):
            rows, cols = slice(top, top + tile), slice(left, left + tile)
            piece = fn(rows, cols)  # (B, C, th', tw')
            if out is None:
                shape = (*piece.shape[:2], round(size[0] * scale), round(size[1] * scale))
                out, weight = piece.new_zeros(shape), piece.new_zeros((1, 1, *shape[2:]))
            o = round(overlap * scale)
            w = _ramp(piece.shape[2], o, piece.device)[:, None] * _ramp(piece.shape[3], o, piece.device)[None]
            y, x = round(top * scale), round(left * scale)
            out[..., y : y + piece.shape[2], x : x + piece.shape[3]] += piece * w
            weight[..., y : y + piece.shape[2], x : x + piece.shape[3]] += w
    return out / weight


def decode_tiled(network: StableDiffusion, latents: Tensor, tile: int, overlap: int) -> Tensor:
    """VAE.decode(z / scale_factor) (B, 3, H, W), in latent tiles when larger than one tile."""
    z = latents.float() / network.family.scale_factor
    return tiled(lambda r, c: network.vae.decode(z[..., r, c]), z.shape[-2:], tile, overlap, network.vae_scale)


def encode_tiled(network: StableDiffusion, pixels: Tensor, tile: int, overlap: int) -> Tensor:
    """scale_factor * posterior mean (B, C, H/f, W/f), in pixel tiles when larger than one tile;
    tile and overlap in latents."""
    f = network.vae_scale

    def piece(rows: slice, cols: slice) -> Tensor:
        return network.vae.encode(pixels[..., rows, cols]).mean * network.family.scale_factor

    return tiled(piece, pixels.shape[-2:], tile * f, overlap * f, 1 / f)
