"""The original openaimodel UNetModel (CompVis / Stability-AI `ldm`), written for inference.

Attribute names equal the original checkpoint keys under `model.diffusion_model.`, so original
weights load with `load_state_dict(strict=True)` and no key translation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.families import UNetConfig

#: Cached steps (`UNetModel.forward_shallow`): the input blocks after the input conv whose skips
#: the shallow call recomputes. 1 is DeepCache's default branch for SD (the first ResBlock of
#: level 0; its paper's figures for SD 1.5 and SDXL use it).
SHALLOW_BLOCKS = 1


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
    """Attention of x (B, T, query_dim) to a context (B, S, context_dim), or to x itself.

    `fuse` makes the projections that read the same input one GEMM: self-attention's q, k and v
    (`to_qkv`, 3x rows) or cross-attention's k and v of the context (`to_kv`, 2x rows). The fused
    weight is the original weights stacked by rows, so the state dict keeps the original keys
    (`to_q.weight`...: split on save, stacked on load) and LoRAs land on its rows (`fused_rows`)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.to_qkv: nn.Linear | None = None  # after fuse(self_attention=True)
        self.to_kv: nn.Linear | None = None  # after fuse(self_attention=False)
        self.register_state_dict_post_hook(_split_fused)
        self.register_load_state_dict_pre_hook(_stack_fused)

    @torch.no_grad()
    def fuse(self, self_attention: bool) -> None:
        """Replace to_q, to_k and to_v (self-attention: the context is x) or to_k and to_v by one
        Linear of their stacked weights; the same math up to GEMM rounding. Idempotent."""
        if self.to_qkv is not None or self.to_kv is not None:
            return
        parts = ("to_q", "to_k", "to_v") if self_attention else ("to_k", "to_v")
        weights = [getattr(self, part).weight for part in parts]
        fused = nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=False, device="meta")
        fused.weight = nn.Parameter(torch.cat(weights), requires_grad=weights[0].requires_grad)
        for part in parts:
            delattr(self, part)
        setattr(self, "to_qkv" if self_attention else "to_kv", fused)

    def fused_rows(self) -> dict[str, tuple[str, slice]]:
        """Original weight key -> (the fused weight's key, its rows), for each projection `fuse`
        stacked ({} unfused)."""
        if self.to_qkv is not None:
            fused, parts = "to_qkv", "qkv"
        elif self.to_kv is not None:
            fused, parts = "to_kv", "kv"
        else:
            return {}
        rows = getattr(self, fused).out_features // len(parts)
        return {f"to_{part}.weight": (f"{fused}.weight", slice(i * rows, (i + 1) * rows))
                for i, part in enumerate(parts)}

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.to_qkv is not None:  # fused self-attention: there is no other context
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            context = x if context is None else context
            q = self.to_q(x)
            if self.to_kv is not None:  # fused cross-attention
                k, v = self.to_kv(context).chunk(2, dim=-1)
            else:
                k, v = self.to_k(context), self.to_v(context)
        b = x.shape[0]
        # (B, T, heads * d) -> (B, heads, T, d)
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]))


def _split_fused(module: CrossAttention, state_dict: dict[str, torch.Tensor], prefix: str, _metadata: dict) -> None:
    """State-dict post-hook: a fused weight is saved as the original weights (views of its rows)."""
    for key, (fused, rows) in module.fused_rows().items():
        state_dict[prefix + key] = state_dict[prefix + fused][rows]
    for fused in {fused for fused, _ in module.fused_rows().values()}:
        del state_dict[prefix + fused]


def _stack_fused(
    module: CrossAttention, state_dict: dict[str, torch.Tensor], prefix: str, *_: object
) -> None:
    """Load-state-dict pre-hook: the original weights of a fused projection load stacked (a
    missing one is left for the strict check to name)."""
    by_fused: dict[str, list[str]] = {}
    for key, (fused, _) in module.fused_rows().items():
        by_fused.setdefault(fused, []).append(prefix + key)
    for fused, keys in by_fused.items():
        if all(key in state_dict for key in keys):
            state_dict[prefix + fused] = torch.cat([state_dict.pop(key) for key in keys])


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

    def fuse(self) -> None:
        """One GEMM for attn1's q, k, v (its k, v when it reads the context) and one for attn2's k, v."""
        self.attn1.fuse(self_attention=not self.disable_self_attn)
        self.attn2.fuse(self_attention=False)

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
        incoming = []  # channels entering each output block
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                incoming.append(ch)
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
        #: Channels of the deep feature `forward_deep` keeps (full resolution).
        self.deep_channels = incoming[-SHALLOW_BLOCKS - 1]

    def fuse_projections(self) -> None:
        """Compute the attention projections that read the same input with one GEMM each
        (`CrossAttention.fuse`): 5 projection GEMMs per transformer block instead of 8, the same
        math up to GEMM rounding, the state dict still under the original keys. Call it after
        loading and before compiling (compiled graphs capture the parameters); calling it again
        changes nothing."""
        for module in self.modules():
            if isinstance(module, BasicTransformerBlock):
                module.fuse()

    def fused_rows(self) -> dict[str, tuple[str, slice]]:
        """Original weight key -> (the fused weight holding it, its rows), for every projection
        `fuse_projections` stacked ({} unfused)."""
        return {
            f"{path}.{key}": (f"{path}.{fused}", rows)
            for path, module in self.named_modules()
            if isinstance(module, CrossAttention)
            for key, (fused, rows) in module.fused_rows().items()
        }

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.forward_deep(x, timesteps, context, y)[0]

    # Cached steps (DeepCache, Ma et al. 2023): the deep part of the UNet changes slowly from one
    # step to the next, the shallow part (the full-resolution blocks next to the input and the
    # output) carries the detail. A full call keeps the feature entering the last SHALLOW_BLOCKS + 1
    # output blocks; later calls run the first SHALLOW_BLOCKS + 1 input blocks (the input conv
    # and level 0's first ResBlock: DeepCache's default branch for SD) for fresh skips, and those
    # output blocks on the kept feature.

    def forward_deep(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s output (the same ops) and the deep feature (B, deep_channels, H, W) that
        `forward_shallow` takes."""
        emb = self._embed(x, timesteps, y)
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        shallow = len(self.output_blocks) - SHALLOW_BLOCKS - 1
        for block in self.output_blocks[:shallow]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self._shallow_out(h, skips, emb, context), h

    def forward_shallow(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
        deep: torch.Tensor,
    ) -> torch.Tensor:
        """The output with the deep part replaced by `deep`, the feature a `forward_deep` call
        kept: only the shallow blocks run. Given the feature of the same inputs it is `forward`."""
        emb = self._embed(x, timesteps, y)
        h = x
        skips = []
        for block in self.input_blocks[: SHALLOW_BLOCKS + 1]:
            h = block(h, emb, context)
            skips.append(h)
        return self._shallow_out(deep, skips, emb, context)

    def _shallow_out(
        self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """The last output blocks on h with the shallow input blocks' skips, then `out`."""
        for block in self.output_blocks[len(self.output_blocks) - len(skips) :]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def _embed(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The time embedding (B, 4 mc) in x's dtype, plus the class or ADM embedding of y."""
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
        return emb
