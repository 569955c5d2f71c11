"""models/lora.py and the LoRA path of the pipeline: the mapping checked key by key against
diffusers' converters, images with a LoRA against a checkpoint merged by the rule, exact restore,
and every kind of unusable file refused with its message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

from generation.addons import AddonError, AddonLibrary
from generation.pipeline import LoadedModel, load_model, sample_latents
from generation.request import GenerationRequest
from generation.settings import ModelSettings
from models import families
from models.lora import LoraError, LoraMerge, lora_for, lora_targets, split_key, unet_module_names
from models.stable_diffusion import StableDiffusion
from tests.fixtures.addons import (
    diffusers_to_original,
    diffusers_unet,
    lora_file_tensors,
    lora_modules,
    merge_by_rule,
    random_lora,
    write_lora,
)
from tests.fixtures.checkpoints import (  # noqa: F401
    TinyCheckpoints,
    random_state_dict,
    tiny_checkpoints,
    tiny_family,
    tiny_sdxl_family,
)

FAMILIES = {
    "tiny-sd1": lambda: tiny_family("sd1"),
    "tiny-sd2": lambda: tiny_family("sd2"),
    "sd1": lambda: families.SD1,
    "sd2": lambda: families.SD2,
    "tiny-sdxl": lambda: tiny_sdxl_family("sdxl"),
    "tiny-sdxl-distilled": lambda: tiny_sdxl_family("sdxl-distilled"),
    "sdxl": lambda: families.SDXL,
}


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_unet_mapping_is_diffusers_conversion_both_ways(name: str, fused: bool) -> None:
    """Every original UNet key has exactly the diffusers name diffusers' converter gives it, and
    every parameter of diffusers' UNet for the same config is reached (full sizes on meta), with
    the attention projections fused or not."""
    family = FAMILIES[name]()
    with torch.device("meta"):
        network = StableDiffusion(family)
        if fused:
            network.unet.fuse_projections()
    original_keys = {k for k in network.state_dict() if k.startswith("model.diffusion_model.")}
    ours = {}
    for d_name, o_name in unet_module_names(network.unet).items():
        for part in ("weight", "bias"):
            key = f"model.diffusion_model.{o_name}.{part}"
            if key in original_keys:
                ours[f"{d_name}.{part}"] = key
    assert ours == diffusers_to_original(family)
    assert set(ours.values()) == original_keys  # onto: every original key
    assert set(ours) == set(diffusers_unet(family).state_dict())  # every diffusers parameter


@pytest.mark.parametrize("name", ["tiny-sd1", "sd1", "sd2"])
def test_kohya_names_read_as_diffusers_converts_them(name: str) -> None:
    """diffusers' kohya converter and our reader send every kohya module to the same module."""
    family = FAMILIES[name]()
    with torch.device("meta"):
        network = StableDiffusion(family)
    targets = lora_targets(network)
    modules = lora_modules(family)
    kohya = lora_file_tensors(random_lora({m: (2, 2) for m in modules}), "kohya")  # the names matter here
    converted, _ = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    read = {split_key(k)[0] for k in converted if split_key(k)[1] == "down"}
    assert read == set(modules)
    assert all(m in targets for m in read)


@pytest.mark.parametrize("family", ["sd1", "x4-upscaler"])
def test_fused_projection_targets_are_the_original_weights_rows(family: str) -> None:
    """Each UNet LoRA target of a fused model is the rows of its fused weight that hold the
    original module's weight (q, k, v thirds of `to_qkv`, k, v halves of `to_kv`), and the names
    accepted are the unfused model's."""
    network = StableDiffusion(tiny_family(family))
    network.load_state_dict(random_state_dict(tiny_family(family)))
    original = {k: v.clone() for k, v in network.state_dict().items()}
    separate = lora_targets(network)
    network.unet.fuse_projections()
    targets = lora_targets(network)
    assert set(targets) == set(separate)
    params = dict(network.named_parameters())
    rows = 0
    for name, target in targets.items():
        if name.startswith("unet.") and target != separate[name]:
            assert ".to_qkv." in target.parameter or ".to_kv." in target.parameter
            assert torch.equal(params[target.parameter][target.rows], original[separate[name].parameter])
            rows += 1
    assert rows > 0


