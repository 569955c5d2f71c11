"""generation/engine_bench.py's pieces that decide what is compared: diffusers' UNet is built with
the same architecture as ours (every parameter shape, for each family the command offers), fed
SDXL's added conditioning as its "text_time" embedding expects, and random weights are made in
the run's dtype. The command itself is a benchmark (docs/PERFORMANCE.md), not a test."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from generation.compiled import Bucketing, CompiledCall, Compiling, State
from generation.engine_bench import (
    FAMILIES,
    _diffusers_call,
    _diffusers_unet,
    _random_model,
    diffusers_config,
    main,
    parts_table,
    randomise,
    step_cache_table,
)
from generation.pipeline import load_model
from generation.settings import ModelSettings
from generation.step_cache import UNetCalls
from models.unet import UNetModel
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_checkpoints, tiny_sdxl_family  # noqa: F401


def _shapes(module: torch.nn.Module) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in module.parameters())


@pytest.mark.parametrize("name", [*FAMILIES, "tiny-sdxl", "tiny-sdxl-refiner"])
def test_diffusers_unet_has_our_unets_architecture(name: str) -> None:
    family = tiny_sdxl_family(name.removeprefix("tiny-")) if name.startswith("tiny-") else FAMILIES[name]
    with torch.device("meta"):
        ours, theirs = UNetModel(family.unet), UNet2DConditionModel(**diffusers_config(family))
    assert _shapes(ours) == _shapes(theirs)
    assert ("addition_embed_type" in diffusers_config(family)) == (family.unet.adm_in_channels is not None)


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_diffusers_sdxl_unet_takes_the_pooled_text_and_size_ids_from_our_adm_vector(name: str) -> None:
    family = tiny_sdxl_family(name)
    unet = _diffusers_unet(family, torch.device("cpu"), torch.float32)
    call = _diffusers_call(unet, family)
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 500.0)
    context, y = torch.randn(2, 77, family.unet.context_dim), torch.randn(2, family.unet.adm_in_channels)
    with torch.inference_mode():
        out = call(x, t, context, y)
        # the pooled text reaches the added embedding: another pooled part, another output
        other = y.clone()
        other[:, : family.conditioner.texts[-1].projection_dim] += 1
        changed = call(x, t, context, other)
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.allclose(out, changed)


def test_random_weights_are_made_in_the_dtype_asked_with_unit_norms_and_zero_biases() -> None:
    with torch.device("meta"):
        module = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.LayerNorm(256))
    randomise(module, torch.device("cpu"), torch.bfloat16)
    linear, norm = module
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in module.parameters()} == {"cpu"}
    assert torch.equal(norm.weight, torch.ones(256, dtype=torch.bfloat16)) and not norm.bias.any()
    assert not linear.bias.any() and linear.weight.float().std().item() == pytest.approx(0.02, rel=0.1)


def test_the_parts_table_times_the_vae_decode_and_the_text_encode_eager_and_compiled(
        tiny_checkpoints: TinyCheckpoints, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """`--compile`'s second table, with an identity compiler on the tiny model: one VAE row per
    size and batch, one text row per batch, each with finite eager and compiled figures."""
    path, yaml_path = tiny_checkpoints.get("sd1")
    model = load_model(ModelSettings(name="tiny", checkpoint=path, config=yaml_path), torch.device("cpu"),
                       torch.float32)
    parts_table(model, Compiling("on", compiler=lambda mode: lambda fn: fn), [16, 32], [1, 3], iters=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "other parts, compiled (vae default, text default):"
    rows = [line.split() for line in lines[3:]]
    assert [row[:3] for row in rows] == [["vae", "16", "1"], ["vae", "16", "3"], ["vae", "32", "1"],
                                          ["vae", "32", "3"], ["text", "1", "|"], ["text", "3", "|"]]
    assert all(math.isfinite(float(value)) for row in rows for value in row[-4:])


def test_unknown_compile_parts_are_refused_with_what_is_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main as cli

    with pytest.raises(SystemExit) as refused:
        cli(["bench", "engine", "--compile", "--compile-parts", "unet,clip"])
    assert refused.value.code == 2
    assert "--compile-parts: unknown clip; allowed: unet, vae, text" in capsys.readouterr().err


def test_fuse_projections_switches_the_same_random_weights() -> None:
    """`--fuse-projections on|off` A/Bs the same weights: the fused model's UNet computes the
    unfused one's."""
    family = tiny_sdxl_family("sdxl")
    plain, fused = (_random_model(family, torch.device("cpu"), torch.float32, fuse_projections=fuse)
                    for fuse in (False, True))
    assert fused.network.unet.fused_rows() and not plain.network.unet.fused_rows()
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 500.0)
    context, y = torch.randn(2, 77, family.unet.context_dim), torch.randn(2, family.unet.adm_in_channels)
    with torch.inference_mode():
        expected = plain.network.unet(x, t, context, y)
        torch.testing.assert_close(fused.network.unet(x, t, context, y), expected, rtol=0,
                                   atol=1e-5 * expected.abs().max().item())


