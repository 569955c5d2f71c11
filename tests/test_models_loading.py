"""Checkpoint loading: detection and YAMLs for every family and format, strictness, the
v-prediction probe and its overrides, and the errors users see for bad files."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from models import families
from models.families import Family
from models.loading import (
    CheckpointError,
    detect_family,
    family_from_yaml,
    inspect_checkpoint,
    load_checkpoint,
    model_weights,
    read_state_dict,
)
from models.stable_diffusion import StableDiffusion
from tests.fixtures.checkpoints import tiny_checkpoints  # noqa: F401
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_family, write_checkpoint

FAMILIES = ["sd1", "sd2", "sd2-v", "sd1-inpaint", "sd2-inpaint", "x4-upscaler"]
#: SD 2.x txt2img files, whose prediction detection leaves to the probe.
PROBED = {"sd2", "sd2-v"}


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_loads_strictly_by_yaml_and_by_detection(
    tiny_checkpoints: TinyCheckpoints, family: str, fmt: str
) -> None:
    path, yaml_path = tiny_checkpoints.get(family, fmt)
    by_yaml = load_checkpoint(path, yaml_path)
    detected = load_checkpoint(path)

    assert by_yaml.family == tiny_family(family)
    # Detection finds the same networks; only SD 2.x txt2img's prediction is left to the probe,
    # whose verdict on random weights means nothing (see test_probe_*).
    assert replace(detected.family, prediction=by_yaml.family.prediction) == by_yaml.family
    if family not in PROBED:
        assert detected.family == by_yaml.family

    stored = read_state_dict(path)
    loaded = by_yaml.state_dict()
    skipped = {"betas", "alphas_cumprod", "model_ema.decay", "model_ema.num_updates"}
    skipped |= {"low_scale_model.alphas_cumprod"}
    skipped |= {k for k in stored if k.endswith("embeddings.position_ids")}
    assert set(loaded) == set(stored) - skipped
    for key, tensor in loaded.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, stored[key].float()), key


def test_legacy_non_zip_ckpt_loads(tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    """Pre-1.6 torch.save files cannot be memory-mapped; they are read whole instead."""
    weights = read_state_dict(tiny_checkpoints.get("sd1")[0])
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": weights}, path, _use_new_zipfile_serialization=False)
    assert inspect_checkpoint(path).family == "sd1"


def test_tiny_latents_are_half_the_image(tiny_checkpoints: TinyCheckpoints) -> None:
    model = load_checkpoint(tiny_checkpoints.get("sd1-inpaint")[0])
    assert model.vae_scale == 2 and model.latent_channels == 4 and model.family.unet.in_channels == 9
    latents = model.vae.encode(torch.zeros(1, 3, 32, 48)).mean
    assert latents.shape == (1, 4, 16, 24)


def test_load_converts_dtype(tmp_path: Path) -> None:
    path, _ = write_checkpoint(tmp_path, "sd1", with_yaml=False, dtype=torch.float32)
    model = load_checkpoint(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    # Built on the meta device: every tensor must have been replaced by the file's.
    assert list(model.buffers()) == [] and not any(p.is_meta for p in model.parameters())

    model = load_checkpoint(path, dtype=torch.float16, vae_dtype=torch.float32)
    assert {p.dtype for p in model.unet.parameters()} == {p.dtype for p in model.text_encoder.parameters()}
    assert {p.dtype for p in model.unet.parameters()} == {torch.float16}
    stored = read_state_dict(path)["first_stage_model.decoder.conv_out.weight"]
    assert torch.equal(model.vae.decoder.conv_out.weight, stored)  # float32, not rounded to float16


def test_missing_tensor_is_named(tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    weights = read_state_dict(tiny_checkpoints.get("sd2-v")[0])
    del weights["cond_stage_model.model.text_projection"]
    path = tmp_path / "incomplete.safetensors"
    safetensors.torch.save_file(weights, path)
    expected = f"{path}: incomplete checkpoint: no tensor cond_stage_model.model.text_projection"
    with pytest.raises(CheckpointError, match=expected):
        inspect_checkpoint(path)


def test_inspect_reports_counts_and_stored_dtype(tiny_checkpoints: TinyCheckpoints) -> None:
    path, yaml_path = tiny_checkpoints.get("sd2-v")
    info = inspect_checkpoint(path, yaml_path)
    model = load_checkpoint(path, yaml_path)
    assert (info.family, info.prediction, info.prediction_source, info.dtype) == ("sd2-v", "v", "yaml", "float16")
    assert info.parameters == {
        "unet": sum(p.numel() for p in model.unet.parameters()),
        "vae": sum(p.numel() for p in model.vae.parameters()),
        "text_encoder": sum(p.numel() for p in model.text_encoder.parameters()),
    }


# ------------------------------------------------------------------ real-size families


@pytest.mark.parametrize("family", families.KNOWN_FAMILIES, ids=lambda f: f.name)
def test_detects_every_real_family_from_its_shapes(family: Family) -> None:
    with torch.device("meta"):
        weights = StableDiffusion(family).state_dict()
    # Shapes cannot tell 768-v from 512-base: detection leaves that to the probe (epsilon until then).
    assert detect_family(weights) == (families.SD2 if family is families.SD2_V else family)


def test_real_sizes_have_the_published_parameter_counts() -> None:
    with torch.device("meta"):
        sd1, sd2 = StableDiffusion(families.SD1), StableDiffusion(families.SD2)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(sd1.unet) == 859_520_964  # SD 1.x UNet
    assert count(sd2.unet) == 865_910_724  # SD 2.x UNet
    assert count(sd1.vae) == count(sd2.vae) == 83_653_863
    assert count(sd1.text_encoder) == 123_060_480  # CLIP ViT-L/14 text model
    with torch.device("meta"):
        x4 = StableDiffusion(families.X4_UPSCALER)
    assert count(x4.unet) == 473_398_020  # stable-diffusion-x4-upscaler UNet
    assert x4.vae_scale == 4


# Verbatim model sections of the released inference YAMLs (CompVis/stable-diffusion,
# Stability-AI/stablediffusion), keys the loader does not read left out.
V1_INFERENCE = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false   # Note: different from the one we trained before
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 512
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""

V2_INFERENCE_V = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 96
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False # we set this to false because this is an inference only config
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64 # need to fix for flash-attn
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          #attn_type: "vanilla-xformers"
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""

V2_INPAINTING = (
    V2_INFERENCE_V.replace('    parameterization: "v"\n', "")
    .replace("conditioning_key: crossattn", "conditioning_key: hybrid")
    .replace("in_channels: 4\n        out_channels", "in_channels: 9\n        out_channels")
)


X4_UPSCALING = """
model:
  target: ldm.models.diffusion.ddpm.LatentUpscaleDiffusion
  params:
    parameterization: "v"
    low_scale_key: "lr"
    linear_start: 0.0001
    linear_end: 0.02
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 128
    channels: 4
    cond_stage_trainable: false
    conditioning_key: "hybrid-adm"
    monitor: val/loss_simple_ema
    scale_factor: 0.08333
    use_ema: False
    low_scale_config:
      target: ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation
      params:
        noise_schedule_config: # image space
          linear_start: 0.0001
          linear_end: 0.02
        max_noise_level: 350
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        num_classes: 1000  # timesteps for noise conditioning (here constant, just need one)
        image_size: 128
        in_channels: 7
        out_channels: 4
        model_channels: 256
        attention_resolutions: [ 2,4,8]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 2, 4]
        disable_self_attentions: [True, True, True, False]
        disable_middle_self_attn: False
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False
        use_linear_in_transformer: True
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: True
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [ 1,2,4 ]  # num_down = len(ch_mult)-1
          num_res_blocks: 2
          attn_resolutions: [ ]
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""


