"""Our networks against diffusers / transformers as independent oracles, float32 on CPU.

The fixture's original-layout tensors go through diffusers' own single-file converters, which
expect the original key names, so these tests also prove the fixture and our modules use them."""

from __future__ import annotations

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from diffusers.models.embeddings import get_timestep_embedding
from transformers import CLIPTextConfig, CLIPTextModel

from models.loading import load_checkpoint, read_state_dict
from models.stable_diffusion import StableDiffusion
from models.unet import timestep_embedding
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_checkpoints  # noqa: F401


def assert_same(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal up to float32 rounding: max abs error below 1e-5 of the output's magnitude."""
    assert ours.shape == reference.shape
    scale = reference.abs().max().item()
    assert scale > 1e-3, "degenerate output proves nothing"
    error = (ours - reference).abs().max().item()
    assert error <= 1e-5 * scale, f"max abs error {error:.3g} vs output scale {scale:.3g}"


def _original(
    checkpoints: TinyCheckpoints, family: str
) -> tuple[dict[str, torch.Tensor], dict, StableDiffusion]:
    path, yaml_path = checkpoints.get(family)
    weights = {k: v.float() for k, v in read_state_dict(path).items()}
    return weights, yaml.safe_load(yaml_path.read_text()), load_checkpoint(path, yaml_path)


def test_timestep_embedding_is_cos_then_sin_like_the_original() -> None:
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    ours = timestep_embedding(t, 32)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(16) / 16)
    args = t[:, None] * freqs  # (B, 16)
    torch.testing.assert_close(ours, torch.cat([torch.cos(args), torch.sin(args)], -1))
    reference = get_timestep_embedding(t, 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sd1-inpaint", "x4-upscaler"])
def test_unet_matches_diffusers(tiny_checkpoints: TinyCheckpoints, family: str) -> None:
    weights, original_config, model = _original(tiny_checkpoints, family)
    config = create_unet_diffusers_config_from_ldm(original_config, weights)
    if model.family.unet.num_head_channels > 0:
        # diffusers derives the SD 2.x head count as model_channels // 64 * mult, which is 0 for
        # 32-channel tiny models; give it the real count (channels // head width) per block.
        config["attention_head_dim"] = [max(1, c // 64) for c in config["block_out_channels"]]
    reference = UNet2DConditionModel(**config).eval()
    reference.load_state_dict(convert_ldm_unet_checkpoint(weights, config), strict=True)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, model.family.unet.in_channels, 16, 16, generator=g)  # (B, C, H, W)
    t = torch.tensor([3.0, 999.0])
    context = torch.randn(2, 77, model.family.unet.context_dim, generator=g)  # (B, T, D)
    noise_level = torch.tensor([20, 350]) if model.family.unet.num_classes else None  # x4 upscaler
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context, class_labels=noise_level).sample
        assert_same(model.unet(x, t, context, noise_level), expected)


def test_vae_matches_diffusers(tiny_checkpoints: TinyCheckpoints) -> None:
    weights, original_config, model = _original(tiny_checkpoints, "sd1")
    config = create_vae_diffusers_config_from_ldm(original_config, weights)
    reference = AutoencoderKL(**config).eval()
    reference.load_state_dict(convert_ldm_vae_checkpoint(weights, config), strict=True)

    image = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1  # (B, 3, H, W)
    with torch.no_grad():
        posterior, expected = model.vae.encode(image), reference.encode(image).latent_dist
        assert_same(posterior.mean, expected.mean)
        assert_same(posterior.logvar, expected.logvar)
        assert posterior.mean.shape[-2:] == (24 // model.vae_scale, 32 // model.vae_scale)
        assert_same(model.vae.decode(posterior.mean), reference.decode(expected.mean).sample)

    # Sampling is mean + std * noise, the noise drawn from the caller's CPU generator.
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    sample = posterior.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, expected.mean + expected.std * noise)


def _tokens(model: StableDiffusion, prompts: list[str]) -> torch.Tensor:
    enc = model.text_encoder
    rows = []
    for prompt in prompts:
        ids = [enc.bos_id, *enc.tokenize(prompt), enc.eos_id]
        rows.append(ids + [enc.pad_id] * (enc.max_length - len(ids)))
    return torch.tensor(rows)  # (B, 77)


def test_sd1_text_encoder_matches_transformers(tiny_checkpoints: TinyCheckpoints) -> None:
    weights, _, model = _original(tiny_checkpoints, "sd1")
    text = model.family.text
    reference = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=text.vocab_size, hidden_size=text.width, num_hidden_layers=text.layers,
            num_attention_heads=1, intermediate_size=text.mlp_width, hidden_act="quick_gelu",
        )
    ).eval()
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(weights).items()}
    converted.pop("embeddings.position_ids")  # saved by old transformers, a buffer nobody loads now
    reference.load_state_dict(converted, strict=True)

    tokens = _tokens(model, ["a photo of a cat", "cinematic film still, ((low light:1.4))"])
    with torch.no_grad():
        assert_same(model.text_encoder(tokens), reference(input_ids=tokens).last_hidden_state)


def test_sd2_text_encoder_is_penultimate_layer_like_diffusers(tiny_checkpoints: TinyCheckpoints) -> None:
    weights, _, model = _original(tiny_checkpoints, "sd2-v")
    text = model.family.text
    # diffusers runs SD 2.x text encoders as a CLIP with the last layer dropped (penultimate
    # hidden state) followed by the final layer norm, in transformers' own implementation.
    reference = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=text.vocab_size, hidden_size=text.width, num_hidden_layers=text.layers - 1,
            num_attention_heads=1, intermediate_size=text.mlp_width, hidden_act="gelu",
            projection_dim=text.projection_dim,
        )
    ).eval()
    converted = convert_open_clip_checkpoint(reference, weights)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    last = f"encoder.layers.{text.layers - 1}."
    missing, unexpected = reference.load_state_dict(converted, strict=False)
    assert missing == [] and all(k.startswith(last) or k == "text_projection" for k in unexpected), unexpected

    tokens = _tokens(model, ["a photo of a cat", "panda wearing a blue spacesuit"])
    assert (tokens[:, -1] == 0).all()  # open_clip pads with 0
    with torch.no_grad():
        assert_same(model.text_encoder(tokens), reference(input_ids=tokens).last_hidden_state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["sd1", "x4-upscaler"])  # CLIP; open_clip, label_emb
def test_half_precision_weights_run_end_to_end(
        tiny_checkpoints: TinyCheckpoints, family: str, dtype: torch.dtype) -> None:
    """Dtype plumbing (float32 timestep embedding, masks, noise levels) under half-precision
    weights; bfloat16 keeps ~3 significant digits, so this checks closeness only."""
    path, yaml_path = tiny_checkpoints.get(family)
    full, half = load_checkpoint(path, yaml_path), load_checkpoint(path, yaml_path, dtype=dtype)
    tokens = _tokens(full, ["a photo of a cat"])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, full.family.unet.in_channels, 8, 8, generator=g)
    y = torch.tensor([100]) if full.family.unet.num_classes else None
    with torch.no_grad():
        context = full.text_encoder(tokens)
        half_context = half.text_encoder(tokens)
        assert half_context.dtype == dtype
        out = full.unet(x, torch.tensor([500.0]), context, y)
        half_out = half.unet(x.to(dtype), torch.tensor([500.0]), half_context, y)
        image = half.vae.decode(torch.randn(1, 4, 8, 8, generator=g).to(dtype))
    assert half_out.dtype == image.dtype == dtype
    assert (half_out.float() - out).abs().max() < 0.1 * out.abs().max()
