"""The pure parts of the frontend: reply flags, aspect sizes, styles, upload fitting, button ids."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from bot.commands import (
    ASPECTS,
    MAX_INPUT_BYTES,
    MAX_INPUT_PIXELS,
    MAX_PROMPT,
    Gestures,
    Options,
    _FLAGS,
    UserError,
    _decode_inputs,
    _read,
    derived_request,
    is_mask,
    parse_flags,
    size_for,
)
from bot.config import AppConfig
from bot.replies import fit_upload
from bot.styles import STYLES
from bot.views import result_view
from generation.addons import AddonLibrary
from generation.images import ImageInputError
from generation.request import MAX_SEED, SAMPLER_NAMES, GenerationRequest, Kind
from generation.settings import GenerationSettings, ModelSettings
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_checkpoints  # noqa: F401
from tests.fixtures.storage import clock, db  # noqa: F401


def test_flags_split_prompt_and_options_and_bad_flags_are_named() -> None:
    options = parse_flags("  a castle on a hill --no fog, people --strength 0.5 --seed 3 --ar 16:9 --cfg 6.5")
    assert options == Options(prompt="a castle on a hill", negative="fog, people", strength=0.5, seed=3,
                              aspect="16:9", guidance=6.5)
    assert parse_flags("just words--not-a-flag").prompt == "just words--not-a-flag"
    with pytest.raises(UserError, match="unknown flag --size; allowed: --no, --strength"):
        parse_flags("a cat --size 3")
    with pytest.raises(UserError, match="--seed needs a number, not 'three'"):
        parse_flags("a cat --seed three")


@pytest.mark.parametrize("native", [512, 768, 128])
def test_aspects_keep_about_the_native_pixels_in_multiples_of_64(native: int) -> None:
    for aspect in ASPECTS:
        width, height = size_for(aspect, native)
        a, b = (int(x) for x in aspect.split(":"))
        assert width % 64 == 0 and height % 64 == 0
        # Rounding each side to 64 moves the ratio and the area by at most half a step per side.
        assert abs(width - native * math.sqrt(a / b)) <= 32 and abs(height - native * math.sqrt(b / a)) <= 32
    assert size_for("1:1", 512) == (512, 512) and size_for("16:9", 768) == (1024, 576)
    with pytest.raises(UserError, match="allowed: 1:1, 2:3"):
        size_for("5:4", 512)


def test_sdxl_aspects_are_the_sizes_sdxl_was_trained_at() -> None:
    sizes = {aspect: size_for(aspect, 1024, "sdxl") for aspect in ASPECTS}
    assert sizes == {"1:1": (1024, 1024), "2:3": (832, 1216), "3:2": (1216, 832), "3:4": (896, 1152),
                     "4:3": (1152, 896), "9:16": (768, 1344), "16:9": (1344, 768)}
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 256**2 for w, h in (size_for(a, 256, "sdxl") for a in ASPECTS))


def test_styles_wrap_the_prompt_and_add_their_negative_after_the_users() -> None:
    assert {"photographic", "cinematic", "anime", "line-art", "low-poly"} <= set(STYLES)
    prompt, negative = STYLES["anime"].apply("a {curly} fox", "blurry")
    assert prompt.startswith("anime artwork of a {curly} fox, ")
    assert negative == "blurry, " + STYLES["anime"].negative
    assert STYLES["anime"].apply("a fox", "")[1] == STYLES["anime"].negative


def noisy_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploads_fit_the_limit_by_reencoding_then_downscaling_and_say_so() -> None:
    png = noisy_png(256)  # noise does not compress: about 197 kB
    assert fit_upload(png, len(png), "a").data == png
    reencoded = fit_upload(png, len(png) // 2, "a")
    assert len(reencoded.data) <= len(png) // 2 and reencoded.filename.endswith((".webp", ".jpg"))
    assert "to fit the upload limit" in reencoded.note
    with Image.open(io.BytesIO(reencoded.data)) as image:
        assert image.size == (256, 256)
    tiny = fit_upload(png, 6_000, "a")
    with Image.open(io.BytesIO(tiny.data)) as image:
        assert len(tiny.data) <= 6_000 and image.size[0] < 256 and f"downscaled to {image.size[0]}x" in tiny.note
    assert fit_upload(png, 100, "a") is None


def test_result_buttons_carry_versioned_job_and_index_in_rows() -> None:
    view = result_view("abcdefghijkl", 3, upscaled=False)
    ids = [item.custom_id for item in view.children]
    assert ids == [f"atelier:v1:{a}:abcdefghijkl:{i}" for a in ("upscale", "vary") for i in range(3)] + [
        "atelier:v1:rerun:abcdefghijkl:0"]
    assert [item.item.row for item in view.children] == [0, 0, 0, 1, 1, 1, 0]
    upscaled = [item.item.label for item in result_view("abcdefghijkl", 1, upscaled=True).children]
    assert upscaled == ["Vary (Subtle)", "Vary (Strong)", "Zoom Out", None]


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_masks_are_black_and_white_images() -> None:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (10, 10, 40, 40))
    assert is_mask(encoded(mask)) and is_mask(encoded(mask.convert("RGB"), "JPEG"))  # JPEG noise is fine
    assert not is_mask(encoded(Image.new("RGB", (64, 64), (200, 30, 30))))  # a colour
    assert not is_mask(encoded(Image.new("L", (64, 64), 128)))  # grey, not black or white
    assert not is_mask(b"not an image")


def test_buttons_derive_upscales_variations_and_zoom_outs_from_one_image() -> None:
    settings = GenerationSettings()
    source = GenerationRequest(prompt="a fox", model="m", steps=20, guidance=7, seed=5, width=512, height=768,
                               count=4)
    sha = "ab" * 32
    upscale, notes = derived_request("upscale", source, sha, (512, 768), settings)
    assert (upscale.kind, upscale.count, upscale.init_image, upscale.strength, upscale.upscale_factor) == (
        Kind.UPSCALE, 1, sha, settings.hires_strength, 2)
    assert (upscale.model, upscale.steps, notes) == ("m", 20, [])  # hires: the model that drew it
    for action, strength in (("vary", settings.variation_strong_strength),
                             ("subtle", settings.variation_subtle_strength),
                             ("strong", settings.variation_strong_strength)):
        varied, _ = derived_request(action, source, sha, (1024, 1536), settings)  # an upscale, over max_pixels
        # Within the default limit of 1048576 pixels, same aspect, multiples of 64.
        assert (varied.kind, varied.strength, varied.width, varied.height) == (Kind.VARIATION, strength, 832, 1216)
        assert (varied.prompt, varied.count, varied.init_image) == ("a fox", 4, sha)
    zoom, notes = derived_request("zoom", source, sha, (512, 768), settings)
    assert zoom.kind is Kind.OUTPAINT and zoom.outpaint_pixels == 128  # a quarter of the shorter side
    assert set(zoom.outpaint_directions) == {"left", "right", "up", "down"}
    assert (zoom.width, zoom.height, notes) == (512 + 256, 768 + 256, [])  # the extended canvas
    wide, notes = derived_request("zoom", source, sha, (1024, 1536), settings)  # zoom out of an upscale
    assert wide.width * wide.height <= settings.max_pixels and max(wide.width, wide.height) <= settings.max_side
    assert wide.outpaint_pixels == 208 and wide.width - 2 * 208 >= 64  # the image shrinks, the margins stay
    assert len(notes) == 1 and f"the result is {wide.width}x{wide.height}" in notes[0]


def test_upscale_buttons_use_the_configured_x4_upscaler_up_to_its_input_limit() -> None:
    settings = GenerationSettings(upscaler="x4", upscaler_sampler="ddim", upscaler_steps=30, upscaler_guidance=8.5,
                                  upscaler_noise_level=40, upscaler_max_input_pixels=512 * 768)
    source = GenerationRequest(prompt="a fox", negative_prompt="fog", model="m", sampler="euler", steps=20,
                               guidance=7, seed=5, width=512, height=768, count=4, strength=0.5)
    sha = "ab" * 32
    x4, notes = derived_request("upscale", source, sha, (512, 768), settings)
    assert (x4.kind, x4.model, x4.upscale_factor, x4.strength, x4.count, x4.init_image) == (
        Kind.UPSCALE, "x4", 4, None, 1, sha)
    assert (x4.sampler, x4.steps, x4.guidance, x4.upscale_noise_level) == ("ddim", 30, 8.5, 40)
    assert (x4.prompt, x4.negative_prompt, x4.width, x4.height, notes) == ("a fox", "fog", 512, 768, [])
    over, notes = derived_request("upscale", source, sha, (576, 768), settings)  # one column of 64 too many
    assert (over.model, over.upscale_factor, over.strength, over.steps) == ("m", 2, settings.hires_strength, 20)
    assert notes == ["the image is 576x768 = 442368 pixels, over the x4 upscaler's limit of 393216: it was "
                     "upscaled 2x instead"]
    # Vary and Zoom Out of an x4 result get the drawing model back (Gestures._drawn_by) and are no upscales.
    drawn = x4.model_copy(update=dict(model="m", sampler="euler", steps=20, guidance=7.0))
    varied, _ = derived_request("subtle", drawn, sha, (2048, 3072), settings)
    zoomed, _ = derived_request("zoom", drawn, sha, (2048, 3072), settings)
    for request in (varied, zoomed):
        assert (request.model, request.upscale_factor, request.steps) == ("m", 2, 20)
    assert (varied.kind, zoomed.kind) == (Kind.VARIATION, Kind.OUTPAINT)


@pytest.fixture
def gestures(tiny_checkpoints: TinyCheckpoints) -> Gestures:  # noqa: F811
    """Gestures over a tiny model; building requests needs only the configuration."""
    path, yaml_path = tiny_checkpoints.get("sd1")
    config = AppConfig(models=(ModelSettings(name="tiny", checkpoint=path, config=yaml_path),))
    studio = SimpleNamespace(config=config, db=None, addons=AddonLibrary(None, None))
    return Gestures(None, studio, None)  # type: ignore[arg-type]


async def test_requests_refuse_unknown_samplers_seeds_out_of_range_and_long_prompts(gestures: Gestures) -> None:
    """What /imagine's option ranges cannot catch: reply flags, and clients that skip the ranges."""
    longest = await gestures.request(Options(prompt="a" * MAX_PROMPT, sampler="euler", seed=MAX_SEED, count=1))
    assert (len(longest.prompt), longest.sampler, longest.seed) == (MAX_PROMPT, "euler", MAX_SEED)
    with pytest.raises(UserError, match=f"the prompt is {MAX_PROMPT + 1} characters long; the most allowed is "
                                        f"{MAX_PROMPT}"):
        await gestures.request(parse_flags("b" * (MAX_PROMPT + 1) + " --seed 3"))
    with pytest.raises(UserError, match="unknown sampler 'euler_b'; allowed: ddim, plms, euler, euler_a"):
        await gestures.request(parse_flags("a cat --sampler euler_b"))
    with pytest.raises(UserError, match=f"seed must be between 0 and {MAX_SEED}; you gave {MAX_SEED + 1}"):
        await gestures.request(Options(prompt="a cat", seed=MAX_SEED + 1, count=1))
    with pytest.raises(UserError, match="seed must be between 0 and"):
        await gestures.request(parse_flags("a cat --seed -1"))
    # Four images take four seeds: the first may be at most MAX_SEED - 3.
    with pytest.raises(UserError, match=f"seed must be between 0 and {MAX_SEED - 3}; you gave {MAX_SEED}"):
        await gestures.request(Options(prompt="a cat", seed=MAX_SEED, count=4))


