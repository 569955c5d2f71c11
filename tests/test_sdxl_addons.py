"""LoRAs and embeddings on SDXL: kohya's SDXL names (sgm UNet paths, `lora_te1_` / `lora_te2_`)
read as diffusers' own converters read them, images with an SDXL LoRA against a checkpoint merged
by the rule, clip_l / clip_g embeddings that encode exactly as the words their vectors come from
in both towers (the pooled embedding too), and every cross-family use refused naming both."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)

from generation import sdxl
from generation.addons import AddonError, AddonLibrary
from generation.pipeline import LoadedModel, apply_loras, load_model, sample_latents
from generation.prompts import chunk_prompt, encode_prompts, encoder_inputs
from generation.request import GenerationRequest
from generation.settings import ModelSettings
from models import families
from models.lora import LoraError, lora_for, lora_targets, split_key
from models.stable_diffusion import StableDiffusion
from models.text_encoders import OpenCLIPTextEncoder
from storage.db import Database
from tests.fixtures.addons import (
    LoraModule,
    lora_file_tensors,
    lora_modules,
    merge_by_rule,
    random_lora,
    write_embedding,
    write_lora,
    write_sdxl_embedding,
)
from tests.fixtures.checkpoints import (  # noqa: F401
    TinyCheckpoints,
    TinySDXL,
    tiny_checkpoints,
    tiny_family,
    tiny_sdxl,
    tiny_sdxl_family,
)
from tests.fixtures.storage import clock, db  # noqa: F401

SDXL_FAMILIES = {"tiny-sdxl": lambda: tiny_sdxl_family("sdxl"), "sdxl": lambda: families.SDXL}


@pytest.mark.parametrize("name", list(SDXL_FAMILIES))
def test_kohya_sdxl_names_read_as_diffusers_converts_them(name: str) -> None:
    """A kohya SDXL file naming every module sd-scripts trains (the UNet's by their sgm paths,
    `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`; both towers): diffusers'
    sgm-block and kohya converters send each to the diffusers module it was made from, and our
    reader sends each to the weight that diffusers module is (full sizes on meta)."""
    family = SDXL_FAMILIES[name]()
    with torch.device("meta"):
        network = StableDiffusion(family)
    modules = lora_modules(family)
    assert {m.partition(".")[0] for m in modules} == {"unet", "text_encoder", "text_encoder_2"}
    order = list(modules)
    # one rank per module, its down tensor tagged with the module's index
    tagged = {m: LoraModule(torch.full((1, *shape[1:]), float(i)), torch.zeros(shape[0], 1, *(1,) * (len(shape) - 2)),
                            1.0) for i, (m, shape) in enumerate(modules.items())}
    kohya = lora_file_tensors(tagged, "kohya", family)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert any(k.startswith("lora_unet_output_blocks_") for k in kohya)
    assert any(k.startswith("lora_unet_middle_block_1_") for k in kohya)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in kohya)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_") for k in kohya)

    sgm = _maybe_map_sgm_blocks_to_diffusers(dict(kohya), SimpleNamespace(layers_per_block=family.unet.num_res_blocks))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(sgm)
    downs = {split_key(k)[0]: v for k, v in converted.items() if split_key(k) and split_key(k)[1] == "down"}
    assert {m: order[int(v.flatten()[0])] for m, v in downs.items()} == {m: m for m in modules}

    targets = lora_targets(network)
    lora = lora_for(network, "kohya-xl", kohya)
    assert len(lora.patches) == len(modules)
    for patch in lora.patches:
        assert patch.target == targets[order[int(patch.down.flatten()[0])]]


def _model(tiny_sdxl: TinySDXL, library: AddonLibrary | None, path: Path | None = None,
           name: str = "sdxl", fuse_projections: bool = True) -> LoadedModel:
    default, yaml = tiny_sdxl.get(name)
    settings = ModelSettings(name=name, checkpoint=path or default, config=yaml)
    return load_model(settings, torch.device("cpu"), torch.float32, addons=library, fuse_projections=fuse_projections)


def _request(prompt: str, **changes) -> GenerationRequest:
    values = dict(prompt=prompt, negative_prompt="blurry", model="sdxl", sampler="euler", steps=3, guidance=5.0,
                  seed=7, width=64, height=64, count=1)
    return GenerationRequest(**(values | changes))


def _sample(model: LoadedModel, prompt: str, **changes) -> torch.Tensor:
    request = _request(prompt, **changes)
    apply_loras(model, [request])
    return sample_latents(model, [request])


@pytest.mark.parametrize(("name", "layout"), [("sdxl", "kohya"), ("sdxl", "peft"), ("sdxl-distilled", "kohya")])
def test_image_with_sdxl_loras_equals_checkpoint_merged_by_the_rule(tiny_sdxl: TinySDXL, tmp_path: Path,
                                                                     name: str, layout: str) -> None:
    """Two SDXL LoRAs (UNet, CLIP ViT-L and bigG; the second without alpha) at weights 0.8 and
    -0.5 give the latents of the checkpoint whose weights were merged by the rule (merged into the
    fused projections, against the original separate ones); the distilled layout (per-block
    depths, a single-ResBlock middle, as SSD-1B) too."""
    family = tiny_sdxl_family(name)
    a = random_lora(lora_modules(family), seed=1)
    b = random_lora(lora_modules(family, blocks=False), rank=2, alpha=None, seed=2)
    write_lora(tmp_path / "loras" / "xl-detail.safetensors", a, layout, family=family)  # type: ignore[arg-type]
    write_lora(tmp_path / "loras" / "style.safetensors", b, layout, family=family)  # type: ignore[arg-type]
    model = _model(tiny_sdxl, AddonLibrary(tmp_path / "loras", None), name=name)

    path, _ = tiny_sdxl.get(name)
    state = safetensors.torch.load_file(path)
    merged = merge_by_rule({k: v for k, v in state.items() if k in model.network.state_dict()}, family,
                           [(a, 0.8), (b, -0.5)])
    merged_path = tmp_path / "merged.safetensors"
    safetensors.torch.save_file(state | merged, merged_path)
    reference = _model(tiny_sdxl, None, merged_path, name, fuse_projections=False)

    with_lora = _sample(model, "a fox <lora:xl-detail:0.8>, snow<lora:style:-0.5>")
    expected = sample_latents(reference, [_request("a fox , snow")])
    torch.testing.assert_close(with_lora, expected, rtol=0, atol=1e-5)
    plain = sample_latents(_model(tiny_sdxl, None, name=name), [_request("a fox , snow")])
    assert not torch.equal(with_lora, plain)
    assert torch.equal(_sample(model, "a fox <lora:xl-detail:0>, snow"), plain)  # weight 0: exactly none


def _token_vectors(model: LoadedModel, words: str) -> list[torch.Tensor]:
    """Each tower's token embeddings of `words` (N, width): an embedding made of real tokens."""
    return [tower.embed_tokens(torch.tensor(tower.tokenize(words))).detach() for tower in model.network.text_encoders]


