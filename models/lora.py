"""LoRA files as people download them, mapped onto the original checkpoint layout and merged into
a loaded model's weights in place, then restored exactly.

Layouts read: kohya sd-scripts (`lora_unet_<diffusers module path, "_" for ".">.lora_down.weight`,
`.lora_up.weight`, `.alpha`; `lora_te_<HF CLIP module path>`; LoCon convolutions; for SDXL the UNet
under its ORIGINAL sgm module paths, `lora_unet_input_blocks_4_1_...`, and the two text towers as
`lora_te1_` (CLIP ViT-L) and `lora_te2_` (OpenCLIP bigG in HF CLIP names)) and the diffusers/PEFT
ones (`unet.<path>.lora_A.weight` / `lora_B`, `.lora.down.weight` / `.lora.up.weight`,
`text_encoder.<path>...`, SDXL's bigG `text_encoder_2.<path>...`). The diffusers module names are
mapped onto ours by ONE mapping derived from the built UNet's module tree (`unet_module_names`),
so it holds for every model size; the original paths are ours already.

The merge rule: W' = W + w * (alpha / rank) * (up @ down), alpha absent = rank; a 3x3 down with a
1x1 up composes into a 3x3 delta; q/k/v LoRAs land on row slices of fused weights: thirds of the
OpenCLIP towers' (SD 2.x, SDXL's bigG) `in_proj_weight`, and of the UNet's `to_qkv` / halves of its
`to_kv` when its projections are fused (`UNetModel.fuse_projections`). Merging writes into the
existing parameter tensors (`copy_`), never replacing a parameter or a module, so compiled
graphs and CUDA graphs captured over the weights stay valid without recompiling; the touched
originals are kept and copied back, so restoring is bit-exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from models.stable_diffusion import StableDiffusion
from models.text_encoders import CLIPTextEncoder, TextEncoder
from models.unet import Downsample, ResBlock, SpatialTransformer, UNetModel, Upsample


class AddonFileError(ValueError):
    """An add-on file (LoRA, embedding) is unusable; the message says why and what is allowed."""


class LoraError(AddonFileError):
    """A LoRA file is unusable with this model."""


#: Family labels by the UNet's cross-attention context width (= the text encoder's output width).
FAMILY_BY_CONTEXT = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL refiner", 2048: "SDXL"}

#: diffusers' ResnetBlock2D names -> the original ResBlock's.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
#: Suffixes of the tensors of one LoRA module in every layout read, by role.
_PARTS = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"),  # diffusers' attention processors: attn1.processor.to_q_lora
    ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
)
#: Key fragments of the LyCORIS / DoRA variants, which are not plain low-rank products.
_REFUSED = {
    "hada_w1": "LoHa (LyCORIS)",
    "lokr_w1": "LoKr (LyCORIS)",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "oft_": "OFT",
}


def family_label(context_dim: int, name: str = "") -> str:
    """The family label of a model with `context_dim`-wide conditioning; with its `Family.name`,
    SDXL models are named so at every size (tiny test ones too), as their add-ons are."""
    if name.startswith("sdxl"):
        return "SDXL refiner" if name == "sdxl-refiner" else "SDXL"
    return FAMILY_BY_CONTEXT.get(context_dim, f"a model with {context_dim}-wide conditioning")


def model_family(network: StableDiffusion) -> str:
    """The family label of a loaded model, as LoRA and embedding messages name it."""
    return family_label(network.family.unet.context_dim, network.family.name)


def fits_family(family: str, network: StableDiffusion) -> bool:
    """Whether an add-on labelled `family` is for this model: its family, or (files whose only
    clue is a width: tiny test models) its conditioning width."""
    return family in (model_family(network), family_label(network.family.unet.context_dim))


# --- the one mapping: diffusers module paths -> original module paths ----------------------------


def _block_names(unet: UNetModel) -> dict[str, str]:
    """diffusers block path -> original block path, by walking the built UNet: input blocks count
    resnets/attentions per level until a Downsample ends the level; output blocks until an Upsample."""
    names = dict(_TOP)
    if unet.config.adm_in_channels is not None:  # SDXL's ADM MLP (sgm's "sequential" label_emb)
        names |= {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}

    def add(prefix: str, j: int, block: nn.Module, path: str) -> None:
        for k, layer in enumerate(block):
            if isinstance(layer, ResBlock):
                names[f"{prefix}.resnets.{j}"] = f"{path}.{k}"
            elif isinstance(layer, SpatialTransformer):
                names[f"{prefix}.attentions.{j}"] = f"{path}.{k}"
            elif isinstance(layer, Downsample):
                names[f"{prefix}.downsamplers.0"] = f"{path}.{k}"
            elif isinstance(layer, Upsample):
                names[f"{prefix}.upsamplers.0"] = f"{path}.{k}"

    level, j = 0, 0
    for i, block in enumerate(unet.input_blocks):
        if i == 0:
            continue
        add(f"down_blocks.{level}", j, block, f"input_blocks.{i}")
        if isinstance(block[0], Downsample):
            level, j = level + 1, 0
        else:
            j += 1
    seen = {"resnets": 0, "attentions": 0}
    for k, layer in enumerate(unet.middle_block):
        kind = "resnets" if isinstance(layer, ResBlock) else "attentions"
        names[f"mid_block.{kind}.{seen[kind]}"] = f"middle_block.{k}"
        seen[kind] += 1
    level, j = 0, 0
    for i, block in enumerate(unet.output_blocks):
        add(f"up_blocks.{level}", j, block, f"output_blocks.{i}")
        if isinstance(block[-1], Upsample):
            level, j = level + 1, 0
        else:
            j += 1
    return names


def _inner_name(block: nn.Module, name: str) -> str:
    """The diffusers name of a module inside a block, given its original name."""
    if isinstance(block, ResBlock):
        return next(d for d, o in _RESNET.items() if name == o)
    if isinstance(block, Downsample | Upsample):
        return "conv"
    return name  # SpatialTransformer: diffusers kept the original names inside


def unet_module_names(unet: UNetModel) -> dict[str, str]:
    """diffusers module path -> original module path (relative to the UNet) of every module that
    holds weights directly (Linear, Conv2d, norms) in the original layout, whether or not the UNet's
    projections are fused (the state dict keeps the original keys): the one mapping LoRA keys go
    through."""
    names = {}
    for d_block, o_block in _block_names(unet).items():
        block = unet.get_submodule(o_block)
        if not any(True for _ in block.children()):  # conv_in, conv_out, time_embed.N, out.0
            names[d_block] = o_block
            continue
        for key in block.state_dict():
            name = key.rpartition(".")[0]
            names[f"{d_block}.{_inner_name(block, name)}"] = f"{o_block}.{name}"
    return names


@dataclass(frozen=True)
class Target:
    """Where a LoRA module's delta goes: a parameter of `StableDiffusion` and, for fused q/k/v
    (OpenCLIP's `in_proj_weight`, the UNet's fused projections), the slice of its rows."""

    parameter: str
    rows: slice | None = None


def text_towers(network: StableDiffusion) -> list[tuple[str, str, TextEncoder]]:
    """(LoRA name, key prefix, tower) of each text tower, by diffusers' names: SD 1.x/2.x's one is
    `text_encoder`; SDXL's CLIP ViT-L is `text_encoder` and its OpenCLIP bigG `text_encoder_2`
    (the refiner has only the latter)."""
    if network.family.conditioner is None:
        return [("text_encoder", "cond_stage_model.", network.cond_stage_model)]
    return [
        ("text_encoder" if isinstance(tower, CLIPTextEncoder) else "text_encoder_2",
         f"conditioner.embedders.{i}.", tower)
        for i, tower in enumerate(network.conditioner.texts)
    ]


def _text_targets(encoder: TextEncoder, prefix: str) -> dict[str, Target]:
    """HF CLIP module path (`text_model.encoder.layers.N.self_attn.q_proj`...) -> target, under the
    tower's key `prefix`. CLIP ViT-L is HF CLIP itself; OpenCLIP towers (SD 2.x, SDXL's bigG) get
    the equivalent names (what kohya's trainer and diffusers use)."""
    if isinstance(encoder, CLIPTextEncoder):
        return {
            name: Target(f"{prefix}transformer.{name}.weight")
            for name, module in encoder.transformer.named_modules()
            if isinstance(module, nn.Linear)
        }
    targets = {}
    width = encoder.config.width
    for n in range(len(encoder.model.transformer.resblocks)):
        layer, block = f"text_model.encoder.layers.{n}", f"{prefix}model.transformer.resblocks.{n}"
        for i, part in enumerate("qkv"):
            targets[f"{layer}.self_attn.{part}_proj"] = Target(f"{block}.attn.in_proj_weight", slice(i * width, (i + 1) * width))
        targets[f"{layer}.self_attn.out_proj"] = Target(f"{block}.attn.out_proj.weight")
        targets[f"{layer}.mlp.fc1"] = Target(f"{block}.mlp.c_fc.weight")
        targets[f"{layer}.mlp.fc2"] = Target(f"{block}.mlp.c_proj.weight")
    return targets


def lora_targets(network: StableDiffusion) -> dict[str, Target]:
    """Every LoRA module name this model accepts, in the normalised form `unet.<diffusers path>` /
    `text_encoder.<HF CLIP path>` (SDXL's bigG: `text_encoder_2.`), plus the original UNet paths
    (`unet.input_blocks...`) that kohya's SDXL trainer and others write."""
    unet_prefix = "model.diffusion_model."
    unet = network.unet
    fused = unet.fused_rows()
    targets = {}
    for d_name, o_name in unet_module_names(unet).items():
        key = f"{o_name}.weight"
        parameter, rows = fused.get(key, (key, None))
        if isinstance(unet.get_submodule(parameter.removesuffix(".weight")), nn.Linear | nn.Conv2d):
            targets[f"unet.{d_name}"] = targets[f"unet.{o_name}"] = Target(f"{unet_prefix}{parameter}", rows)
    for tower_name, prefix, tower in text_towers(network):
        targets |= {f"{tower_name}.{name}": t for name, t in _text_targets(tower, prefix).items()}
    return targets


def _kohya_index(targets: dict[str, Target], sdxl: bool) -> dict[str, str]:
    """kohya's flattened names (`lora_unet_down_blocks_0_...`, `lora_te_text_model_...`; SDXL's
    `lora_unet_input_blocks_...`, `lora_te1_...`, `lora_te2_...`) -> ours."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    index = {}
    for name in targets:
        tower, _, path = name.partition(".")
        index[prefixes[tower] + path.replace(".", "_")] = name
    return index


# --- reading files ----------------------------------------------------------------------------------


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, the header's metadata) of a .safetensors file; any unreadable file
    raises AddonFileError naming it."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            return {key: file.get_tensor(key) for key in file.keys()}, metadata  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AddonFileError(f"{what} {path.name} is not a readable .safetensors file ({exc})") from None


def read_header(path: Path, what: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(tensor shapes by key, metadata) from the header alone (cheap: for folder listings)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
            return shapes, file.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AddonFileError(f"{what} {path.name} is not a readable .safetensors file ({exc})") from None


def _normalise(module: str) -> str:
    """diffusers' attention-processor names (`attn1.processor.to_q`, `to_out`; in the text encoder
    `self_attn.to_q` for `q_proj`) -> module paths."""
    module = module.replace(".processor.", ".")
    if ".self_attn." in module:
        return re.sub(r"\.to_(q|k|v|out)$", r".\1_proj", module)
    return re.sub(r"\.to_out$", ".to_out.0", module)


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, role: down / up / alpha) of a LoRA tensor key, None for other keys."""
    for suffix, role in _PARTS:
        if key.endswith(suffix):
            return _normalise(key[: -len(suffix)]), role
    return None


