"""The original openaimodel UNetModel (CompVis / Stability-AI `ldm`), written for inference.

Attribute names equal the original checkpoint keys under `model.diffusion_model.`, so original
weights load with `load_state_dict(strict=True)` and no key translation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.families import UNetConfig


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps as the original: [cos(t f), sin(t f)], f geometric."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding  # (B, dim)


def normalization(channels: int) -> nn.GroupNorm:
    """The original's GroupNorm32 upcast activations to float32 around each norm; PyTorch's group
    norm kernels already accumulate half-precision inputs in float32, so the upcast only cost two
    extra passes over the activations per norm (about 45 norms per UNet call)."""
    return nn.GroupNorm(32, channels)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b = x.shape[0]
        # (B, T, heads * d) -> (B, heads, T, d)
        q, k, v = (
            t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """attn1 attends to the pixels (or, with `disable_self_attn`, to the context too), attn2 to
    the context, then a GEGLU feed-forward; pre-norm residuals."""

    def __init__(
        self, dim: int, heads: int, dim_head: int, context_dim: int, disable_self_attn: bool
    ) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Attention over the pixels of a feature map; 1x1 conv projections (SD 1.x) or linear (SD 2.x)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        linear: bool,
        disable_self_attn: bool,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, disable_self_attn)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)  # (B, C, H, W)
        if not self.linear:
            x = self.proj_out(x)
        return x + x_in


class UNetModel(nn.Module):
    """forward(x (B, C_in, H, W), timesteps (B,), context (B, T, D), y) -> (B, C_out, H, W), where
    y is the x4 upscaler's (B,) noise-level classes or SDXL's (B, adm_in_channels) ADM vector.

    One module for SD 1.x/2.x, the x4 upscaler and SDXL (sgm's generalisation): transformer
    depths per ResBlock, a middle block that may be a single ResBlock, and `label_emb`."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        mc = config.model_channels
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.num_classes is not None:
            self.label_emb = nn.Embedding(config.num_classes, emb_dim)
        elif config.adm_in_channels is not None:  # sgm's "sequential": keys label_emb.0.0 / 0.2
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(config.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        def transformer(channels: int, depth: int, disable_self_attn: bool) -> SpatialTransformer:
            heads, dim_head = config.heads(channels)
            return SpatialTransformer(
                channels, heads, dim_head, depth, config.context_dim,
                config.use_linear_in_transformer, disable_self_attn,
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))]
        )
        depths = iter(config.input_depths)
        skip_channels = [mc]
        ch = mc
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if depth := next(depths):
                    layers.append(transformer(ch, depth, config.self_attention_disabled(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        middle: list[nn.Module] = [ResBlock(ch, emb_dim, ch)]
        if config.middle_depth:
            middle += [
                transformer(ch, config.middle_depth, config.disable_middle_self_attn),
                ResBlock(ch, emb_dim, ch),
            ]
        self.middle_block = TimestepEmbedSequential(*middle)

        self.output_blocks = nn.ModuleList()
        depths = iter(config.output_depths)
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc)]
                ch = mult * mc
                if depth := next(depths):
                    layers.append(transformer(ch, depth, config.self_attention_disabled(level)))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), nn.Conv2d(mc, config.out_channels, 3, padding=1)
        )

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        takes_y = self.config.num_classes is not None or self.config.adm_in_channels is not None
        if (y is None) == takes_y:
            raise ValueError(
                "y (noise-level classes or the ADM vector) is required by, and only by, a UNet with "
                "num_classes or adm_in_channels"
            )
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(x.dtype)  # (B, mc)
        emb = self.time_embed(t_emb)  # (B, 4 mc)
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype) if y.is_floating_point() else y)
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