async def test_every_problem_of_a_request_or_of_reply_flags_is_named_at_once(gestures: Gestures) -> None:
    """Issue 12: several things wrong with what a member typed are told in one answer."""
    with pytest.raises(UserError) as flags:
        parse_flags("a cat --size 3 --seed three --steps many --colour red")
    assert flags.value.problems == (
        f"unknown flag --size; allowed: {', '.join('--' + f for f in _FLAGS)}",
        f"unknown flag --colour; allowed: {', '.join('--' + f for f in _FLAGS)}",
        "--seed needs a number, not 'three'",
        "--steps needs a number, not 'many'")
    assert str(flags.value).startswith("This request cannot run here, for 4 reasons:\n- Unknown flag --size;")
    with pytest.raises(UserError) as options:
        await gestures.request(parse_flags("a cat --sampler euler_b --steps 0 --guidance 99 --count 9 --model sdxl"))
    assert options.value.problems == (
        "unknown model 'sdxl'; available: tiny",
        "unknown sampler 'euler_b'; allowed: " + ", ".join(SAMPLER_NAMES),
        "count must be between 1 and 4; you gave 9",
        "steps must be between 1 and 60; you gave 0",
        "guidance must be between 0 and 20; you gave 99")
    with pytest.raises(UserError) as remix:  # the Remix form's bad strength and empty prompt together
        await gestures.check(Options(prompt=" "), Kind.IMG2IMG, also=("strength must be a number between 0.01 "
                                                                       "and 1, not 'lots'",))
    assert remix.value.problems == ("strength must be a number between 0.01 and 1, not 'lots'",
                                    "the prompt is empty; describe what to draw")
    await gestures.check(Options(prompt="a cat", strength=0.5), Kind.IMG2IMG)  # nothing wrong: no error