def refused_kind(keys: Sequence[str]) -> str | None:
    """The name of a LyCORIS/DoRA variant the keys show, if any."""
    return next((kind for key in keys for frag, kind in _REFUSED.items() if frag in key), None)


def lora_family(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The family a LoRA file was trained for, from its keys and shapes (None: cannot tell)."""
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in shapes):
        return "SDXL"
    downs = [(parts[0], shape) for key, shape in shapes.items()
             if (parts := split_key(key)) is not None and parts[1] == "down" and len(shape) >= 2]
    # the UNet's context width first: an SDXL file's CLIP ViT-L layers are as wide as SD 1.x's
    for pattern in (r"attn2[._]to_[kv]$", r"self_attn[._]q_proj$"):
        width = next((shape[1] for module, shape in downs if re.search(pattern, module)), None)
        if width is not None:
            return family_label(width)
    return None


def metadata_family(metadata: dict[str, str]) -> str | None:
    """The family kohya's or modelspec metadata names (`ss_base_model_version`, `ss_v2`,
    `modelspec.architecture`), None when it names none."""
    base = (metadata.get("ss_base_model_version", "") + metadata.get("modelspec.architecture", "")).lower()
    if "xl" in base:
        return "SDXL"
    if metadata.get("ss_v2") == "True" or "v2" in base:
        return "SD 2.x"
    return "SD 1.x" if "v1" in base else None


@dataclass(frozen=True)
class LoraPatch:
    """One low-rank update: delta = scale * (up @ down), added to `target`."""

    target: Target
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    scale: float  # alpha / rank

    def delta(self, weight: float, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The float32 delta at LoRA weight `weight`, shaped `shape` (the target's, or its rows'),
        on `device`."""
        down = self.down.to(device, torch.float32).flatten(1)  # (r, in * kh * kw)
        up = self.up.to(device, torch.float32).flatten(1)  # (out, r)
        return (weight * self.scale * (up @ down)).reshape(shape)


