"""Single-file checkpoints in, a ready `StableDiffusion` out: read `.safetensors` / `.ckpt`
safely, work out the family (from the original YAML, or from key names and tensor shapes), build
the networks without initialising them, and load the original tensors strictly.

How detection works is documented in docs/MODELS.md; keep the two in step."""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import safetensors.torch
import torch
import yaml

from models.families import (
    SD1,
    SD2,
    SDXL,
    SDXL_REFINER,
    X4_UPSCALER,
    ConditionerConfig,
    LowScaleConfig,
    SizeKey,
    Family,
    Prediction,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)
from models.stable_diffusion import StableDiffusion
from models.unet import UNetModel

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model."
#: SDXL's text towers and size embedders: `conditioner.embedders.N.`.
CONDITIONER = "conditioner.embedders."
#: Under a tower's prefix: the CLIP (transformers) and OpenCLIP layouts.
_CLIP_PART, _OPEN_CLIP_PART = "transformer.text_model.", "model."
_CLIP = TEXT + _CLIP_PART
_OPEN_CLIP = TEXT + _OPEN_CLIP_PART
#: A constant arange that older transformers saved with CLIP; it is rebuilt, never loaded.
_POSITION_IDS = _CLIP_PART + "embeddings.position_ids"
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")

PredictionSource = Literal["override", "yaml", "probe", "family default"]


