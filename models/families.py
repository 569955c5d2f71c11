"""What a Stable Diffusion checkpoint is: one frozen config per network plus the diffusion
settings, with the original repositories' values for the known families.

Field names follow the original inference YAMLs (`v1-inference.yaml`, `v2-inference-v.yaml`, and
sgm's `sd_xl_base.yaml`, `sd_xl_refiner.yaml`), so a YAML's `model.params` map onto these objects
one to one."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Prediction = Literal["epsilon", "v"]
#: crossattn: text only; hybrid: + concatenated mask and masked-image latents (inpainting);
#: hybrid-adm: + concatenated low-resolution image and a noise-level class (x4 upscaler).
Conditioning = Literal["crossattn", "hybrid", "hybrid-adm"]
TextKind = Literal["clip", "open_clip"]
#: The inputs of sgm's ConcatTimestepEmbedderND embedders (each value gets a Fourier embedding).
SizeKey = Literal["original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple", "aesthetic_score"]
#: Values per SizeKey: (height, width), (top, left), (height, width), (score,).
SIZE_KEY_VALUES: dict[str, int] = {
    "original_size_as_tuple": 2,
    "crop_coords_top_left": 2,
    "target_size_as_tuple": 2,
    "aesthetic_score": 1,
}


@dataclass(frozen=True)
class UNetConfig:
    """`unet_config.params` (ldm) or `network_config.params` (sgm) of the original
    openaimodel.UNetModel (legacy: False)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    #: Downsampling factors (1, 2, 4...) at which blocks get a SpatialTransformer (a set: kept
    #: sorted, largest first).
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    #: Exactly one of these two is set (> 0): SD 1.x fixes the head count, SD 2.x and SDXL the
    #: head width.
    num_heads: int = -1
    num_head_channels: int = -1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    #: SpatialTransformer depth as given: one int (SD 1.x/2.x), one per level (sgm: SDXL's
    #: [1, 2, 10]), or one per input ResBlock (distilled SSD-1B / Vega). Configs compare by the
    #: derived `input_depths` / `output_depths` / `middle_depth`, not by how depths were written.
    transformer_depth: int | tuple[int, ...] = field(default=1, compare=False)
    #: One per output ResBlock, in `output_blocks` order; () derives it from `transformer_depth`.
    transformer_depth_output: tuple[int, ...] = field(default=(), compare=False)
    #: Depth of the middle block's transformer; None: the last level's depth (sgm). 0: the middle
    #: block is a single ResBlock (SSD-1B, Vega).
    transformer_depth_middle: int | None = field(default=None, compare=False)
    #: Size of `label_emb`, the x4 upscaler's noise-level embedding; None: no class input.
    num_classes: int | None = None
    #: Width of the ADM vector `y` (sgm `num_classes: sequential`): SDXL's pooled text embedding
    #: and size features through `label_emb.0.0/0.2`; None: no vector input.
    adm_in_channels: int | None = None
    #: Per level: attn1 attends to the context instead of the pixels (x4 upscaler). Levels without
    #: attention have nothing to disable and are normalised to False, so that a config read from
    #: a YAML and one read from tensor shapes compare equal.
    disable_self_attentions: tuple[bool, ...] = ()
    disable_middle_self_attn: bool = False
    #: Derived: transformer depth per input ResBlock, per output ResBlock (`output_blocks` order),
    #: and of the middle block; 0 where a block has no transformer (levels outside
    #: `attention_resolutions`, or a single-ResBlock middle).
    input_depths: tuple[int, ...] = field(init=False)
    output_depths: tuple[int, ...] = field(init=False)
    middle_depth: int = field(init=False)

    def __post_init__(self) -> None:
        if (self.num_heads > 0) == (self.num_head_channels > 0):
            raise ValueError(
                f"set exactly one of num_heads ({self.num_heads}) and num_head_channels "
                f"({self.num_head_channels}) to a positive value"
            )
        resolutions = tuple(sorted(set(self.attention_resolutions), reverse=True))
        object.__setattr__(self, "attention_resolutions", resolutions)
        if self.num_classes is not None and self.adm_in_channels is not None:
            raise ValueError("set at most one of num_classes (x4 upscaler) and adm_in_channels (SDXL)")
        self._normalise_depths()
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

    def _normalise_depths(self) -> None:
        levels, blocks = len(self.channel_mult), self.num_res_blocks
        depth = self.transformer_depth
        if isinstance(depth, int):
            depth = (depth,) * levels
        depth = tuple(depth)
        if len(depth) == levels:
            per_level = depth
            depth = tuple(d for d in per_level for _ in range(blocks))
        elif len(depth) == levels * blocks:
            per_level = tuple(depth[level * blocks] for level in range(levels))
        else:
            raise ValueError(
                f"transformer_depth {depth}: need one int, one per level ({levels}) or one per "
                f"input ResBlock ({levels * blocks})"
            )
        output = tuple(self.transformer_depth_output) or tuple(
            per_level[level] for level in reversed(range(levels)) for _ in range(blocks + 1)
        )
        if len(output) != levels * (blocks + 1):
            raise ValueError(
                f"transformer_depth_output {output}: need one per output ResBlock ({levels * (blocks + 1)})"
            )
        attends = [2**level in self.attention_resolutions for level in range(levels)]
        depth = tuple(d if attends[i // blocks] else 0 for i, d in enumerate(depth))
        output = tuple(d if attends[levels - 1 - i // (blocks + 1)] else 0 for i, d in enumerate(output))
        middle = per_level[-1] if self.transformer_depth_middle is None else self.transformer_depth_middle
        object.__setattr__(self, "input_depths", depth)
        object.__setattr__(self, "output_depths", output)
        object.__setattr__(self, "middle_depth", middle)

    def self_attention_disabled(self, level: int) -> bool:
        return bool(self.disable_self_attentions) and self.disable_self_attentions[level]

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of a SpatialTransformer with `channels` channels; with a
        fixed head width, at least one head (of all the channels, in tiny test models)."""
        if self.num_head_channels > 0:
            heads = max(1, channels // self.num_head_channels)
            return heads, channels // heads
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
    #: Which hidden state conditions the UNet: the last (SD 1.x) or the penultimate (SD 2.x, SDXL).
    layer: Literal["last", "penultimate"] = "last"
    #: Whether the final LayerNorm follows that hidden state: yes in SD 1.x/2.x; no in SDXL, whose
    #: towers return the raw hidden state (sgm: `layer: hidden`, and OpenCLIP with `legacy: False`).
    final_norm: bool = True

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
class ConditionerConfig:
    """sgm's GeneralConditioner (`conditioner.embedders.N`): the text towers first, in order, then
    one ConcatTimestepEmbedderND per size key. The towers' hidden states are concatenated along
    the feature axis into the context; the last tower's pooled output, then the Fourier features
    of each size key (`outdim` per value), in order, make the ADM vector `y`."""

    texts: tuple[TextEncoderConfig, ...]
    sizes: tuple[SizeKey, ...]
    outdim: int = 256

    def __post_init__(self) -> None:
        if not self.texts or self.texts[-1].kind != "open_clip" or self.texts[-1].projection_dim is None:
            raise ValueError("the last text tower must be OpenCLIP with a text_projection (its pooled output)")
        unknown = [key for key in self.sizes if key not in SIZE_KEY_VALUES]
        if unknown:
            raise ValueError(f"size keys {unknown}; allowed: {', '.join(SIZE_KEY_VALUES)}")

    @property
    def refiner(self) -> bool:
        """A refiner's conditioner: an aesthetic score instead of crop and target size."""
        return "aesthetic_score" in self.sizes

    @property
    def context_dim(self) -> int:
        return sum(text.width for text in self.texts)

    @property
    def adm_in_channels(self) -> int:
        pooled = self.texts[-1].projection_dim or 0
        return pooled + self.outdim * sum(SIZE_KEY_VALUES[key] for key in self.sizes)


#: Latent -> RGB in [-1, 1], one row per latent channel: the web UIs' cheap approximation of the
#: VAE decoder for live previews. SD 1.x/2.x latents (A1111's factors):
SD_LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
#: SDXL's VAE has its own latent space (ComfyUI's `latent_formats.SDXL` factors):
SDXL_LATENT_RGB = ((0.3920, 0.4054, 0.4549), (-0.2634, -0.0196, 0.0653), (0.0568, 0.1687, -0.0755),
                   (-0.3112, -0.2359, -0.2076))


@dataclass(frozen=True)
class Family:
    """Everything needed to build and sample one checkpoint."""

    prediction: Prediction
    conditioning: Conditioning
    unet: UNetConfig
    vae: VAEConfig
    #: The text tower of SD 1.x/2.x (`cond_stage_model`); with a conditioner, its last (pooled) tower.
    text: TextEncoderConfig
    scale_factor: float = 0.18215
    linear_start: float = 0.00085
    linear_end: float = 0.0120
    timesteps: int = 1000
    low_scale: LowScaleConfig | None = None
    #: SDXL's `conditioner` (two text towers and size embedders) in place of `cond_stage_model`.
    conditioner: ConditionerConfig | None = None
    #: VAE precisions that decode this family safely: SDXL's VAE overflows float16 (black images).
    vae_dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    #: Linear latent -> RGB factors of the live previews (`generation.denoiser.latent_preview`).
    latent_rgb: tuple[tuple[float, float, float], ...] = SD_LATENT_RGB

    @property
    def name(self) -> str:
        """sd1, sd1-inpaint, sd2, sd2-v, sd2-inpaint, x4-upscaler, sdxl, sdxl-inpaint, sdxl-refiner
        (and e.g. sd1-v for unusual fine-tunes)."""
        if self.conditioner is not None:
            if self.conditioner.refiner:
                return "sdxl-refiner"
            return "sdxl-inpaint" if self.conditioning == "hybrid" else "sdxl"
        if self.conditioning == "hybrid-adm":
            return "x4-upscaler"
        base = "sd1" if self.text.kind == "clip" else "sd2"
        inpaint = "-inpaint" if self.conditioning == "hybrid" else ""
        v = "-v" if self.prediction == "v" else ""
        return base + inpaint + v

    @property
    def native_size(self) -> int:
        """The image side the family was trained at: 1024 for SDXL, 768 for SD 2.x v-prediction,
        else 512 (in
        pixels of an 8x VAE; scaled with the VAE, so tiny test checkpoints get small sizes)."""
        if self.conditioner is not None:
            side = 1024
        else:
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

# SDXL (sgm's sd_xl_base.yaml / sd_xl_refiner.yaml): CLIP ViT-L (hidden layer 11 of 12, no final
# norm) and OpenCLIP ViT-bigG (penultimate, no final norm; pooled through text_projection).
_SDXL_CLIP_L = replace(_CLIP_L14, layer="penultimate", final_norm=False)
_OPEN_CLIP_BIGG = TextEncoderConfig(
    kind="open_clip", width=1280, layers=32, mlp_width=5120, projection_dim=1280, layer="penultimate",
    final_norm=False,
)
_SDXL_VAE = VAEConfig()
_SDXL_VAE_DTYPES = ("float32", "bfloat16")
_SDXL_CONDITIONER = ConditionerConfig(
    texts=(_SDXL_CLIP_L, _OPEN_CLIP_BIGG),
    sizes=("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"),
)
_SDXL_UNET = UNetConfig(
    model_channels=320,
    attention_resolutions=(4, 2),
    channel_mult=(1, 2, 4),
    num_head_channels=64,
    use_linear_in_transformer=True,
    transformer_depth=(1, 2, 10),
    context_dim=2048,
    adm_in_channels=2816,
)
SDXL = Family(
    prediction="epsilon",
    conditioning="crossattn",
    unet=_SDXL_UNET,
    vae=_SDXL_VAE,
    text=_OPEN_CLIP_BIGG,
    scale_factor=0.13025,
    conditioner=_SDXL_CONDITIONER,
    vae_dtypes=_SDXL_VAE_DTYPES,
    latent_rgb=SDXL_LATENT_RGB,
)
SDXL_REFINER = Family(
    prediction="epsilon",
    conditioning="crossattn",
    unet=UNetConfig(
        model_channels=384,
        attention_resolutions=(4, 2),
        channel_mult=(1, 2, 4, 4),
        num_head_channels=64,
        use_linear_in_transformer=True,
        transformer_depth=4,
        context_dim=1280,
        adm_in_channels=2560,
    ),
    vae=_SDXL_VAE,
    text=_OPEN_CLIP_BIGG,
    scale_factor=0.13025,
    conditioner=ConditionerConfig(
        texts=(_OPEN_CLIP_BIGG,), sizes=("original_size_as_tuple", "crop_coords_top_left", "aesthetic_score")
    ),
    vae_dtypes=_SDXL_VAE_DTYPES,
    latent_rgb=SDXL_LATENT_RGB,
)
SDXL_INPAINT = replace(SDXL, conditioning="hybrid", unet=replace(_SDXL_UNET, in_channels=9))

def refines(base: str, refiner: str) -> bool:
    """Whether a checkpoint of family `refiner` finishes the images of one of family `base`: an
    SDXL refiner those of an SDXL base (its inpainting variant included)."""
    return base in (SDXL.name, SDXL_INPAINT.name) and refiner == SDXL_REFINER.name


KNOWN_FAMILIES: tuple[Family, ...] = (
    SD1, SD1_INPAINT, SD2, SD2_V, SD2_INPAINT, X4_UPSCALER, SDXL, SDXL_INPAINT, SDXL_REFINER
)