@dataclass(frozen=True)
class Lora:
    """A LoRA file mapped onto one model: its patches and what the file says about itself."""

    name: str
    patches: tuple[LoraPatch, ...]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraNames:
    """Every LoRA module name one model accepts, with its target: `lora_targets` and kohya's
    flattened spellings. Walking the model's modules costs more than mapping a file, so a set of
    files is mapped with one of these."""

    targets: dict[str, Target]
    kohya: dict[str, str]

    @classmethod
    def of(cls, network: StableDiffusion) -> LoraNames:
        targets = lora_targets(network)
        return cls(targets, _kohya_index(targets, network.family.conditioner is not None))

    def target(self, module: str) -> Target | None:
        """The target of a LoRA module name in any layout read, None when the model has none."""
        return self.targets.get(module) or self.targets.get(self.kohya.get(module, ""))


def lora_for(
    network: StableDiffusion,
    name: str,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    names: LoraNames | None = None,
) -> Lora:
    """Map the tensors of LoRA file `name` onto `network` (`names`: its `LoraNames`, when already
    built for other files); refuse (LoraError) variants we do not merge, other families, modules
    the model lacks and shapes that do not fit."""
    model = model_family(network)
    refused = refused_kind(list(tensors))
    if refused:
        raise LoraError(f"LoRA {name} is a {refused} file; only plain LoRA and LoCon files are supported")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    family = lora_family(shapes) or metadata_family(metadata or {})
    if family is not None and not fits_family(family, network):
        raise LoraError(f"LoRA {name} is for {family}; the model is {model}")
    names = names or LoraNames.of(network)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parts = split_key(key)
        if parts is None:
            raise LoraError(f"LoRA {name} has a tensor {key!r} that is not part of a LoRA (lora_down/lora_up/alpha)")
        module, role = parts
        modules.setdefault(module, {})[role] = tensor
    params = dict(network.named_parameters())
    patches = []
    for module, parts in modules.items():
        target = names.target(module)
        if target is None:
            raise LoraError(f"LoRA {name} changes {module!r}, which a {model} model does not have "
                            f"(is the file for another family?)")
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"LoRA {name} is incomplete: {module!r} lacks its "
                            f"{'lora_down' if 'down' not in parts else 'lora_up'} weight")
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        weight = params[target.parameter]
        shape = weight[target.rows].shape if target.rows else weight.shape
        fits = (
            down.dim() == up.dim() in (2, 4) and up.shape[1] == rank and up.shape[2:] in ((), (1, 1))
            and up.shape[0] == shape[0] and down[0].numel() == shape[1:].numel()
        )
        if not fits:
            raise LoraError(f"LoRA {name} does not fit {model} at {module!r}: up {tuple(up.shape)}, down "
                            f"{tuple(down.shape)} for a weight of {tuple(shape)} (is the file for another family?)")
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        patches.append(LoraPatch(target, down, up, alpha / rank))
    if not patches:
        raise LoraError(f"LoRA {name} holds no LoRA weights")
    return Lora(name, tuple(patches), metadata or {})