def test_context_kv_prints_the_projections_share_without_running_the_unet(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--family", "sd1", "--sizes", "512", "--batches", "1", "--context-kv"]) == 0
    out = capsys.readouterr().out
    # SD 1.x: 16 transformer blocks, each attn2 projecting the context to K and V
    assert "512px, 2 rows: 5.9 of 1607 GFLOP (0.37%); 32 GEMMs of" in out


def test_step_cache_prints_exact_against_cached_speed_and_psnr(capsys: pytest.CaptureFixture[str]) -> None:
    """`--step-cache N` on the tiny layout: one row per size and batch with finite figures, the
    shallow call cheaper than the full one, the cached images close to but not the exact ones."""
    assert main(["--family", "tiny", "--sizes", "64", "--batches", "1,2", "--steps", "4", "--iters", "2",
                 "--no-diffusers", "--step-cache", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("cached steps, interval 2 (eager; 4 steps of dpmpp_2m_karras; PSNR of the decoded images "
                        "against the exact path, same seeds):")
    rows = [line.replace("|", "").split() for line in lines[start + 2:]]
    assert [row[:2] for row in rows] == [["64", "1"], ["64", "2"]]
    for row in rows:
        exact_ms, full_ms, shallow_ms, cycle_ms, _, _, _, _, psnr, worst = map(float, row[2:])
        assert shallow_ms < full_ms and cycle_ms == pytest.approx((full_ms + shallow_ms) / 2, abs=0.011)
        assert math.isfinite(psnr) and psnr >= worst > 20


def test_step_cache_through_a_compiled_unet_builds_and_runs_its_graphs(capsys: pytest.CaptureFixture[str]) -> None:
    model = _random_model(FAMILIES["tiny"], torch.device("cpu"), torch.float32)
    compiled = CompiledCall(UNetCalls(model.network.unet), lambda fn: fn, model=model.name, device=torch.device("cpu"),
                            mode="default", bucketing=Bucketing("exact"))
    args = argparse.Namespace(steps=3, sampler="euler", iters=1, compile_batches="exact")
    step_cache_table(model, compiled, 3, [64], [1], args)
    assert "cached steps, interval 3 (compiled;" in capsys.readouterr().out
    assert [g.key for g in compiled.status().graphs] == [
        "2 rows x 4 x 32x32 latent, 77 tokens", "2 rows x 4 x 32x32 latent, 77 tokens, keeping the deep feature",
        "2 rows x 4 x 32x32 latent, 77 tokens, shallow (cached steps)"]
    assert compiled.status().count(State.READY) == 3


def test_the_compiled_table_runs_end_to_end(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`--compile` through `main` with a stand-in compiler (the runbook's first bench; a renamed
    helper once crashed it with no test noticing): every row has the eager and compiled figures."""
    from generation import engine_bench

    monkeypatch.setattr(engine_bench, "torch_compiler", lambda mode: lambda fn: fn)
    assert main(["--family", "tiny", "--sizes", "64", "--batches", "1,2", "--steps", "2", "--iters", "1",
                 "--compile", "--compile-parts", "unet", "--no-diffusers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split("|")[1].split()
    rows = [line.split("|") for line in lines[2:]]
    assert [row[0].split() for row in rows] == [["64", "1"], ["64", "2"]]
    values = [[float(v) for v in row[1].split()] for row in rows]
    assert header.count("compiled") == 1 and all(len(v) == 9 for v in values)
    assert all(math.isfinite(x) and x > 0 for v in values for x in v[:-1])  # peak GiB: CUDA only