def tiny_model(checkpoints: TinyCheckpoints, family: str, library: AddonLibrary | None, path: Path | None = None,
               yaml: Path | None = None, fuse_projections: bool = True) -> LoadedModel:
    default_path, default_yaml = checkpoints.get(family)
    settings = ModelSettings(name=family, checkpoint=path or default_path, config=yaml or default_yaml)
    return load_model(settings, torch.device("cpu"), torch.float32, addons=library, fuse_projections=fuse_projections)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a_lora_merged_into_fused_projections_is_the_lora_merged_into_separate_ones(
    tiny_checkpoints: TinyCheckpoints, tmp_path: Path, family: str
) -> None:
    """A kohya file on every UNet layer (q/k/v of both attentions among them) and the text
    encoder: merged into the fused model, the weights (saved under the original keys) equal
    those merged into the separate projections bit for bit, the images agree, and restoring
    gives back the loaded weights bit for bit."""
    from generation.pipeline import apply_loras

    write_lora(tmp_path / "loras" / "x.safetensors", random_lora(lora_modules(tiny_family(family)), seed=3))
    library = AddonLibrary(tmp_path / "loras", None)
    separate, fused = (tiny_model(tiny_checkpoints, family, library, fuse_projections=f) for f in (False, True))
    assert fused.network.unet.fused_rows() and not separate.network.unet.fused_rows()
    loaded = {k: v.clone() for k, v in fused.network.state_dict().items()}
    latents = [sample_latents_with(model, "a fox <lora:x:0.8>") for model in (separate, fused)]
    merged = [model.network.state_dict() for model in (separate, fused)]
    assert all(torch.equal(merged[1][k], merged[0][k]) for k in merged[0])
    assert not torch.equal(merged[1]["model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_k.weight"],
                           loaded["model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_k.weight"])
    torch.testing.assert_close(latents[1], latents[0], rtol=0, atol=1e-5)
    apply_loras(fused, [request("a fox")])
    assert all(torch.equal(v, loaded[k]) for k, v in fused.network.state_dict().items())


def request(prompt: str, **changes) -> GenerationRequest:
    values = dict(prompt=prompt, negative_prompt="blurry", model="tiny", sampler="euler", steps=3, guidance=5.0,
                  seed=7, width=64, height=64, count=1)
    return GenerationRequest(**(values | changes))


@pytest.mark.parametrize(("family", "layout"), [("sd1", "kohya"), ("sd2", "peft"), ("sd1", "diffusers")])
def test_image_with_lora_equals_checkpoint_merged_by_the_rule(
    tiny_checkpoints: TinyCheckpoints, tmp_path: Path, family: str, layout: str
) -> None:
    fam = tiny_family(family)
    a = random_lora(lora_modules(fam), seed=1)
    b = random_lora(lora_modules(fam, text=False), rank=2, alpha=None, seed=2)  # alpha absent = rank
    write_lora(tmp_path / "loras" / "detail-x_1.safetensors", a, layout)  # type: ignore[arg-type]
    write_lora(tmp_path / "loras" / "style.safetensors", b, layout)  # type: ignore[arg-type]
    library = AddonLibrary(tmp_path / "loras", None)
    model = tiny_model(tiny_checkpoints, family, library)

    path, yaml = tiny_checkpoints.get(family)
    state = safetensors.torch.load_file(path)
    merged = merge_by_rule({k: v for k, v in state.items() if k in model.network.state_dict()}, fam,
                           [(a, 0.8), (b, -0.5)])
    merged_path = tmp_path / "merged.safetensors"
    safetensors.torch.save_file(state | merged, merged_path)
    reference = tiny_model(tiny_checkpoints, family, None, merged_path, yaml, fuse_projections=False)

    with_lora = sample_latents_with(model, "a fox <lora:detail-x_1:0.8>, snow<lora:style:-0.5>")
    expected = sample_latents(reference, [request("a fox , snow")])
    torch.testing.assert_close(with_lora, expected, rtol=0, atol=1e-5)
    assert not torch.equal(with_lora, sample_latents(tiny_model(tiny_checkpoints, family, None),
                                                     [request("a fox , snow")]))