def load_lora(path: Path, network: StableDiffusion) -> Lora:
    """Read and map one LoRA .safetensors file (the name is its stem)."""
    tensors, metadata = read_safetensors(path, "LoRA")
    return lora_for(network, path.stem, tensors, metadata)


# --- merging ----------------------------------------------------------------------------------------


def merged_deltas(network: StableDiffusion, loras: Sequence[tuple[Lora, float]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, float32 delta of the whole parameter) of a LoRA set, one parameter at a
    time (memory: one delta): the deltas of all LoRAs on a parameter add."""
    params = dict(network.named_parameters())
    by_parameter: dict[str, list[tuple[LoraPatch, float]]] = {}
    for lora, weight in loras:
        for patch in lora.patches:
            by_parameter.setdefault(patch.target.parameter, []).append((patch, weight))
    for name, patches in by_parameter.items():
        param = params[name]
        total: torch.Tensor | None = None
        for patch, weight in patches:
            if patch.target.rows is not None:
                total = torch.zeros(param.shape, device=param.device) if total is None else total
                view = total[patch.target.rows]
                view += patch.delta(weight, view.shape, param.device)
            elif total is None:
                total = patch.delta(weight, param.shape, param.device)
            else:
                total += patch.delta(weight, param.shape, param.device)
        yield name, total


class LoraMerge:
    """The LoRA set merged into one loaded model's weights. The originals of the weights a set
    touches are copied aside when first touched; `apply` writes each touched weight as original +
    the new set's delta, and copies back (bit for bit) those the new set leaves alone; an unchanged
    set costs nothing. Weights change in place only (`copy_`): parameter tensors keep their
    identity and storage, so compiled and CUDA graphs over them stay valid without recompiling."""

    def __init__(self) -> None:
        self._originals: dict[str, torch.Tensor] = {}
        self.applied: tuple[tuple[str, float], ...] = ()

    @torch.no_grad()
    def apply(self, network: StableDiffusion, loras: Sequence[tuple[Lora, float]], key: tuple) -> None:
        """Make `loras` (each with its weight) the merged set; `key` names the set (names and
        weights, and whatever identifies the files' contents) so an unchanged set is kept."""
        if key == self.applied:
            return
        params = dict(network.named_parameters())
        touched = {p.target.parameter for lora, _ in loras for p in lora.patches}
        self.applied = ()  # until the new set is complete
        try:
            for name in [n for n in self._originals if n not in touched]:
                params[name].copy_(self._originals.pop(name))
            for name, delta in merged_deltas(network, loras):
                param = params[name]
                original = self._originals.get(name)
                if original is None:
                    original = self._originals[name] = param.detach().clone()
                if param.dtype == torch.float32:  # straight into the parameter's storage
                    torch.add(original, delta, out=param)
                else:
                    param.copy_(original.float().add_(delta))
        except BaseException:
            self.restore(network)
            raise
        self.applied = key

    @torch.no_grad()
    def restore(self, network: StableDiffusion) -> None:
        """Copy the touched original weights back: the model is exactly as loaded."""
        params = dict(network.named_parameters())
        for name, original in self._originals.items():
            params[name].copy_(original)
        self._originals.clear()
        self.applied = ()