@pytest.mark.parametrize(("with_embedding", "with_words"), [
    ("a photo of myemb in the snow", "a photo of red fox cub in the snow"),
    ("(MyEmb:1.3), snow, [blurry]", "(red fox cub:1.3), snow, [blurry]"),
])
@torch.no_grad()
def test_an_sdxl_embedding_encodes_as_its_tokens_in_both_towers(tiny_sdxl: TinySDXL, tmp_path: Path,
                                                               with_embedding: str, with_words: str) -> None:
    """clip_l rows go to CLIP ViT-L, clip_g rows to bigG: contexts and the pooled embedding (in the
    ADM vectors) equal those of the words the rows were taken from, in the negative prompt too."""
    model = _model(tiny_sdxl, None)
    clip_l, clip_g = _token_vectors(model, "red fox cub")
    assert clip_l.shape[1] != clip_g.shape[1]  # each tower its own width
    write_sdxl_embedding(tmp_path / "emb" / "myemb.safetensors", clip_l, clip_g)
    library = AddonLibrary(None, tmp_path / "emb")
    assert library.embeddings()["myemb"].family == "SDXL" and library.embeddings()["myemb"].vectors == 3

    def encode(prompt: str, negative: str, addons: AddonLibrary | None) -> tuple[torch.Tensor, ...]:
        request = _request(prompt, negative_prompt=negative)
        return sdxl.encode_conditioning(model.network, [request], model.device, (64, 64), addons)

    got = encode(with_embedding, "myemb, ugly", library)
    expected = encode(with_words, "red fox cub, ugly", None)
    for ours, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    swapped = encode(with_embedding, "myemb, ugly", AddonLibrary(None, write_sdxl_embedding(
        tmp_path / "other" / "myemb.safetensors", clip_l.flip(0), clip_g).parent))
    assert not torch.equal(swapped[0], got[0]) and torch.equal(swapped[2], got[2])  # clip_l: context only


