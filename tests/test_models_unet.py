"""models/unet.py's fused attention projections (`UNetModel.fuse_projections`): the fused UNet's
output equals the original separate projections' in float32 on tiny checkpoints of every layout
(1x1 conv and linear transformer projections, v-prediction, inpainting, the x4 upscaler whose attn1
reads the context, SDXL base and refiner), and its state dict stays the original checkpoint's,
keys and values, both ways. And the cached steps' split (`forward_deep` / `forward_shallow`):
the shallow call on the deep feature of the same inputs is the full call."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.families import UNetConfig
from models.loading import load_checkpoint
from models.unet import BasicTransformerBlock, UNetModel
from tests.fixtures.checkpoints import TinyCheckpoints, TinySDXL, tiny_checkpoints, tiny_sdxl  # noqa: F401

UNET = "model.diffusion_model."


def _checkpoint(name: str, tiny_checkpoints: TinyCheckpoints, tiny_sdxl: TinySDXL) -> tuple[Path, Path | None]:
    return tiny_sdxl.get(name) if name.startswith("sdxl") else tiny_checkpoints.get(name)


def _call(unet: UNetModel) -> torch.Tensor:
    """One UNet call on random inputs (2 rows, an 8x8 latent, 7 context tokens), in float32 on
    the CPU whatever the UNet's device and dtype."""
    c = unet.config
    weight = next(unet.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, c.in_channels, 8, 8, generator=generator)
    context = torch.randn(2, 7, c.context_dim, generator=generator)
    y = None
    if c.num_classes is not None:  # the x4 upscaler's noise level
        y = torch.tensor([3, 20])
    elif c.adm_in_channels is not None:  # SDXL's ADM vector
        y = torch.randn(2, c.adm_in_channels, generator=generator)
    inputs = [x, torch.tensor([10.0, 700.0]), context, y]
    inputs = [t if t is None else t.to(weight.device, weight.dtype if t.is_floating_point() else t.dtype)
              for t in inputs]
    with torch.no_grad():
        return unet(*inputs).float().cpu()


