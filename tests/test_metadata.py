"""generation/metadata.py: the web UIs' `parameters` PNG chunk, read back by PIL as other tools do."""

import io

from PIL import Image

from generation.metadata import SAMPLER_LABELS, parameters_text, png_bytes, refiner_infotext, step_cache_infotext
from generation.request import SAMPLER_NAMES, GenerationRequest


def request(**changes) -> GenerationRequest:
    values = dict(prompt="a (red:1.2) fox", model="sd15", sampler="euler_a", steps=20, guidance=7.5, seed=42,
                  width=512, height=768)
    return GenerationRequest(**values | changes)


def test_every_sampler_has_a_web_ui_label() -> None:
    assert sorted(SAMPLER_LABELS) == sorted(SAMPLER_NAMES)


def test_parameters_in_the_web_ui_format() -> None:
    text = parameters_text(request(negative_prompt="blurry, lowres"), seed=43, model_hash="0123456789")
    assert text == (
        "a (red:1.2) fox\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 43, Size: 512x768, Model hash: 0123456789, Model: sd15"
    )


def test_no_negative_line_without_a_negative_prompt_and_strength_when_img2img() -> None:
    text = parameters_text(request(guidance=7.0), seed=1, model_hash="abc")
    assert text.splitlines()[1].startswith("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1,")
    img2img = request(kind="img2img", init_image="a" * 64, strength=0.55)
    assert parameters_text(img2img, seed=1, model_hash="abc").endswith(", Model: sd15, Denoising strength: 0.55")


def test_upscales_say_their_factor_as_the_web_uis_hires_fix_does() -> None:
    hires = request(kind="upscale", init_image="a" * 64, strength=0.3)
    assert parameters_text(hires, seed=1, model_hash="abc").endswith(
        "Size: 512x768, Model hash: abc, Model: sd15, Denoising strength: 0.3, Hires upscale: 2")
    x4 = request(kind="upscale", init_image="a" * 64, upscale_factor=4, model="x4")
    assert parameters_text(x4, seed=1, model_hash="abc").endswith("Model: x4, Hires upscale: 4")


def test_a_refined_image_names_its_refiner_and_switch_as_a1111_does() -> None:
    # 25 steps at refiner strength 0.15: the refiner runs int(0.15 * 26) - 1 = 2, the base 23 of 25
    extra = refiner_infotext("sd_xl_refiner_1.0", "7440042bbd", 25, 0.15)
    assert parameters_text(request(), seed=1, model_hash="abc", extra=extra).endswith(
        "Model: sd15, Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.92")
    assert refiner_infotext("r", "h", 40, 0.15)[1] == ("Refiner switch at", "0.875")  # 5 of 40 refined
    assert refiner_infotext("r", "h", 3, 0.0)[1] == ("Refiner switch at", "1")  # refiner only decodes


def test_png_carries_the_chunk_ascii_and_unicode() -> None:
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    for text in ("plain prompt\nSteps: 1", "un chat très mignon, 猫\nSteps: 1"):
        decoded = Image.open(io.BytesIO(png_bytes(image, text)))
        assert decoded.text["parameters"] == text
        assert decoded.getpixel((3, 3)) == (10, 20, 30)


def test_cached_steps_are_named_only_when_on() -> None:
    assert step_cache_infotext(1) == []  # the exact path says nothing
    assert parameters_text(request(), seed=1, model_hash="abc", extra=step_cache_infotext(3)).endswith(
        "Model: sd15, Step cache: 3")