@torch.no_grad()
def test_the_bigg_tower_runs_once_for_context_and_pooled_as_its_two_runs_did(tiny_sdxl: TinySDXL,
                                                                           tmp_path: Path) -> None:
    """One run of bigG per batch gives its context (penultimate layer) and the pooled embedding
    (last layer, first chunk): equal to the two runs it replaces (the context, then a second run
    of the tower to its end over each text's first chunk), with clip_g vectors and a prompt of
    two chunks; every resblock runs once."""
    model = _model(tiny_sdxl, None)
    network = model.network
    write_sdxl_embedding(tmp_path / "emb" / "myemb.safetensors", *_token_vectors(model, "red fox cub"))
    library = AddonLibrary(None, tmp_path / "emb")
    prompt, negative = "myemb, " + "a red fox in the deep snow, " * 12 + "(myemb:1.2)", "myemb, ugly"
    bigg = network.conditioner.pooled_tower
    assert len(chunk_prompt(bigg, prompt, {"myemb": 3})) == 2

    texts = [prompt, negative]
    vectors = library.vectors_for(network, texts)
    context = torch.cat([encode_prompts(t, texts, "cpu", v) for t, v in zip(network.text_encoders, vectors)], -1)
    first = [chunk_prompt(bigg, text, {"myemb": 3})[0] for text in texts]
    ids, token_embeds = encoder_inputs(bigg, first, vectors[-1])
    to_the_end = OpenCLIPTextEncoder(dataclasses.replace(bigg.config, layer="last", final_norm=True))
    to_the_end.load_state_dict(bigg.state_dict())
    last = to_the_end(ids, token_embeds)  # (2, 77, D): ln_final of the last layer
    pooled = last[torch.arange(2), ids.argmax(dim=-1)] @ bigg.model.text_projection  # at EOS
    assert token_embeds is not None and pooled.abs().max() > 1e-2

    calls = [0] * len(bigg.model.transformer.resblocks)
    hooks = [block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, block in enumerate(bigg.model.transformer.resblocks)]
    try:
        cond, uncond, y_cond, y_uncond = sdxl.encode_conditioning(
            network, [_request(prompt, negative_prompt=negative)], model.device, (64, 64), library)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [1] * len(calls)
    p = pooled.shape[1]
    for ours, reference in [(cond, context[:1]), (uncond, context[1:]), (y_cond[:, :p], pooled[:1]),
                            (y_uncond[:, :p], pooled[1:])]:
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_cross_family_add_ons_are_refused_naming_both(tiny_sdxl: TinySDXL, tiny_checkpoints: TinyCheckpoints,
                                                      tmp_path: Path) -> None:
    xl, sd1 = tiny_sdxl_family("sdxl"), tiny_family("sd1")
    write_lora(tmp_path / "loras" / "xl.safetensors", random_lora(lora_modules(xl)), family=xl)
    write_lora(tmp_path / "loras" / "xl-unet.safetensors", random_lora(lora_modules(xl, text=False)), "peft")
    write_lora(tmp_path / "loras" / "sd1.safetensors", random_lora(lora_modules(sd1)))
    write_lora(tmp_path / "loras" / "sd15-real.safetensors", random_lora(
        {"unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768)}))
    write_sdxl_embedding(tmp_path / "emb" / "xlemb.safetensors", torch.zeros(2, 32), torch.zeros(2, 64))
    write_sdxl_embedding(tmp_path / "emb" / "bigxl.safetensors", torch.zeros(2, 768), torch.zeros(2, 1280))
    write_embedding(tmp_path / "emb" / "easynegative.pt", torch.zeros(2, 768))
    write_embedding(tmp_path / "emb" / "tinysd1.safetensors", torch.zeros(2, 32))
    library = AddonLibrary(tmp_path / "loras", tmp_path / "emb")
    assert {n: i.family for n, i in library.loras().items()} == {
        "xl": "SDXL", "xl-unet": "a model with 96-wide conditioning", "sd1": "a model with 32-wide conditioning",
        "sd15-real": "SD 1.x"}
    assert library.embeddings()["xlemb"].family == "SDXL" and library.embeddings()["easynegative"].family == "SD 1.x"

    on_xl, on_sd1 = _model(tiny_sdxl, library), _sd1(tiny_checkpoints, library)
    assert _sample(on_xl, "a <lora:xl-unet:0.5> fox xlemb").isfinite().all()
    for prompt, message in [
        ("a <lora:sd1>", "LoRA sd1 is for a model with 32-wide conditioning; the model is SDXL"),
        ("a <lora:sd15-real>", "LoRA sd15-real is for SD 1.x; the model is SDXL"),
        ("a easynegative", "embedding easynegative is for SD 1.x; the model is SDXL"),
        ("bigxl", "embedding bigxl has 768-wide clip_l vectors; the model is SDXL, whose clip_l tower is 32-wide"),
    ]:
        with pytest.raises(AddonError, match=message):
            _sample(on_xl, prompt)
    for prompt, message in [
        ("a <lora:xl>", "LoRA xl is for SDXL; the model is a model with 32-wide conditioning"),
        ("a xlemb", r"embedding xlemb is for SDXL \(clip_l/clip_g vectors\); the model is a model with 32-wide"),
    ]:
        with pytest.raises(AddonError, match=message):
            _sample(on_sd1, prompt)
    with pytest.raises(AddonError, match="LoRA xl-unet is for a model with 96-wide conditioning; the model is a"):
        _sample(on_sd1, "a <lora:xl-unet>")
    refiner = _model(tiny_sdxl, library, name="sdxl-refiner")
    with pytest.raises(LoraError, match="LoRA xl is for SDXL; the model is SDXL refiner"):
        lora_for(refiner.network, "xl", lora_file_tensors(random_lora(lora_modules(xl)), "kohya", xl))


def _sd1(checkpoints: TinyCheckpoints, library: AddonLibrary) -> LoadedModel:
    path, yaml = checkpoints.get("sd1")
    return load_model(ModelSettings(name="sd1", checkpoint=path, config=yaml), torch.device("cpu"), torch.float32,
                      addons=library)


def test_the_refiner_takes_clip_g_rows_and_ignores_lora_tags(tiny_sdxl: TinySDXL, tmp_path: Path) -> None:
    """The refiner's one tower (bigG) takes an SDXL embedding's clip_g rows; a prompt's LoRA tags
    are removed before its text is encoded (the LoRA is merged into the base only)."""
    refiner = _model(tiny_sdxl, None, name="sdxl-refiner")
    (clip_g,) = _token_vectors(refiner, "red fox cub")
    write_sdxl_embedding(tmp_path / "emb" / "myemb.safetensors", torch.zeros(3, 32), clip_g)
    library = AddonLibrary(None, tmp_path / "emb")

    def encode(prompt: str, addons: AddonLibrary | None) -> tuple[torch.Tensor, ...]:
        return sdxl.encode_conditioning(refiner.network, [_request(prompt)], refiner.device, (64, 64), addons)

    got, expected = encode("a myemb <lora:x:0.7> in snow", library), encode("a red fox cub  in snow", None)
    for ours, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_generate_sdxl_with_both_folders(tiny_sdxl: TinySDXL, tmp_path: Path) -> None:
    """`atelier generate --checkpoint SDXL --lora-dir --embedding-dir`: the PNG names what was used,
    `<lora:x:0>` draws exactly what no LoRA draws, the LoRA and the embedding change the image."""
    import numpy as np
    from PIL import Image

    from bot.cli import main

    checkpoint, yaml = tiny_sdxl.get("sdxl")
    family = tiny_sdxl_family("sdxl")
    write_lora(tmp_path / "loras" / "xl_detail.safetensors", random_lora(lora_modules(family), seed=3),
               family=family)
    write_sdxl_embedding(tmp_path / "emb" / "xlneg.safetensors", torch.randn(2, 32), torch.randn(2, 64))
    common = ["generate", "--checkpoint", str(checkpoint), "--model-config", str(yaml), "--sampler", "euler",
              "--steps", "2", "--seed", "5", "--width", "64", "--height", "64", "--device", "cpu",
              "--config", "/dev/null", "--lora-dir", str(tmp_path / "loras"), "--embedding-dir", str(tmp_path / "emb")]

    def draw(prompt: str, negative: str, name: str) -> Image.Image:
        assert main([*common, "--prompt", prompt, "--negative-prompt", negative, "--out", str(tmp_path / name)]) == 0
        return Image.open(tmp_path / name)

    used = draw("a fox <lora:xl_detail:0.7>, snow", "(xlneg:1.2), blurry", "used.png")
    settings = used.info["parameters"].split("\n")[-1]
    assert 'Lora hashes: "xl_detail: ' in settings and 'TI hashes: "xlneg: ' in settings
    pixels = {name: np.asarray(draw(prompt, negative, f"{name}.png")) for name, prompt, negative in [
        ("zero", "a fox <lora:xl_detail:0>, snow", "blurry"),
        ("plain", "a fox , snow", "blurry"),
        ("embedding", "a fox , snow", "(xlneg:1.2), blurry"),
    ]}
    assert np.array_equal(pixels["zero"], pixels["plain"])
    assert not np.array_equal(pixels["embedding"], pixels["plain"])
    assert not np.array_equal(np.asarray(used), pixels["embedding"])


async def test_the_bot_accepts_sdxl_add_ons_on_sdxl_models_only(tiny_sdxl: TinySDXL, tmp_path: Path,
                                                               db: Database) -> None:  # noqa: F811
    """The submit-time check compares the files' family with the model's label, which names SDXL
    checkpoints by family at every size (`family_label(context_dim, CheckpointInfo.family)`)."""
    from bot.addons import Addons
    from bot.config import DiscordSettings
    from bot.policy import Requester
    from models.loading import inspect_checkpoint
    from models.lora import family_label

    xl = tiny_sdxl_family("sdxl")
    write_lora(tmp_path / "loras" / "xl.safetensors", random_lora(lora_modules(xl)), family=xl)
    write_sdxl_embedding(tmp_path / "emb" / "xlemb.safetensors", torch.zeros(2, 32), torch.zeros(2, 64))
    info = inspect_checkpoint(tiny_sdxl.get("sdxl")[0])
    model = family_label(info.context_dim, info.family)
    assert model == "SDXL" == family_label(2048) and family_label(1280, "sdxl-refiner") == "SDXL refiner"
    addons = Addons(AddonLibrary(tmp_path / "loras", tmp_path / "emb"), db, DiscordSettings())
    request = GenerationRequest(prompt="a <lora:xl:0.6> fox", negative_prompt="xlemb", model="xl", steps=4,
                                guidance=5.0, seed=1, width=64, height=64)
    here = Requester(user_id=1, guild_id=10, channel_id=5)
    assert await addons.problems(request, here, model) == []
    assert await addons.problems(request, here, "SD 1.x") == [
        "LoRA xl is for SDXL; the model xl is SD 1.x", "embedding xlemb is for SDXL; the model xl is SD 1.x"]