@pytest.mark.parametrize("name", ["sd1", "sd2-v", "sd2-inpaint", "x4-upscaler", "sdxl", "sdxl-refiner"])
def test_fused_projections_compute_the_original_unet(
    tiny_checkpoints: TinyCheckpoints, tiny_sdxl: TinySDXL, name: str
) -> None:
    path, yaml = _checkpoint(name, tiny_checkpoints, tiny_sdxl)
    plain = load_checkpoint(path, yaml, fuse_projections=False).unet
    fused = load_checkpoint(path, yaml).unet  # fused by default
    blocks = [m for m in fused.modules() if isinstance(m, BasicTransformerBlock)]
    assert blocks and not plain.fused_rows()
    for block in blocks:  # q/k/v of self-attention; k/v of the context (attn2, and attn1 where it reads it)
        assert (block.attn1.to_qkv is None) == block.disable_self_attn == (block.attn1.to_kv is not None)
        assert block.attn2.to_kv is not None and block.attn2.to_qkv is None
    if name == "x4-upscaler":
        assert any(block.disable_self_attn for block in blocks)
    expected = _call(plain)
    torch.testing.assert_close(_call(fused), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("name", ["sd1", "x4-upscaler", "sdxl"])
def test_the_state_dict_keeps_the_original_keys_both_ways(
    tiny_checkpoints: TinyCheckpoints, tiny_sdxl: TinySDXL, name: str
) -> None:
    path, yaml = _checkpoint(name, tiny_checkpoints, tiny_sdxl)
    plain = load_checkpoint(path, yaml, fuse_projections=False).unet
    fused = load_checkpoint(path, yaml).unet
    original = plain.state_dict()
    saved = fused.state_dict()
    assert set(saved) == set(original)
    assert all(torch.equal(saved[key], original[key]) for key in original)
    fused.fuse_projections()  # again: nothing changes
    assert set(fused.state_dict()) == set(original)

    # the original keys load strictly into a fused UNet, stacked into its fused weights
    reloaded = UNetModel(plain.config)
    reloaded.fuse_projections()
    reloaded.load_state_dict({k: v.clone() for k, v in original.items()}, strict=True)
    assert torch.equal(_call(reloaded), _call(fused))
    for key, (fused_key, rows) in reloaded.fused_rows().items():
        assert torch.equal(reloaded.get_parameter(fused_key)[rows], original[key])

    # a missing original weight is named by the strict check, not stacked short
    key = next(k for k in original if k.endswith("attn2.to_k.weight"))
    with pytest.raises(RuntimeError, match=r"attn2\.to_kv\.weight"):
        reloaded.load_state_dict({k: v for k, v in original.items() if k != key}, strict=True)


def test_the_loaded_network_saves_as_the_checkpoint_it_came_from(tiny_checkpoints: TinyCheckpoints) -> None:
    """What sizes the model cache (`Engine.size`) and what saving the network would write: the
    original tensors under the original keys."""
    import safetensors.torch

    path, yaml = tiny_checkpoints.get("sd2-v")
    stored = safetensors.torch.load_file(path)
    network = load_checkpoint(path, yaml)
    assert network.unet.fused_rows()
    saved = {k: v for k, v in network.state_dict().items() if k.startswith(UNET)}
    assert set(saved) == {k for k in stored if k.startswith(UNET)}
    assert all(torch.equal(saved[k], stored[k].float()) for k in saved)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_projections_on_a_gpu_round_no_worse_than_the_separate_ones(
    tiny_checkpoints: TinyCheckpoints, tiny_sdxl: TinySDXL, dtype: torch.dtype
) -> None:
    """In half precision on CUDA (other GEMM kernels for the wider fused weights), the fused UNet
    is as close to the float32 one as the separate projections are."""
    for name in ("sd2-v", "sdxl"):
        path, yaml = _checkpoint(name, tiny_checkpoints, tiny_sdxl)
        expected = _call(load_checkpoint(path, yaml, device="cuda", fuse_projections=False).unet)
        errors = [(_call(load_checkpoint(path, yaml, device="cuda", dtype=dtype, fuse_projections=fuse).unet)
                   - expected).abs().max().item() for fuse in (False, True)]
        assert errors[1] <= 2 * errors[0] + 1e-3 * expected.abs().max().item(), (name, errors)


def _inputs(c: UNetConfig, rows: int = 2, side: int = 8) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(rows, c.in_channels, side, side, generator=generator)
    y = None if c.adm_in_channels is None else torch.randn(rows, c.adm_in_channels, generator=generator)
    if c.num_classes is not None:  # the x4 upscaler's noise levels
        y = torch.arange(rows) * 10
    return x, torch.linspace(10.0, 900.0, rows), torch.randn(rows, 7, c.context_dim, generator=generator), y


@pytest.mark.parametrize("name", ["sd1", "sd2-v", "sdxl", "x4-upscaler", "sd1 two resblocks"])
def test_the_shallow_call_on_the_deep_feature_of_the_same_inputs_is_the_full_call(
    tiny_checkpoints: TinyCheckpoints, tiny_sdxl: TinySDXL, name: str
) -> None:
    """Cached steps' split (DeepCache): `forward_deep` is `forward` plus the feature entering the
    shallow output blocks, and `forward_shallow` given that feature computes `forward` again
    without the deep blocks. The tiny layouts have one ResBlock per level (the kept feature is
    level 1's upsampled output); "two resblocks" is the real SD layout, where it is level 0's."""
    if name == "sd1 two resblocks":
        path, yaml = tiny_checkpoints.get("sd1")
        config = replace(load_checkpoint(path, yaml).unet.config, num_res_blocks=2)
        torch.manual_seed(0)
        unet = UNetModel(config).eval()
        unet.fuse_projections()
    else:
        path, yaml = _checkpoint(name, tiny_checkpoints, tiny_sdxl)
        unet = load_checkpoint(path, yaml).unet  # fused projections, as the engine runs it
    x, t, context, y = _inputs(unet.config)
    deeper = []
    unet.middle_block.register_forward_hook(lambda *_: deeper.append(1))
    with torch.no_grad():
        expected = unet(x, t, context, y)
        out, deep = unet.forward_deep(x, t, context, y)
        assert len(deeper) == 2
        shallow = unet.forward_shallow(x, t, context, y, deep)
        other = unet.forward_shallow(x, t, context, y, deep + 0.1 * torch.randn_like(deep))
    assert len(deeper) == 2  # the shallow calls never ran the middle block
    assert torch.equal(out, expected)
    assert deep.shape == (2, unet.deep_channels, 8, 8)
    torch.testing.assert_close(shallow, expected, rtol=0, atol=1e-6)
    assert (other - expected).abs().max() > 1e-3  # the kept feature is what the shallow call uses