def test_zero_weight_and_restore_are_bit_exact(tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    fam = tiny_family("sd1")
    write_lora(tmp_path / "loras" / "x.safetensors", random_lora(lora_modules(fam)))
    model = tiny_model(tiny_checkpoints, "sd1", AddonLibrary(tmp_path / "loras", None))
    original = {k: v.clone() for k, v in model.network.state_dict().items()}
    params_before = {k: (p.data_ptr(), id(p)) for k, p in model.network.named_parameters()}
    from generation.pipeline import apply_loras

    none = sample_latents(model, [request("a fox")])
    zero = request("a fox<lora:x:0>")
    apply_loras(model, [zero])
    assert torch.equal(sample_latents(model, [zero]), none)
    apply_loras(model, [request("a fox<lora:x:1.5>")])
    assert not torch.equal(model.network.state_dict()["model.diffusion_model.middle_block.1.proj_in.weight"],
                           original["model.diffusion_model.middle_block.1.proj_in.weight"])
    apply_loras(model, [request("a fox")])
    assert all(torch.equal(v, original[k]) for k, v in model.network.state_dict().items())
    assert params_before == {k: (p.data_ptr(), id(p)) for k, p in model.network.named_parameters()}
    assert torch.equal(sample_latents(model, [request("a fox")]), none)


def test_an_unchanged_set_is_not_merged_again(tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    fam = tiny_family("sd1")
    write_lora(tmp_path / "loras" / "x.safetensors", random_lora(lora_modules(fam)))
    model = tiny_model(tiny_checkpoints, "sd1", AddonLibrary(tmp_path / "loras", None))
    from generation.pipeline import apply_loras

    apply_loras(model, [request("<lora:x:0.5> a")])
    once = {k: v.clone() for k, v in model.network.state_dict().items()}
    apply_loras(model, [request("b <lora:x:0.5>")])
    assert all(torch.equal(v, once[k]) for k, v in model.network.state_dict().items())


def _sd1() -> StableDiffusion:
    return StableDiffusion(tiny_family("sd1"))


def _refusal(tensors: dict[str, torch.Tensor]) -> str:
    with pytest.raises(LoraError) as caught:
        lora_for(_sd1(), "bad", tensors)
    return str(caught.value)


def test_variants_and_other_families_are_refused_by_name() -> None:
    fam1, fam2 = tiny_family("sd1"), families.SD2
    ok = lora_file_tensors(random_lora(lora_modules(fam1, blocks=False)), "kohya")
    assert "LoHa" in _refusal(ok | {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)})
    assert "LoKr" in _refusal({"lora_unet_mid_block_attentions_0_proj_in.lokr_w1": torch.zeros(2, 2)})
    assert "DoRA" in _refusal(ok | {"lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale": torch.zeros(1, 2)})
    sdxl = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 768),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 2)}
    message = _refusal(sdxl)
    assert "SDXL" in message and "the model is" in message
    sd2 = lora_file_tensors(random_lora({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (1024, 1024)}),
                            "kohya")
    assert "is for SD 2.x" in _refusal(sd2)
    assert fam2.text.width == 1024
    with pytest.raises(LoraError, match="is for SD 2.x; the model is"):  # shapes alone cannot tell
        attn1 = {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64)}
        lora_for(_sd1(), "v2", lora_file_tensors(random_lora(attn1), "kohya"), {"ss_v2": "True"})
    wrong = lora_file_tensors(random_lora({"text_encoder.text_model.encoder.layers.0.mlp.fc1": (64, 48)}), "kohya")
    assert "does not fit" in _refusal(wrong)
    assert "does not have" in _refusal(lora_file_tensors(random_lora({"unet.down_blocks.9.attentions.0.proj_in": (4, 4)}), "kohya"))
    missing = {k: v for k, v in ok.items() if "lora_up" not in k}
    assert "lacks its lora_up" in _refusal(missing)
    assert "not part of a LoRA" in _refusal(ok | {"something_else": torch.zeros(1)})