@pytest.mark.parametrize(
    ("text", "family"),
    [
        (V1_INFERENCE, families.SD1),
        (V2_INFERENCE_V, families.SD2_V),
        (V2_INPAINTING, families.SD2_INPAINT),
        (X4_UPSCALING, families.X4_UPSCALER),
    ],
    ids=["v1-inference", "v2-inference-v", "v2-inpainting-inference", "x4-upscaling"],
)
def test_released_yamls_give_the_family_constants(tmp_path: Path, text: str, family: Family) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert family_from_yaml(path, family.text) == family


# ------------------------------------------------------------------ prediction


def _sd2_with_constant_output(directory: Path, value: float) -> Path:
    """A tiny SD 2.x checkpoint whose UNet outputs `value` everywhere (zero final conv + bias),
    so the probe's statistic, mean(output - 0.5), is known exactly."""
    path, _ = write_checkpoint(directory, "sd2", with_yaml=False)
    weights = read_state_dict(path)
    weights["model.diffusion_model.out.2.weight"].zero_()
    weights["model.diffusion_model.out.2.bias"].fill_(value)
    safetensors.torch.save_file(weights, path)
    return path


@pytest.mark.parametrize(("value", "expected"), [(-2.0, "sd2-v"), (-0.4, "sd2")])  # threshold: -1
def test_probe_decides_sd2_prediction_without_yaml(tmp_path: Path, value: float, expected: str) -> None:
    path = _sd2_with_constant_output(tmp_path, value)
    assert load_checkpoint(path).family.name == expected
    info = inspect_checkpoint(path)
    assert (info.family, info.prediction_source) == (expected, "probe")


