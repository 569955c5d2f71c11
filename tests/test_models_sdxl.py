"""SDXL in models/: strict loads by sgm YAML and by detection, real sizes, clear errors, and the
UNet, the size conditioning and both text towers against diffusers / transformers (float32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models import families
from models.conditioner import Conditioner
from models.loading import (
    CheckpointError,
    detect_family,
    inspect_checkpoint,
    load_checkpoint,
    read_state_dict,
    sdxl_family_from_yaml,
)
from models.stable_diffusion import StableDiffusion
from models.unet import ResBlock
from tests.fixtures.checkpoints import TinySDXL, sgm_yaml, tiny_sdxl, tiny_sdxl_family  # noqa: F401
from tests.test_models_parity import assert_same

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner", "sdxl-inpaint", "sdxl-distilled"])
def test_loads_strictly_by_yaml_and_by_detection(tiny_sdxl: TinySDXL, name: str) -> None:
    path, yaml_path = tiny_sdxl.get(name)
    expected = tiny_sdxl_family(name)
    detected = load_checkpoint(path)
    assert detected.family == expected
    if yaml_path is not None:
        assert load_checkpoint(path, yaml_path).family == expected
    weights = read_state_dict(path)
    loaded = detected.state_dict()
    network = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
    assert loaded.keys() == network.keys()  # every tensor, under its original name
    assert all(torch.equal(loaded[k], network[k].float()) for k in network)


def test_distilled_layout_has_per_block_depths_and_a_single_resblock_middle(tiny_sdxl: TinySDXL) -> None:
    model = load_checkpoint(tiny_sdxl.get("sdxl-distilled")[0])
    unet = model.unet
    assert len(unet.middle_block) == 1 and isinstance(unet.middle_block[0], ResBlock)
    depths = [len(block[1].transformer_blocks) if len(block) > 1 and hasattr(block[1], "transformer_blocks") else 0
              for block in unet.input_blocks[1:] if not hasattr(block[0], "op")]
    assert depths == [0, 0, 1, 2, 2, 1]
    assert model.family.unet.output_depths == (1, 3, 2, 2, 1, 1, 0, 0, 0)


def test_real_sizes_have_the_published_parameter_counts() -> None:
    with torch.device("meta"):
        base = StableDiffusion(families.SDXL)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(base.unet) == 2_567_463_684  # SDXL 1.0 UNet
    clip_l, bigg = base.text_encoders
    assert count(clip_l) == 123_060_480  # CLIP ViT-L/14 text model
    assert count(bigg) == 694_659_841  # OpenCLIP ViT-bigG/14 text tower (with logit_scale)
    assert count(base.vae) == 83_653_863
    assert base.family.native_size == 1024 and base.family.scale_factor == 0.13025
    assert "float16" not in base.family.vae_dtypes  # the SDXL VAE overflows float16


@pytest.mark.parametrize(("name", "family"), [("sd_xl_base", families.SDXL), ("sd_xl_refiner", families.SDXL_REFINER)])
def test_released_sgm_yamls_give_the_family_constants(tmp_path: Path, name: str, family: families.Family) -> None:
    with torch.device("meta"):
        weights = StableDiffusion(family).state_dict()
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_released_yaml(name)))
    assert sdxl_family_from_yaml(path, weights) == family
    assert detect_family(weights) == family


def _released_yaml(name: str) -> dict:
    """sgm's configs/inference YAML, as the tiny fixture writes it but at real sizes and with the
    released file's own quirks (the base's per-level depths [1, 2, 10], the refiner's context_dim
    list): the fixture's writer is checked against the originals' structure here."""
    config = sgm_yaml(families.SDXL if name == "sd_xl_base" else families.SDXL_REFINER)
    network = config["model"]["params"]["network_config"]["params"]
    if name == "sd_xl_base":
        assert network["transformer_depth"] == [10, 2, 10]
        network["transformer_depth"] = [1, 2, 10]  # level 1 has no attention: its depth is unused
        assert network["context_dim"] == 2048 and network["adm_in_channels"] == 2816
    else:
        assert network["transformer_depth"] == 4 and network["context_dim"] == [1280] * 4
        assert network["adm_in_channels"] == 2560
    return config


def test_mismatched_yaml_and_weights_get_clear_errors(tiny_sdxl: TinySDXL, tmp_path: Path) -> None:
    base, base_yaml = tiny_sdxl.get("sdxl")
    refiner, refiner_yaml = tiny_sdxl.get("sdxl-refiner")
    with pytest.raises(CheckpointError, match="embedder 0 is FrozenOpenCLIPEmbedder2 but the checkpoint holds 'clip'"):
        load_checkpoint(base, refiner_yaml)
    with pytest.raises(CheckpointError, match="do not match the config"):
        load_checkpoint(refiner, _with_depth(refiner_yaml, tmp_path, 1))
    ldm_yaml = tmp_path / "v1.yaml"
    ldm_yaml.write_text(yaml.safe_dump({"model": {"params": {"unet_config": {}}}}))
    with pytest.raises(CheckpointError, match="not an sgm inference YAML"):
        load_checkpoint(base, ldm_yaml)


def _with_depth(yaml_path: Path, directory: Path, depth: int) -> Path:
    config = yaml.safe_load(yaml_path.read_text())
    config["model"]["params"]["network_config"]["params"]["transformer_depth"] = depth
    out = directory / "edited.yaml"
    out.write_text(yaml.safe_dump(config))
    return out


def test_conditioner_without_a_pooled_tower_says_what_was_found(tiny_sdxl: TinySDXL, tmp_path: Path) -> None:
    weights = read_state_dict(tiny_sdxl.get("sdxl")[0])
    only_clip = {k: v for k, v in weights.items() if not k.startswith("conditioner.embedders.1.")}
    path = tmp_path / "clip-only.safetensors"
    safetensors.torch.save_file(only_clip, path)
    with pytest.raises(CheckpointError, match=r"unrecognised text encoder.*conditioner\.embedders\.0\.transformer"):
        load_checkpoint(path)


def test_inspect_counts_the_conditioner_as_text_encoder(tiny_sdxl: TinySDXL) -> None:
    path, yaml_path = tiny_sdxl.get("sdxl")
    info = inspect_checkpoint(path, yaml_path)
    model = load_checkpoint(path)
    assert (info.family, info.prediction, info.native_size) == ("sdxl", "epsilon", 1024 // 4)
    assert info.parameters["text_encoder"] == sum(p.numel() for p in model.conditioner.parameters())


# ------------------------------------------------------------------ against diffusers / transformers


def _diffusers_unet(weights: dict[str, torch.Tensor], model: StableDiffusion, yaml_path: Path | None) -> UNet2DConditionModel:
    u = model.family.unet
    if yaml_path is not None:
        config = create_unet_diffusers_config_from_ldm(yaml.safe_load(yaml_path.read_text()), weights)
    else:  # the distilled layout: no YAML can state it, so the config is written out here
        config = create_unet_diffusers_config_from_ldm(sgm_yaml(tiny_sdxl_family("sdxl")), weights)
        blocks = u.num_res_blocks
        config["transformer_layers_per_block"] = [
            list(u.input_depths[i * blocks : (i + 1) * blocks]) for i in range(len(u.channel_mult))
        ]
        config["reverse_transformer_layers_per_block"] = [
            list(u.output_depths[i * (blocks + 1) : (i + 1) * (blocks + 1)]) for i in range(len(u.channel_mult))
        ]
        config["mid_block_type"] = "UNetMidBlock2D"  # one ResBlock (num_layers=0)
    # diffusers takes SDXL's head counts per block, and calls it text_time only at real widths.
    config["attention_head_dim"] = [max(1, c // 64) for c in config["block_out_channels"]]
    config |= {"addition_embed_type": "text_time", "addition_time_embed_dim": 256, "class_embed_type": None}
    reference = UNet2DConditionModel(**config).eval()
    reference.load_state_dict(convert_ldm_unet_checkpoint(weights, config), strict=True)
    return reference


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner", "sdxl-distilled"])
def test_unet_and_size_conditioning_match_diffusers(tiny_sdxl: TinySDXL, name: str) -> None:
    path, yaml_path = tiny_sdxl.get(name)
    weights = {k: v.float() for k, v in read_state_dict(path).items()}
    model = load_checkpoint(path, yaml_path)
    reference = _diffusers_unet(weights, model, yaml_path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)  # (B, C, H, W)
    t = torch.tensor([3.0, 999.0])
    context = torch.randn(2, 77, model.family.unet.context_dim, generator=g)
    pooled = torch.randn(2, model.family.text.projection_dim, generator=g)
    if name == "sdxl-refiner":  # (h, w) original, (top, left) crop, aesthetic score
        sizes = {"original_size_as_tuple": [[1024, 768], [512, 512]], "crop_coords_top_left": [[0, 0], [16, 8]],
                 "aesthetic_score": [[6.0], [2.5]]}
    else:  # original, crop, target
        sizes = {"original_size_as_tuple": [[1024, 768], [512, 512]], "crop_coords_top_left": [[0, 0], [16, 8]],
                 "target_size_as_tuple": [[1024, 768], [640, 1536]]}
    time_ids = torch.cat([torch.tensor(v, dtype=torch.float32) for v in sizes.values()], dim=1)
    y = model.conditioner.vector(pooled, {k: torch.tensor(v) for k, v in sizes.items()})
    with torch.no_grad():
        expected = reference(
            x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        assert_same(model.unet(x, t, context, y), expected)


def _tokens(encoder, prompts: list[str]) -> torch.Tensor:
    rows = []
    for prompt in prompts:
        ids = [encoder.bos_id, *encoder.tokenize(prompt), encoder.eos_id]
        rows.append(ids + [encoder.pad_id] * (encoder.max_length - len(ids)))
    return torch.tensor(rows)  # (B, 77)


def test_text_towers_are_hidden_layers_and_pooled_projection_like_transformers(tiny_sdxl: TinySDXL) -> None:
    """sgm: CLIP-L `layer: hidden, layer_idx: 11` is hidden_states[11] of 12 layers (the
    next-to-last, no final norm); OpenCLIP bigG `penultimate, legacy: False` likewise, and its
    pooled output is ln_final of the last layer at EOS times text_projection: transformers'
    CLIPTextModelWithProjection.text_embeds, as diffusers' SDXL pipeline uses them."""
    path, _ = tiny_sdxl.get("sdxl")
    weights = {k: v.float() for k, v in read_state_dict(path).items()}
    model = load_checkpoint(path)
    clip_l, bigg = model.text_encoders
    l_cfg, g_cfg = clip_l.config, bigg.config
    reference_l = CLIPTextModel(CLIPTextConfig(
        vocab_size=l_cfg.vocab_size, hidden_size=l_cfg.width, num_hidden_layers=l_cfg.layers,
        num_attention_heads=l_cfg.heads, intermediate_size=l_cfg.mlp_width, hidden_act="quick_gelu",
    )).eval()
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(weights).items()}
    converted.pop("embeddings.position_ids", None)
    reference_l.load_state_dict(converted, strict=True)
    reference_g = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=g_cfg.vocab_size, hidden_size=g_cfg.width, num_hidden_layers=g_cfg.layers,
        num_attention_heads=g_cfg.heads, intermediate_size=g_cfg.mlp_width, hidden_act="gelu",
        projection_dim=g_cfg.projection_dim, eos_token_id=49407,
    )).eval()
    converted = convert_open_clip_checkpoint(reference_g, weights, prefix="conditioner.embedders.1.model.")
    missing, unexpected = reference_g.load_state_dict(converted, strict=False)
    assert missing == [] and unexpected == [], (missing, unexpected)

    prompts = ["a photo of a cat", "panda wearing a blue spacesuit, 8k"]
    tokens_l, tokens_g = _tokens(clip_l, prompts), _tokens(bigg, prompts)
    assert (tokens_l[:, -1] == 49407).all() and (tokens_g[:, -1] == 0).all()  # CLIP pads with EOS, open_clip 0
    with torch.no_grad():
        out_l = reference_l(input_ids=tokens_l, output_hidden_states=True)
        out_g = reference_g(input_ids=tokens_g, output_hidden_states=True)
        assert_same(clip_l(tokens_l), out_l.hidden_states[-2])
        assert_same(bigg(tokens_g), out_g.hidden_states[-2])
        states, pooled = bigg.forward_pooled(tokens_g)  # both from one run of the tower
        assert_same(states, out_g.hidden_states[-2])
        assert_same(pooled, out_g.text_embeds)


def test_size_features_are_sgm_fourier_embeddings_in_order() -> None:
    conditioner = Conditioner(tiny_sdxl_family("sdxl").conditioner)
    pooled = torch.arange(6.0).view(1, 6).repeat(1, 8)  # (1, 48)
    sizes = {"original_size_as_tuple": torch.tensor([[768, 1024]]), "crop_coords_top_left": torch.tensor([[0, 32]]),
             "target_size_as_tuple": torch.tensor([[896, 1152]])}
    y = conditioner.vector(pooled, sizes)
    assert y.shape == (1, 48 + 6 * 256)
    assert torch.equal(y[:, :48], pooled)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
    for i, value in enumerate([768, 1024, 0, 32, 896, 1152]):
        args = value * freqs
        torch.testing.assert_close(y[0, 48 + 256 * i : 48 + 256 * (i + 1)], torch.cat([args.cos(), args.sin()]))
    with pytest.raises(ValueError, match=r"size conditioning \['target_size_as_tuple'\] missing"):
        conditioner.vector(pooled, {k: v for k, v in sizes.items() if k != "target_size_as_tuple"})
