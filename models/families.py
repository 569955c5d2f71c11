"""What a Stable Diffusion checkpoint is: one frozen config per network plus the diffusion
settings, with the original repositories' values for the known families.

Field names follow the original inference YAMLs (`v1-inference.yaml`, `v2-inference-v.yaml`...),
so a YAML's `model.params` map onto these objects one to one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Prediction = Literal["epsilon", "v"]
#: crossattn: text only; hybrid: + concatenated mask and masked-image latents (inpainting);
#: hybrid-adm: + concatenated low-resolution image and a noise-level class (x4 upscaler).
Conditioning = Literal["crossattn", "hybrid", "hybrid-adm"]
TextKind = Literal["clip", "open_clip"]


@dataclass(frozen=True)
class UNetConfig:
    """`unet_config.params` of the original openaimodel.UNetModel (legacy: False)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    #: Downsampling factors (1, 2, 4...) at which blocks get a SpatialTransformer (a set: kept
    #: sorted, largest first).
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    #: Exactly one of these two is set (> 0): SD 1.x fixes the head count, SD 2.x the head width.
    num_heads: int = -1
    num_head_channels: int = -1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    transformer_depth: int = 1
    #: Size of `label_emb`, the x4 upscaler's noise-level embedding; None: no class input.
    num_classes: int | None = None
    #: Per level: attn1 attends to the context instead of the pixels (x4 upscaler). Levels without
    #: attention have nothing to disable and are normalised to False, so that a config read from
    #: a YAML and one read from tensor shapes compare equal.
    disable_self_attentions: tuple[bool, ...] = ()
    disable_middle_self_attn: bool = False

    def __post_init__(self) -> None:
        if (self.num_heads > 0) == (self.num_head_channels > 0):
            raise ValueError(
                f"set exactly one of num_heads ({self.num_heads}) and num_head_channels "
                f"({self.num_head_channels}) to a positive value"
            )
        resolutions = tuple(sorted(set(self.attention_resolutions), reverse=True))
        object.__setattr__(self, "attention_resolutions", resolutions)
        if self.disable_self_attentions:
            if len(self.disable_self_attentions) != len(self.channel_mult):
                raise ValueError(
                    f"disable_self_attentions {self.disable_self_attentions} needs one entry per "
                    f"level of channel_mult {self.channel_mult}"
                )
            normalised = tuple(
                bool(disabled) and 2**level in self.attention_resolutions
                for level, disabled in enumerate(self.disable_self_attentions)
            )
            object.__setattr__(self, "disable_self_attentions", normalised)

    def self_attention_disabled(self, level: int) -> bool:
        return bool(self.disable_self_attentions) and self.disable_self_attentions[level]

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of a SpatialTransformer with `channels` channels."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """`first_stage_config.params`: the ddconfig of AutoencoderKL plus its embed_dim."""

    embed_dim: int = 4
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    #: Feature-map sizes (relative to `resolution`) with attention; empty in every SD VAE.
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    double_z: bool = True

    @property
    def downscale(self) -> int:
        """Pixels per latent along one side (8 for every real SD VAE)."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """The conditioning text tower; sizes are read from the weights, so any width loads."""

    kind: TextKind = "clip"
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    max_length: int = 77
    mlp_width: int = 3072
    #: Output width of open_clip's `text_projection` (unused for conditioning, kept for the keys).
    projection_dim: int | None = None
    #: Which hidden state conditions the UNet: the last (SD 1.x) or the penultimate (SD 2.x).
    layer: Literal["last", "penultimate"] = "last"

    @property
    def heads(self) -> int:
        """Attention heads: every CLIP text tower uses 64-wide heads (one head below width 64)."""
        return max(1, self.width // 64)


@dataclass(frozen=True)
class LowScaleConfig:
    """The x4 upscaler's noise augmentation of its low-resolution input (`low_scale_config`)."""

    linear_start: float = 0.0001
    linear_end: float = 0.02
    max_noise_level: int = 350


@dataclass(frozen=True)
class Family:
    """Everything needed to build and sample one checkpoint."""

    prediction: Prediction
    conditioning: Conditioning
    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    scale_factor: float = 0.18215
    linear_start: float = 0.00085
    linear_end: float = 0.0120
    timesteps: int = 1000
    low_scale: LowScaleConfig | None = None

    @property
    def name(self) -> str:
        """sd1, sd1-inpaint, sd2, sd2-v, sd2-inpaint, x4-upscaler (and e.g. sd1-v for unusual
        fine-tunes)."""
        if self.conditioning == "hybrid-adm":
            return "x4-upscaler"
        base = "sd1" if self.text.kind == "clip" else "sd2"
        inpaint = "-inpaint" if self.conditioning == "hybrid" else ""
        v = "-v" if self.prediction == "v" else ""
        return base + inpaint + v

    @property
    def native_size(self) -> int:
        """The image side the family was trained at: 768 for SD 2.x v-prediction, else 512 (in
        pixels of an 8x VAE; scaled with the VAE, so tiny test checkpoints get small sizes)."""
        side = 768 if self.prediction == "v" and self.text.kind == "open_clip" else 512
        return side * self.vae.downscale // 8


_CLIP_L14 = TextEncoderConfig(kind="clip", width=768, layers=12, mlp_width=3072, layer="last")
_OPEN_CLIP_H14 = TextEncoderConfig(
    kind="open_clip", width=1024, layers=24, mlp_width=4096, projection_dim=1024, layer="penultimate"
)
_SD1_UNET = UNetConfig(num_heads=8, context_dim=768)
_SD1_VAE = VAEConfig(resolution=512)  # v1 YAMLs say 512, v2 YAMLs 256; it only places VAE attention
_SD2_UNET = UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)

SD1 = Family(prediction="epsilon", conditioning="crossattn", unet=_SD1_UNET, vae=_SD1_VAE, text=_CLIP_L14)
SD1_INPAINT = Family(
    prediction="epsilon",
    conditioning="hybrid",
    unet=UNetConfig(in_channels=9, num_heads=8, context_dim=768),
    vae=_SD1_VAE,
    text=_CLIP_L14,
)
SD2 = Family(
    prediction="epsilon", conditioning="crossattn", unet=_SD2_UNET, vae=VAEConfig(), text=_OPEN_CLIP_H14
)
SD2_V = Family(prediction="v", conditioning="crossattn", unet=_SD2_UNET, vae=VAEConfig(), text=_OPEN_CLIP_H14)
SD2_INPAINT = Family(
    prediction="epsilon",
    conditioning="hybrid",
    unet=UNetConfig(
        in_channels=9, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True
    ),
    vae=VAEConfig(),
    text=_OPEN_CLIP_H14,
)

X4_UPSCALER = Family(
    prediction="v",
    conditioning="hybrid-adm",
    unet=UNetConfig(
        in_channels=7,
        model_channels=256,
        attention_resolutions=(8, 4, 2),
        channel_mult=(1, 2, 2, 4),
        num_heads=8,
        context_dim=1024,
        use_linear_in_transformer=True,
        num_classes=1000,
        disable_self_attentions=(True, True, True, False),
    ),
    vae=VAEConfig(ch_mult=(1, 2, 4)),  # latent = image / 4
    text=_OPEN_CLIP_H14,
    scale_factor=0.08333,
    linear_start=0.0001,
    linear_end=0.02,
    low_scale=LowScaleConfig(),
)

KNOWN_FAMILIES: tuple[Family, ...] = (SD1, SD1_INPAINT, SD2, SD2_V, SD2_INPAINT, X4_UPSCALER)