def test_yaml_and_override_win_over_the_probe(tmp_path: Path) -> None:
    path = _sd2_with_constant_output(tmp_path, -2.0)  # the probe would say v
    yaml_path = tmp_path / "eps.yaml"
    config = yaml.safe_load(write_checkpoint(tmp_path / "y", "sd2", with_yaml=True)[1].read_text())
    yaml_path.write_text(yaml.safe_dump(config))
    assert load_checkpoint(path, yaml_path).family.name == "sd2"
    assert inspect_checkpoint(path, yaml_path).prediction_source == "yaml"
    assert load_checkpoint(path, prediction="epsilon").family.name == "sd2"
    assert load_checkpoint(path, yaml_path, prediction="v").family.name == "sd2-v"
    assert inspect_checkpoint(path, yaml_path, prediction="v").prediction_source == "override"


def test_sd1_and_inpainting_are_never_probed(tiny_checkpoints: TinyCheckpoints) -> None:
    for family in ("sd1", "sd1-inpaint", "sd2-inpaint"):
        info = inspect_checkpoint(tiny_checkpoints.get(family)[0])
        assert (info.prediction, info.prediction_source) == ("epsilon", "family default")


def test_bad_prediction_override_is_refused(tiny_checkpoints: TinyCheckpoints) -> None:
    with pytest.raises(CheckpointError, match="allowed: epsilon, v"):
        load_checkpoint(tiny_checkpoints.get("sd1")[0], prediction="x0")  # type: ignore[arg-type]


# ------------------------------------------------------------------ errors


class _CreatesFile:
    """Unpickling this would create a file: the stand-in for arbitrary code in a .ckpt."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "extra": _CreatesFile(marker)}
    torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"refused to load: the pickle asks for \S*open"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_truncated_file_is_reported(tiny_checkpoints: TinyCheckpoints, tmp_path: Path, fmt: str) -> None:
    data = tiny_checkpoints.get("sd1", fmt)[0].read_bytes()
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{path}: not a readable"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["notes.safetensors", "notes.ckpt"])
def test_non_checkpoint_file_is_reported(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("these are not the weights you are looking for\n" * 10)
    with pytest.raises(CheckpointError, match="not a readable"):
        inspect_checkpoint(path)


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"unsupported file type '\.bin'; allowed: \.safetensors, \.ckpt"):
        load_checkpoint(tmp_path / "model.bin")


def test_unknown_family_says_what_was_found(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"encoder.layers.0.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"no model\.diffusion_model\.\* keys; found 2 keys like decoder\.bias"):
        load_checkpoint(path)


def test_unsupported_text_encoder_says_what_was_found(tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    weights = read_state_dict(tiny_checkpoints.get("sd1")[0])
    sdxl_like = {
        k.replace("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."): v
        for k, v in weights.items()
    }
    with pytest.raises(CheckpointError, match="unrecognised text encoder.*conditioner.embedders.0"):
        model_weights(sdxl_like, tmp_path / "x.safetensors")


def test_yaml_that_does_not_match_the_weights(tiny_checkpoints: TinyCheckpoints) -> None:
    path, _ = tiny_checkpoints.get("sd1")
    _, inpaint_yaml = tiny_checkpoints.get("sd1-inpaint")
    with pytest.raises(CheckpointError, match="do not match the config"):
        load_checkpoint(path, inpaint_yaml)
    _, sd2_yaml = tiny_checkpoints.get("sd2-v")
    with pytest.raises(CheckpointError, match="names text encoder 'open_clip' but the checkpoint holds 'clip'"):
        load_checkpoint(path, sd2_yaml)


def test_fixture_is_small_and_deterministic(tmp_path: Path) -> None:
    first, _ = write_checkpoint(tmp_path / "a", "sd2-v", with_yaml=False, seed=3)
    second, _ = write_checkpoint(tmp_path / "b", "sd2-v", with_yaml=False, seed=3)
    other, _ = write_checkpoint(tmp_path / "c", "sd2-v", with_yaml=False, seed=4)
    assert first.read_bytes() == second.read_bytes() != other.read_bytes()
    assert first.stat().st_size < 8 * 2**20
    assert not math.isnan(sum(v.float().sum().item() for v in read_state_dict(first).values()))