class CheckpointError(Exception):
    """The file is missing, unreadable, unsafe, or not a Stable Diffusion checkpoint we support."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What `atelier models` prints about one checkpoint."""

    path: Path
    family: str
    prediction: Prediction
    prediction_source: PredictionSource
    parameters: dict[str, int]  # "unet", "vae", "text_encoder" -> parameter count
    dtype: str  # the dtype most UNet tensors are stored in, e.g. "float16"
    native_size: int  # the image side the family was trained at (Family.native_size)
    context_dim: int  # the UNet's conditioning width, which LoRAs and embeddings must match
    unet: UNetConfig  # the UNet as loaded (per-block depths of distilled files), for its cost


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` or `.ckpt`/`.pt` file (plain tensors only), memory-mapped:
    tensors nobody touches (EMA copies, or all data when only shapes are inspected) stay on disk."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path)
        except Exception as exc:  # safetensors raises several types for damaged files
            raise CheckpointError(f"{path}: not a readable .safetensors file ({exc})") from exc
    if path.suffix in _TORCH_SUFFIXES:
        return _read_torch_pickle(path)
    raise CheckpointError(
        f"{path}: unsupported file type {path.suffix!r}; allowed: .safetensors, {', '.join(_TORCH_SUFFIXES)}"
    )


def _read_torch_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        # Every SD-era .ckpt is a zip archive, which torch can memory-map; older formats cannot be.
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        wanted = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise CheckpointError(
            f"{path}: refused to load: the pickle asks for "
            f"{wanted.group(1) if wanted else 'more than plain tensors and containers'}, and running "
            f"it could execute arbitrary code. Only tensors, numbers, strings and containers are "
            f"allowed; use the .safetensors release of this model, or convert the file with a tool "
            f"you trust."
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a dict of tensors")
    return data


def model_weights(weights: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the three networks, without EMA copies, schedules or position ids."""
    if not any(k.startswith(UNET) for k in weights):
        raise CheckpointError(f"{path}: no {UNET}* keys; found {_sample_keys(weights)}")
    sdxl = any(re.match(re.escape(CONDITIONER) + r"\d+\." + re.escape(_OPEN_CLIP_PART), k) for k in weights)
    if not sdxl and not any(k.startswith(_CLIP) or k.startswith(_OPEN_CLIP) for k in weights):
        raise CheckpointError(
            f"{path}: unrecognised text encoder: expected {_CLIP}* (SD 1.x), {_OPEN_CLIP}* "
            f"(SD 2.x) or {CONDITIONER}N.{_OPEN_CLIP_PART}* (SDXL) keys; found "
            f"{_sample_keys(weights, TEXT) or _sample_keys(weights, CONDITIONER) or _sample_keys(weights)}"
        )
    if not any(k.startswith(VAE) for k in weights):
        raise CheckpointError(f"{path}: no {VAE}* keys, so no VAE; found {_sample_keys(weights)}")
    text = CONDITIONER if sdxl else TEXT
    return {
        k: v for k, v in weights.items() if k.startswith((UNET, VAE, text)) and not k.endswith(_POSITION_IDS)
    }


def _sample_keys(weights: dict[str, torch.Tensor], prefix: str = "") -> str:
    keys = sorted(k for k in weights if k.startswith(prefix))
    if not keys:
        return ""
    return f"{len(keys)} keys like {', '.join(keys[:4])}"


# ---------------------------------------------------------------- detection from shapes


def _indices(weights: dict[str, torch.Tensor], pattern: str) -> list[int]:
    """Sorted distinct N of keys matching `pattern`, a regex with one (\\d+) group."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in weights if (m := regex.match(k))})


def _shape(weights: dict[str, torch.Tensor], key: str) -> torch.Size:
    """A tensor's shape, or an error naming the tensor the layout needs and the file lacks."""
    if key not in weights:
        raise CheckpointError(f"incomplete checkpoint: no tensor {key}")
    return weights[key].shape


def detect_family(weights: dict[str, torch.Tensor]) -> Family:
    """The family and sizes of a checkpoint from key names and shapes alone (prediction: the
    family's default; SD 2.x v-prediction is settled by `predicts_v`)."""
    if any(k.startswith(CONDITIONER) for k in weights):
        return _detect_sdxl(weights)
    text = _detect_text(weights)
    if UNET + "label_emb.weight" in weights:
        base = X4_UPSCALER
    else:
        base = SD1 if text.kind == "clip" else SD2
    unet = _detect_unet(weights, base.unet, text.width)
    vae = _detect_vae(weights, base.vae.resolution)
    if base is X4_UPSCALER:
        conditioning = "hybrid-adm"
    else:
        conditioning = {4: "crossattn", 9: "hybrid"}.get(unet.in_channels)
    if conditioning is None:
        raise CheckpointError(
            f"UNet takes {unet.in_channels} input channels; supported: 4 (txt2img), 9 (inpainting), "
            f"or a noise-level embedding (label_emb) for the x4 upscaler"
        )
    return replace(base, conditioning=conditioning, unet=unet, vae=vae, text=text)


def _detect_text(weights: dict[str, torch.Tensor], prefix: str = TEXT) -> TextEncoderConfig:
    """The tower under `prefix` (SD 1.x/2.x defaults; SDXL's callers set layer and norm)."""
    clip = prefix + _CLIP_PART
    if clip + "embeddings.token_embedding.weight" in weights:
        vocab, width = _shape(weights, clip + "embeddings.token_embedding.weight")
        return TextEncoderConfig(
            kind="clip",
            vocab_size=vocab,
            width=width,
            layers=len(_indices(weights, re.escape(clip) + r"encoder\.layers\.(\d+)\.")),
            max_length=_shape(weights, clip + "embeddings.position_embedding.weight")[0],
            mlp_width=_shape(weights, clip + "encoder.layers.0.mlp.fc1.weight")[0],
            layer="last",
        )
    open_clip = prefix + _OPEN_CLIP_PART
    vocab, width = _shape(weights, open_clip + "token_embedding.weight")
    return TextEncoderConfig(
        kind="open_clip",
        vocab_size=vocab,
        width=width,
        layers=len(_indices(weights, re.escape(open_clip) + r"transformer\.resblocks\.(\d+)\.")),
        max_length=_shape(weights, open_clip + "positional_embedding")[0],
        mlp_width=_shape(weights, open_clip + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        projection_dim=_shape(weights, open_clip + "text_projection")[1],
        layer="penultimate",
    )


#: The size keys an SDXL conditioner's ADM width implies, by number of Fourier-embedded values.
_SDXL_SIZES: dict[int, tuple[SizeKey, ...]] = {
    6: SDXL.conditioner.sizes,  # base: original size, crop, target size
    5: SDXL_REFINER.conditioner.sizes,  # refiner: original size, crop, aesthetic score
}


def _detect_conditioner(weights: dict[str, torch.Tensor], adm_in_channels: int) -> ConditionerConfig:
    """The text towers under `conditioner.embedders.N.` (SDXL: hidden states of the penultimate
    layer, no final norm) and the size embedders the rest of the ADM width implies."""
    towers = _indices(weights, re.escape(CONDITIONER) + r"(\d+)\.")
    if towers != list(range(len(towers))):
        raise CheckpointError(f"conditioner embedders {towers}; expected text towers numbered 0, 1...")
    texts = tuple(
        replace(_detect_text(weights, f"{CONDITIONER}{n}."), layer="penultimate", final_norm=False) for n in towers
    )
    if texts[-1].kind != "open_clip":
        raise CheckpointError(
            f"conditioner towers {[t.kind for t in texts]}: the last must be OpenCLIP (SDXL's pooled ViT-bigG)"
        )
    outdim = SDXL.conditioner.outdim
    values, rest = divmod(adm_in_channels - (texts[-1].projection_dim or 0), outdim)
    if rest or values not in _SDXL_SIZES:
        raise CheckpointError(
            f"label_emb takes {adm_in_channels} features; SDXL needs the pooled text embedding "
            f"({texts[-1].projection_dim}) plus {outdim} per size value: 6 values (base) or 5 (refiner)"
        )
    return ConditionerConfig(texts=texts, sizes=_SDXL_SIZES[values], outdim=outdim)


def _detect_sdxl(weights: dict[str, torch.Tensor]) -> Family:
    adm_in_channels = _shape(weights, UNET + "label_emb.0.0.weight")[1]
    conditioner = _detect_conditioner(weights, adm_in_channels)
    base = SDXL_REFINER if conditioner.refiner else SDXL
    unet = _detect_unet(weights, base.unet, conditioner.context_dim)
    conditioning = {4: "crossattn", 9: "hybrid"}.get(unet.in_channels)
    if conditioning is None or (conditioning == "hybrid" and base is SDXL_REFINER):
        raise CheckpointError(
            f"SDXL UNet takes {unet.in_channels} input channels; supported: 4 (base, refiner) or 9 (inpainting)"
        )
    return replace(
        base,
        conditioning=conditioning,
        unet=unet,
        vae=_detect_vae(weights, base.vae.resolution),
        text=conditioner.texts[-1],
        conditioner=conditioner,
    )


def _attends_to_context(weights: dict[str, torch.Tensor], transformer: str) -> bool:
    """Whether a SpatialTransformer's attn1 reads the context (keys wider or narrower than the
    queries' input); when context and pixel widths are equal it cannot tell, and says no."""
    attn1 = transformer + "transformer_blocks.0.attn1."
    return _shape(weights, attn1 + "to_k.weight")[1] != _shape(weights, attn1 + "to_q.weight")[1]


def _transformer_depth(weights: dict[str, torch.Tensor], block: str) -> int:
    """Transformer blocks of the SpatialTransformer at `block` + "1." (0: none there)."""
    return len(_indices(weights, re.escape(block) + r"1\.transformer_blocks\.(\d+)\."))


def _detect_unet(weights: dict[str, torch.Tensor], base: UNetConfig, context_dim: int) -> UNetConfig:
    """Walk `input_blocks`: a block with `.0.op` is a downsample ending a level, any other holds a
    ResBlock whose width gives the level's channel multiplier and maybe a SpatialTransformer whose
    block count is its depth; then the output blocks' depths and the middle block."""
    conv_in = _shape(weights, UNET + "input_blocks.0.0.weight")  # (mc, C_in, 3, 3)
    mc = conv_in[0]
    levels: list[list[int]] = [[]]  # per level: output widths of its ResBlocks
    no_self_attention: list[bool] = [False]  # per level
    attention: set[int] = set()
    depths: list[int] = []  # per input ResBlock
    proj_in_ndim = 4
    for i in _indices(weights, re.escape(UNET) + r"input_blocks\.(\d+)\.")[1:]:
        block = f"{UNET}input_blocks.{i}."
        if block + "0.op.weight" in weights:
            levels.append([])
            no_self_attention.append(False)
            continue
        levels[-1].append(_shape(weights, block + "0.out_layers.3.weight")[0])
        depths.append(_transformer_depth(weights, block))
        if depths[-1]:
            attention.add(2 ** (len(levels) - 1))
            proj_in_ndim = len(_shape(weights, block + "1.proj_in.weight"))
            no_self_attention[-1] = _attends_to_context(weights, block + "1.")
    res_blocks = {len(widths) for widths in levels}
    if len(res_blocks) != 1 or any(len(set(widths)) != 1 for widths in levels):
        raise CheckpointError(f"UNet levels have uneven blocks {levels}; only uniform levels are supported")
    num_res_blocks = res_blocks.pop()
    outputs = _indices(weights, re.escape(UNET) + r"output_blocks\.(\d+)\.")
    output_depths = [_transformer_depth(weights, f"{UNET}output_blocks.{i}.") for i in outputs]
    for i, depth in enumerate(output_depths):
        if depth:
            attention.add(2 ** (len(levels) - 1 - i // (num_res_blocks + 1)))
    middle = UNET + "middle_block."
    if middle + "1.proj_in.weight" in weights:
        middle_depth = _transformer_depth(weights, middle)
    elif _indices(weights, re.escape(middle) + r"(\d+)\.") == [0]:
        middle_depth = 0  # a single ResBlock (SSD-1B, Vega)
    else:
        raise CheckpointError(
            f"middle block {_sample_keys(weights, middle)}: expected ResBlock, SpatialTransformer, "
            f"ResBlock, or a single ResBlock"
        )
    label_emb = weights.get(UNET + "label_emb.weight")  # (num_classes, 4 mc), x4 upscaler only
    adm = weights.get(UNET + "label_emb.0.0.weight")  # (4 mc, adm_in_channels), SDXL only
    return replace(
        base,
        in_channels=conv_in[1],
        out_channels=_shape(weights, UNET + "out.2.weight")[0],
        model_channels=mc,
        attention_resolutions=tuple(attention),
        num_res_blocks=num_res_blocks,
        channel_mult=tuple(widths[0] // mc for widths in levels),
        context_dim=context_dim,
        use_linear_in_transformer=proj_in_ndim == 2 if attention else base.use_linear_in_transformer,
        transformer_depth=tuple(depths),
        transformer_depth_output=tuple(output_depths),
        transformer_depth_middle=middle_depth,
        num_classes=None if label_emb is None else label_emb.shape[0],
        adm_in_channels=None if adm is None else adm.shape[1],
        disable_self_attentions=tuple(no_self_attention) if any(no_self_attention) else (),
        disable_middle_self_attn=middle_depth > 0 and _attends_to_context(weights, middle + "1."),
    )


def _detect_vae(weights: dict[str, torch.Tensor], resolution: int) -> VAEConfig:
    """Sizes from shapes; `resolution` (not in the weights) only says where attention levels sit."""
    enc = VAE + "encoder."
    ch = _shape(weights, enc + "conv_in.weight")[0]
    levels = _indices(weights, re.escape(enc) + r"down\.(\d+)\.")
    z_channels = _shape(weights, VAE + "decoder.conv_in.weight")[1]
    return VAEConfig(
        embed_dim=_shape(weights, VAE + "post_quant_conv.weight")[1],
        z_channels=z_channels,
        in_channels=_shape(weights, enc + "conv_in.weight")[1],
        out_ch=_shape(weights, VAE + "decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=tuple(_shape(weights, f"{enc}down.{n}.block.0.conv2.weight")[0] // ch for n in levels),
        num_res_blocks=len(_indices(weights, re.escape(enc) + r"down\.0\.block\.(\d+)\.")),
        attn_resolutions=tuple(
            resolution // 2**n for n in levels if f"{enc}down.{n}.attn.0.q.weight" in weights
        ),
        resolution=resolution,
        double_z=_shape(weights, enc + "conv_out.weight")[0] == 2 * z_channels,
    )


# ---------------------------------------------------------------- the original YAML


def _read_yaml_params(path: Path) -> dict:
    try:
        params = yaml.safe_load(Path(path).read_text())["model"]["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not an original inference YAML (need model.params): {exc!r}") from exc
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: model.params is a {type(params).__name__}, not a mapping")
    return params


def family_from_yaml(path: Path, text: TextEncoderConfig) -> Family:
    """The family an original inference YAML describes; `text` sizes come from the weights (the
    YAML names only the text encoder's class and layer)."""
    params = _read_yaml_params(path)
    if "network_config" in params:
        raise CheckpointError(
            f"{path}: an sgm (SDXL) YAML, but the checkpoint holds SD 1.x/2.x weights (cond_stage_model.*)"
        )
    try:
        unet_p = params["unet_config"]["params"]
        vae_p = params["first_stage_config"]["params"]
        cond = params["cond_stage_config"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: not an original inference YAML (need model.params with unet_config, "
            f"first_stage_config and cond_stage_config): {exc!r}"
        ) from exc
    kinds = {"FrozenCLIPEmbedder": "clip", "FrozenOpenCLIPEmbedder": "open_clip"}
    kind = kinds.get(str(cond.get("target", "")).rsplit(".", 1)[-1])
    if kind is None:
        raise CheckpointError(
            f"{path}: cond_stage_config target {cond.get('target')!r}; allowed: {', '.join(kinds)}"
        )
    if kind != text.kind:
        raise CheckpointError(
            f"{path}: the YAML names text encoder {kind!r} but the checkpoint holds {text.kind!r}"
        )
    parameterization = params.get("parameterization", "eps")
    predictions = {"eps": "epsilon", "v": "v"}
    conditioning = params.get("conditioning_key", "crossattn")
    if parameterization not in predictions or conditioning not in ("crossattn", "hybrid", "hybrid-adm"):
        raise CheckpointError(
            f"{path}: parameterization {parameterization!r} / conditioning_key {conditioning!r}; "
            f"allowed: eps or v / crossattn, hybrid or hybrid-adm"
        )
    num_classes = unet_p.get("num_classes")
    if num_classes is not None and not isinstance(num_classes, int):
        raise CheckpointError(f"{path}: num_classes {num_classes!r}; allowed: an integer (x4 upscaler)")
    unet, vae = _unet_from_yaml(path, unet_p, num_classes=num_classes), _vae_from_yaml(path, vae_p)
    return Family(
        prediction=predictions[parameterization],
        conditioning=conditioning,
        unet=unet,
        vae=vae,
        text=replace(text, layer=cond.get("params", {}).get("layer", "last")),
        scale_factor=params.get("scale_factor", 1.0),
        linear_start=params["linear_start"],
        linear_end=params["linear_end"],
        timesteps=params.get("timesteps", 1000),
        low_scale=_low_scale(params.get("low_scale_config")),
    )


def _unet_from_yaml(path: Path, unet_p: dict, **fields: object) -> UNetConfig:
    """`unet_config.params` (ldm) or `network_config.params` (sgm); `fields` override."""
    head_channels = unet_p.get("num_head_channels", -1)
    depth = unet_p.get("transformer_depth", 1)
    try:
        return UNetConfig(
            in_channels=unet_p["in_channels"],
            out_channels=unet_p["out_channels"],
            model_channels=unet_p["model_channels"],
            attention_resolutions=tuple(unet_p["attention_resolutions"]),
            num_res_blocks=unet_p["num_res_blocks"],
            channel_mult=tuple(unet_p["channel_mult"]),
            num_heads=-1 if head_channels > 0 else unet_p.get("num_heads", -1),
            num_head_channels=head_channels,
            context_dim=unet_p["context_dim"],
            use_linear_in_transformer=unet_p.get("use_linear_in_transformer", False),
            transformer_depth=depth if isinstance(depth, int) else tuple(depth),
            transformer_depth_middle=unet_p.get("transformer_depth_middle"),
            disable_self_attentions=tuple(unet_p.get("disable_self_attentions") or ()),
            disable_middle_self_attn=unet_p.get("disable_middle_self_attn", False),
            **fields,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete or invalid UNet config: {exc!r}") from exc


def _vae_from_yaml(path: Path, vae_p: dict) -> VAEConfig:
    try:
        ddconfig = vae_p["ddconfig"]
        return VAEConfig(
            embed_dim=vae_p["embed_dim"],
            z_channels=ddconfig["z_channels"],
            in_channels=ddconfig["in_channels"],
            out_ch=ddconfig["out_ch"],
            ch=ddconfig["ch"],
            ch_mult=tuple(ddconfig["ch_mult"]),
            num_res_blocks=ddconfig["num_res_blocks"],
            attn_resolutions=tuple(ddconfig["attn_resolutions"]),
            resolution=ddconfig["resolution"],
            double_z=ddconfig.get("double_z", True),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete ddconfig: {exc!r}") from exc


def sdxl_family_from_yaml(path: Path, weights: dict[str, torch.Tensor]) -> Family:
    """The family an sgm inference YAML (`sd_xl_base.yaml`, `sd_xl_refiner.yaml`) describes; the
    text towers' sizes come from the weights, their layers from the YAML."""
    params = _read_yaml_params(path)
    try:
        unet_p = dict(params["network_config"]["params"])
        vae_p = params["first_stage_config"]["params"]
        emb_models = params["conditioner_config"]["params"]["emb_models"]
        denoiser = params["denoiser_config"]["params"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: not an sgm inference YAML (need model.params with network_config, "
            f"conditioner_config, first_stage_config and denoiser_config): {exc!r}"
        ) from exc
    texts: list[TextEncoderConfig] = []
    sizes: list[SizeKey] = []
    outdims: set[int] = set()
    for n, emb in enumerate(emb_models):
        target = str(emb.get("target", "")).rsplit(".", 1)[-1]
        p = emb.get("params") or {}
        if target == "ConcatTimestepEmbedderND":
            sizes.append(emb.get("input_key"))
            outdims.add(p.get("outdim", 256))
            continue
        if sizes or target not in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2"):
            raise CheckpointError(
                f"{path}: embedder {n} is {target!r}; supported: FrozenCLIPEmbedder and "
                f"FrozenOpenCLIPEmbedder2 text towers, then ConcatTimestepEmbedderND size embedders"
            )
        text = _detect_text(weights, f"{CONDITIONER}{n}.")
        kind = "clip" if target == "FrozenCLIPEmbedder" else "open_clip"
        if text.kind != kind:
            raise CheckpointError(
                f"{path}: embedder {n} is {target} but the checkpoint holds {text.kind!r} there"
            )
        texts.append(_text_layer(path, n, text, p))
    if len(outdims) > 1:
        raise CheckpointError(f"{path}: size embedders of different outdim {sorted(outdims)}")
    scaling = str(denoiser.get("scaling_config", {}).get("target", "")).rsplit(".", 1)[-1]
    predictions = {"EpsScaling": "epsilon", "VScaling": "v"}
    discretization = denoiser.get("discretization_config", {})
    if scaling not in predictions or not str(discretization.get("target", "")).endswith("LegacyDDPMDiscretization"):
        raise CheckpointError(
            f"{path}: denoiser scaling {scaling!r} over {discretization.get('target')!r}; supported: "
            f"EpsScaling or VScaling over LegacyDDPMDiscretization"
        )
    schedule = discretization.get("params") or {}
    try:
        conditioner = ConditionerConfig(texts=tuple(texts), sizes=tuple(sizes), outdim=outdims.pop() if outdims else 256)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    context = unet_p.get("context_dim")
    if isinstance(context, list):  # the refiner lists one per level; our UNet takes one width
        if len(set(context)) != 1:
            raise CheckpointError(f"{path}: context_dim {context}; only one width for every level is supported")
        unet_p["context_dim"] = context[0]
    if unet_p.get("num_classes") != "sequential":
        raise CheckpointError(f"{path}: num_classes {unet_p.get('num_classes')!r}; SDXL needs 'sequential'")
    unet = _unet_from_yaml(path, unet_p, adm_in_channels=unet_p.get("adm_in_channels"))
    if unet.adm_in_channels != conditioner.adm_in_channels or unet.context_dim != conditioner.context_dim:
        raise CheckpointError(
            f"{path}: the UNet takes context {unet.context_dim} and ADM {unet.adm_in_channels}, but "
            f"the conditioner gives {conditioner.context_dim} and {conditioner.adm_in_channels}"
        )
    base = SDXL_REFINER if conditioner.refiner else SDXL
    return replace(
        base,
        prediction=predictions[scaling],
        conditioning="hybrid" if unet.in_channels == 9 else "crossattn",
        unet=unet,
        vae=_vae_from_yaml(path, vae_p),
        text=conditioner.texts[-1],
        conditioner=conditioner,
        scale_factor=params.get("scale_factor", 1.0),
        linear_start=schedule.get("linear_start", base.linear_start),
        linear_end=schedule.get("linear_end", base.linear_end),
        timesteps=schedule.get("num_timesteps", base.timesteps),
    )


def _text_layer(path: Path, n: int, text: TextEncoderConfig, p: dict) -> TextEncoderConfig:
    """A tower's layer from its sgm params: CLIP `hidden` at the next-to-last index (11 of 12) or
    `last`; OpenCLIP `penultimate` or `last`, normed by ln_final only when `legacy`."""
    layer = p.get("layer", "last")
    if text.kind == "clip":
        if layer == "last":
            return replace(text, layer="last", final_norm=True)
        if layer == "hidden" and p.get("layer_idx") == text.layers - 1:
            return replace(text, layer="penultimate", final_norm=False)
    elif layer in ("last", "penultimate"):
        return replace(text, layer=layer, final_norm=bool(p.get("legacy", True)))
    raise CheckpointError(
        f"{path}: embedder {n} layer {layer!r} (layer_idx {p.get('layer_idx')!r}); supported: CLIP "
        f"'last' or 'hidden' at layer_idx {text.layers - 1}, OpenCLIP 'last' or 'penultimate'"
    )


def _low_scale(config: dict | None) -> LowScaleConfig | None:
    if config is None:
        return None
    p = config.get("params", {})
    schedule = p.get("noise_schedule_config", {})
    default = LowScaleConfig()
    return LowScaleConfig(
        linear_start=schedule.get("linear_start", default.linear_start),
        linear_end=schedule.get("linear_end", default.linear_end),
        max_noise_level=p.get("max_noise_level", default.max_noise_level),
    )


# ---------------------------------------------------------------- v-prediction probe


@torch.no_grad()
def predicts_v(unet: UNetModel) -> bool:
    """Whether an SD 2.x UNet was trained for v-prediction: the check of AUTOMATIC1111's web UI
    (`is_using_v_parameterization_for_sd2`), run in the model's own device and dtype.

    At t = 999 (alpha_bar ~ 0.005) the input is almost pure noise, so an epsilon model returns
    roughly its input and mean(output - input) stays near 0, while a v model returns
    v ~ 0.07 eps - x0, a different quantity; on the released 512-base and 768-v weights the v
    model's mean lands below -1. The threshold is empirical: it means nothing for random weights,
    hence the YAML and the `prediction` override take precedence."""
    param = next(unet.parameters())
    side = max(8, 2 ** (len(unet.config.channel_mult) - 1))
    x = torch.full((1, unet.config.in_channels, side, side), 0.5, device=param.device, dtype=param.dtype)
    context = torch.full((1, 2, unet.config.context_dim), 0.5, device=param.device, dtype=param.dtype)
    t = torch.tensor([999.0], device=param.device)
    return (unet(x, t, context) - x).float().mean().item() < -1.0


# ---------------------------------------------------------------- public API


def _resolve(
    path: Path, config_yaml: Path | None, prediction: Prediction | None
) -> tuple[dict[str, torch.Tensor], Family, PredictionSource]:
    """Weights and family; source "probe" means `predicts_v` must still settle the prediction."""
    weights = model_weights(read_state_dict(path), Path(path))
    try:
        if config_yaml is not None:
            if any(k.startswith(CONDITIONER) for k in weights):
                family = sdxl_family_from_yaml(config_yaml, weights)
            else:
                family = family_from_yaml(config_yaml, _detect_text(weights))
            source = "yaml"
        else:
            family = detect_family(weights)
            # SD 2.x txt2img only: SDXL is epsilon unless its YAML or the override says v.
            probe = family.text.kind == "open_clip" and family.conditioning == "crossattn" and not family.conditioner
            source = "probe" if probe else "family default"
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if prediction is not None:
        if prediction not in ("epsilon", "v"):
            raise CheckpointError(f"prediction {prediction!r}; allowed: epsilon, v")
        family, source = replace(family, prediction=prediction), "override"
    return weights, family, source


def _build(
    family: Family, weights: dict[str, torch.Tensor], path: Path, config_yaml: Path | None
) -> StableDiffusion:
    """Construct without initialising (meta device), then adopt the checkpoint's tensors."""
    with torch.device("meta"):
        model = StableDiffusion(family)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as exc:
        origin = f"the config {config_yaml}" if config_yaml else f"the {family.name} layout detected"
        raise CheckpointError(f"{path}: tensors do not match {origin}: {exc}") from exc
    return model.eval().requires_grad_(False)


def load_checkpoint(
    path: Path | str,
    config_yaml: Path | str | None = None,
    prediction: Prediction | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    fuse_projections: bool = True,
) -> StableDiffusion:
    """A ready model: the YAML (when given) or detection decides the family, `prediction`
    overrides both, and SD 2.x txt2img checkpoints without either are probed with `predicts_v`.
    `vae_dtype` (default: `dtype`) lets the VAE stay float32 under float16 weights without a
    lossy round trip through float16. `fuse_projections`: the UNet's attention projections that
    read the same input run as one GEMM (`UNetModel.fuse_projections`; the state dict keeps the
    original keys)."""
    path = Path(path)
    config_yaml = Path(config_yaml) if config_yaml is not None else None
    weights, family, source = _resolve(path, config_yaml, prediction)
    model = _build(family, weights, path, config_yaml)
    model.model.to(device=device, dtype=dtype)
    (model.cond_stage_model if family.conditioner is None else model.conditioner).to(device=device, dtype=dtype)
    model.first_stage_model.to(device=device, dtype=vae_dtype or dtype)
    if fuse_projections:
        model.unet.fuse_projections()
    if source == "probe" and predicts_v(model.unet):
        model.family = replace(family, prediction="v")
    return model


def inspect_checkpoint(
    path: Path | str, config_yaml: Path | str | None = None, prediction: Prediction | None = None
) -> CheckpointInfo:
    """Family, prediction, parameter counts and stored dtype; builds only the UNet, and only when
    the prediction has to be probed."""
    path = Path(path)
    config_yaml = Path(config_yaml) if config_yaml is not None else None
    weights, family, source = _resolve(path, config_yaml, prediction)
    if source == "probe":
        unet_weights = {k.removeprefix(UNET): v.float() for k, v in weights.items() if k.startswith(UNET)}
        with torch.device("meta"):
            unet = UNetModel(family.unet)
        unet.load_state_dict(unet_weights, strict=True, assign=True)
        family = replace(family, prediction="v" if predicts_v(unet.eval()) else family.prediction)
    counts = Counter[str]()
    for key, tensor in weights.items():
        part = "unet" if key.startswith(UNET) else "vae" if key.startswith(VAE) else "text_encoder"
        counts[part] += tensor.numel()
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for k, t in weights.items() if k.startswith(UNET))
    return CheckpointInfo(
        path=path,
        family=family.name,
        prediction=family.prediction,
        prediction_source=source,
        parameters=dict(counts),
        dtype=dtypes.most_common(1)[0][0],
        native_size=family.native_size,
        context_dim=family.unet.context_dim,
        unet=family.unet,
    )