async def test_an_image_gesture_works_out_its_request_fields_once(
    tiny_checkpoints: TinyCheckpoints, db, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """A reply (from_image alone) or Remix (check, then from_image with what check returned)
    reads the options once: one look at the add-on folders (lcm_hint) per gesture, and the
    request is the one those fields make (the checked seed, the image's size and kind)."""
    path, yaml_path = tiny_checkpoints.get("sd1")
    config = AppConfig(models=(ModelSettings(name="tiny", checkpoint=path, config=yaml_path),))
    studio = SimpleNamespace(config=config, db=db, addons=AddonLibrary(None, None))
    gestures = Gestures(None, studio, None)  # type: ignore[arg-type]
    looks = []
    lcm_hint = studio.addons.lcm_hint
    monkeypatch.setattr(studio.addons, "lcm_hint", lambda *args: looks.append(args) or lcm_hint(*args))
    buffer = io.BytesIO()
    Image.new("RGBA", (128, 64), (200, 30, 30, 255)).save(buffer, "PNG")
    options = Options(prompt="a cat", strength=0.4)

    request, _ = await gestures.from_image(options, buffer.getvalue(), None)  # a reply
    assert len(looks) == 1 and (request.kind, request.width, request.height) == (Kind.IMG2IMG, 128, 64)
    checked = await gestures.check(options, Kind.IMG2IMG)  # Remix: checked before its deferral
    remixed, _ = await gestures.from_image(options, buffer.getvalue(), None, checked)
    assert len(looks) == 2 and remixed.seed == checked[0]["seed"] and remixed.strength == 0.4
    assert remixed.init_image == request.init_image


class _Upload:
    """An attachment as discord.py describes it: its size, and some bytes when read."""

    def __init__(self, size: int) -> None:
        self.size = size

    async def read(self) -> bytes:
        return b"read"


async def test_uploads_over_20_mb_are_refused_before_they_are_downloaded() -> None:
    assert await _read(_Upload(MAX_INPUT_BYTES), "image") == b"read"  # type: ignore[arg-type]
    with pytest.raises(UserError, match="the mask is 25.0 MB; the most allowed is 20 MB"):
        await _read(_Upload(25 * 2**20), "mask")  # type: ignore[arg-type]


def test_images_and_masks_over_the_pixel_cap_are_refused_before_decoding() -> None:
    side = math.isqrt(MAX_INPUT_PIXELS)
    huge = encoded(Image.new("1", (side + 1, side)))  # one column over; a 1-bit PNG stays small
    small = encoded(Image.new("RGB", (64, 64)))
    with pytest.raises(ImageInputError, match=f"the image is {side + 1}x{side} = {(side + 1) * side} pixels; "
                                              f"the most allowed is {MAX_INPUT_PIXELS}"):
        _decode_inputs(huge, None)
    with pytest.raises(ImageInputError, match=f"the mask is {side + 1}x{side} = "):
        _decode_inputs(small, huge)
