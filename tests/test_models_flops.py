"""models/flops.py's count of the text context's K/V projections in a UNet call, checked against
the layer shapes and against module calls counted independently."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.flops import _inputs, context_projection_cost, unet_flops_per_latent_pixel
from models.unet import BasicTransformerBlock, CrossAttention, UNetModel
from tests.fixtures.checkpoints import tiny_family, tiny_sdxl_family


@pytest.mark.parametrize("name", ["sd1", "sd2", "x4-upscaler", "sdxl"])
def test_context_projections_are_counted_from_the_layers_that_read_the_context(name: str) -> None:
    family = tiny_sdxl_family(name) if name == "sdxl" else tiny_family(name)
    config, side, rows, tokens = family.unet, 16, 4, 77
    cost = context_projection_cost(config, side, rows, tokens)

    with torch.device("meta"):
        unet = UNetModel(config)
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    reading = [b.attn2 for b in blocks] + [b.attn1 for b in blocks if b.disable_self_attn]
    weights = sum(a.to_k.weight.numel() + a.to_v.weight.numel() for a in reading)
    assert cost.gemms == 2 * len(reading)
    assert cost.flops == 2 * rows * tokens * weights
    assert cost.weight_bytes == 2 * weights
    assert cost.total_flops == pytest.approx(unet_flops_per_latent_pixel(config, side) * side**2 * rows)
    # one heavy kernel per Linear and Conv2d call, one per attention
    calls = [0]
    for module in unet.modules():
        if isinstance(module, nn.Linear | nn.Conv2d | CrossAttention):
            module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    with torch.device("meta"), torch.no_grad():
        unet(*_inputs(config, side, rows, tokens))
    assert cost.heavy_kernels == calls[0]
    assert cost.heavy_kernels < cost.kernels