def test_unreadable_files_are_refused_not_crashed(tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    folder = tmp_path / "loras"
    good = write_lora(folder / "good.safetensors", random_lora(lora_modules(tiny_family("sd1"), blocks=False)))
    (folder / "truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (folder / "empty.safetensors").write_bytes(b"")
    library = AddonLibrary(folder, None)
    listed = library.loras()
    assert listed["good"].error is None and listed["good"].family == "a model with 32-wide conditioning"  # tiny
    model = tiny_model(tiny_checkpoints, "sd1", library)
    for name in ("truncated", "garbage", "empty"):
        assert "not a readable .safetensors file" in (listed[name].error or "")
        with pytest.raises(AddonError, match=f"LoRA {name}.safetensors is not a readable"):
            sample_latents_with(model, f"a <lora:{name}>")


def sample_latents_with(model: LoadedModel, prompt: str) -> torch.Tensor:
    from generation.pipeline import apply_loras

    req = request(prompt)
    apply_loras(model, [req])
    return sample_latents(model, [req])


def test_unknown_names_and_negative_tags_are_refused(tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    write_lora(tmp_path / "loras" / "add_detail.safetensors", random_lora(lora_modules(tiny_family("sd1"), blocks=False)))
    model = tiny_model(tiny_checkpoints, "sd1", AddonLibrary(tmp_path / "loras", None))
    with pytest.raises(AddonError, match="unknown LoRA 'add_detal'; did you mean add_detail"):
        sample_latents_with(model, "a <lora:add_detal:0.5>")
    from generation.pipeline import apply_loras

    with pytest.raises(AddonError, match="not the negative prompt"):
        apply_loras(model, [request("a", negative_prompt="<lora:add_detail:1>")])
    bare = tiny_model(tiny_checkpoints, "sd1", None)
    with pytest.raises(AddonError, match="no LoRA folder"):
        apply_loras(bare, [request("a <lora:add_detail>")])


def test_a_set_of_files_is_mapped_with_one_walk_of_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's LoRA names (`LoraNames`) are built once per set, not once per file, and map
    each file as building them for it alone would."""
    from models.lora import LoraNames

    fam = tiny_family("sd1")
    for name, seed in (("a", 1), ("b", 2)):
        write_lora(tmp_path / "loras" / f"{name}.safetensors", random_lora(lora_modules(fam), seed=seed), "kohya")
    network = _sd1()
    built, build = [], LoraNames.of
    monkeypatch.setattr(LoraNames, "of", classmethod(lambda cls, n: built.append(n) or build(n)))
    loras = AddonLibrary(tmp_path / "loras", None).loras_for(network, (("a", 1.0), ("b", 0.5)))
    assert built == [network] and [lora.name for lora, _ in loras] == ["a", "b"]
    alone = lora_for(network, "b", safetensors.torch.load_file(tmp_path / "loras" / "b.safetensors"))
    assert len(alone.patches) == len(loras[1][0].patches) == len(lora_modules(fam))
    for mine, theirs in zip(alone.patches, loras[1][0].patches, strict=True):
        assert mine.target == theirs.target and torch.equal(mine.down, theirs.down) and mine.scale == theirs.scale


def test_a_failed_merge_leaves_the_model_as_loaded() -> None:
    network = _sd1()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    lora = lora_for(network, "x", lora_file_tensors(random_lora(lora_modules(tiny_family("sd1"))), "kohya"))
    merge = LoraMerge()
    merge.apply(network, [(lora, 1.0)], ("x",))
    assert merge.applied == ("x",)
    broken = lora_for(network, "y", lora_file_tensors(random_lora(lora_modules(tiny_family("sd1"))), "kohya"))
    object.__setattr__(broken.patches[-1], "down", None)  # the merge of "y" fails
    with pytest.raises(AttributeError):
        merge.apply(network, [(broken, 1.0)], ("y",))
    assert merge.applied == ()
    assert all(torch.equal(v, before[k]) for k, v in network.state_dict().items())


def test_library_lists_triggers_family_lcm_and_rescans(tmp_path: Path) -> None:
    folder = tmp_path / "loras"
    tags = {"set1": {"pixel art": 30, "sprite": 12}, "set2": {"sprite": 25}}
    write_lora(folder / "pixel.safetensors", random_lora(lora_modules(tiny_family("sd1"), blocks=False)),
               metadata={"ss_tag_frequency": json.dumps(tags)})
    library = AddonLibrary(folder, None)
    info = library.loras()["pixel"]
    assert info.triggers == ("sprite", "pixel art") and not info.lcm
    write_lora(folder / "lcm-lora-sdv1-5.safetensors", random_lora(lora_modules(tiny_family("sd1"), blocks=False)))
    assert library.loras()["lcm-lora-sdv1-5"].lcm
    assert library.lcm_hint("a <lora:lcm-lora-sdv1-5:1>") and not library.lcm_hint("a <lora:pixel>")


def test_generate_command_with_both_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`atelier generate --lora-dir --embedding-dir`: the PNG says what was used as the web UIs
    write it, `<lora:x:0>` draws exactly what no LoRA draws, an unknown name is refused."""
    import hashlib

    import numpy as np
    from PIL import Image

    from bot.cli import main
    from tests.fixtures.addons import write_embedding
    from tests.fixtures.checkpoints import write_checkpoint

    checkpoint, yaml = write_checkpoint(tmp_path, "sd1")
    lora = write_lora(tmp_path / "loras" / "add_detail.safetensors", random_lora(lora_modules(tiny_family("sd1"))))
    embedding = write_embedding(tmp_path / "embeddings" / "easynegative.pt", torch.randn(2, 32))
    common = ["generate", "--checkpoint", str(checkpoint), "--model-config", str(yaml), "--sampler", "euler",
              "--steps", "2", "--seed", "5", "--width", "64", "--height", "64", "--device", "cpu",
              "--config", "/dev/null", "--lora-dir", str(tmp_path / "loras"), "--embedding-dir",
              str(tmp_path / "embeddings"), "--negative-prompt", "(easynegative:1.2), blurry"]

    def draw(prompt: str, name: str) -> Image.Image:
        assert main([*common, "--prompt", prompt, "--out", str(tmp_path / name)]) == 0
        return Image.open(tmp_path / name)

    used = draw("a fox <lora:add_detail:0.7>, snow", "used.png")
    data = lora.read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    ti = hashlib.sha256(embedding.read_bytes()).hexdigest()[:12]
    lines = used.info["parameters"].split("\n")
    assert lines[0] == "a fox <lora:add_detail:0.7>, snow"
    assert lines[-1].endswith(f', Lora hashes: "add_detail: {addnet}", TI hashes: "easynegative: {ti}"')

    zero, plain = draw("a fox <lora:add_detail:0>, snow", "zero.png"), draw("a fox , snow", "plain.png")
    assert np.array_equal(np.asarray(zero), np.asarray(plain))
    assert not np.array_equal(np.asarray(used), np.asarray(plain))

    assert main([*common, "--prompt", "a <lora:add_detial>", "--out", str(tmp_path / "x.png")]) != 0
    assert "unknown LoRA 'add_detial'; did you mean add_detail?" in capsys.readouterr().err

    # An LCM-LoRA makes LCM's sampler, steps and guidance the defaults of what was not chosen.
    write_lora(tmp_path / "loras" / "lcm-lora-sdv1-5.safetensors", random_lora(lora_modules(tiny_family("sd1"))))
    unchosen = [a for a in common if a not in ("--sampler", "euler", "--steps", "2")]
    assert main([*unchosen, "--prompt", "a fox <lora:lcm-lora-sdv1-5>", "--out", str(tmp_path / "lcm.png")]) == 0
    settings = Image.open(tmp_path / "lcm.png").info["parameters"].split("\n")[-1]
    assert settings.startswith("Steps: 4, Sampler: LCM, CFG scale: 1.5, ")


def test_lcm_hints_fill_in_only_what_the_member_left_out() -> None:
    from generation.addons import sampling_defaults

    defaults = ("dpmpp_2m_karras", 25, 7.0)
    assert sampling_defaults(False, defaults) == defaults
    assert sampling_defaults(True, defaults) == ("lcm", 4, 1.5)
    assert sampling_defaults(True, defaults, sampler="euler", guidance=0.0) == ("euler", 4, 0.0)
    assert sampling_defaults(True, defaults, steps=6) == ("lcm", 6, 1.5)


def test_the_x4_upscaler_upscales_images_made_with_add_ons_without_them(
        tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    from tests.fixtures.addons import write_embedding

    write_lora(tmp_path / "loras" / "x.safetensors", random_lora(lora_modules(tiny_family("sd1"), blocks=False)))
    write_embedding(tmp_path / "emb" / "wide.pt", torch.zeros(2, 1024))
    model = tiny_model(tiny_checkpoints, "x4-upscaler", AddonLibrary(tmp_path / "loras", tmp_path / "emb"))
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    import hashlib
    import io

    from PIL import Image

    from generation.pipeline import run_batch

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 120, 200)).save(buffer, format="PNG")
    stored = {hashlib.sha256(buffer.getvalue()).hexdigest(): buffer.getvalue()}
    up = request("a fox <lora:x:1> wide", kind="upscale", upscale_factor=4, init_image=next(iter(stored)), steps=1)
    (images,) = run_batch(model, [up], stored.__getitem__)  # neither the LoRA nor the embedding is refused
    assert images[0].size == (128, 128)
    assert all(torch.equal(v, before[k]) for k, v in model.network.state_dict().items())


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_text_encoder_targets_are_diffusers_clip_conversion(family: str) -> None:
    """Every text-encoder LoRA module lands on the weight (or OpenCLIP in_proj rows) diffusers'
    own single-file converters turn into that HF CLIP module, and all of them are reachable, in
    every tower (SDXL: `text_encoder` = CLIP ViT-L, `text_encoder_2` = bigG)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    from tests.fixtures.addons import text_towers

    fam = tiny_sdxl_family(family) if family.startswith("sdxl") else tiny_family(family)
    state = random_state_dict(fam)
    with torch.device("meta"):
        all_targets = lora_targets(StableDiffusion(fam))
    towers = text_towers(fam)
    assert {n.partition(".")[0] for n in all_targets} == {"unet", *(tower for tower, _, _ in towers)}
    for tower, prefix, config in towers:
        if config.kind == "clip":
            hf = convert_ldm_clip_checkpoint(state, remove_prefix=f"{prefix}transformer.")
        else:
            hf = convert_open_clip_checkpoint(None, state, prefix=f"{prefix}model.")
        targets = {n.removeprefix(f"{tower}."): t for n, t in all_targets.items() if n.startswith(f"{tower}.")}
        expected = {k.removesuffix(".weight") for k, v in hf.items()
                    if ".layers." in k and k.endswith(".weight") and v.dim() == 2}
        assert set(targets) == expected
        for name, target in targets.items():
            original = state[target.parameter]
            original = original[target.rows] if target.rows else original
            assert torch.equal(hf[name + ".weight"], original), name


def test_a_batch_is_prepared_only_under_the_lora_set_merged_now(tiny_checkpoints: TinyCheckpoints,
                                                                  tmp_path: Path) -> None:
    """Preparing the next batch never merges: with another set merged, that batch encodes its text
    when it runs; with its own set merged, its run takes the prepared text."""
    from generation.pipeline import apply_loras, prepare_batch, run_batch

    fam = tiny_family("sd1")
    write_lora(tmp_path / "loras" / "x.safetensors", random_lora(lora_modules(fam)))
    model = tiny_model(tiny_checkpoints, "sd1", AddonLibrary(tmp_path / "loras", None))
    calls: list[int] = []
    model.network.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    running, plain, same = request("a fox <lora:x:0.8>"), request("a cat"), request("a cat <lora:x:0.8>")
    apply_loras(model, [running])
    merged = {k: v.clone() for k, v in model.network.state_dict().items()}
    prepare_batch(model, [plain])  # would need the set restored: left for its run
    assert calls == [] and all(torch.equal(v, merged[k]) for k, v in model.network.state_dict().items())
    run_batch(model, [plain], lambda sha: b"")
    assert len(calls) == 1
    apply_loras(model, [running])
    prepare_batch(model, [same])
    assert len(calls) == 2
    with_prepared = run_batch(model, [same], lambda sha: b"")
    assert len(calls) == 2
    apply_loras(model, [plain])
    assert [i.tobytes() for i in run_batch(model, [same], lambda sha: b"")[0]] == [i.tobytes() for i in with_prepared[0]]
