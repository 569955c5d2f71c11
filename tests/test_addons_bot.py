"""The bot's side of LoRAs and embeddings (bot/addons.py, storage/addons.py): the checks at submit,
the moderators' rules, NSFW add-ons, /loras, the prompt completion, costs and the buttons' requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bot.addons import CHOICE_CHARS, MESSAGE_CHARS, Addons, _pages, without_addons
from bot.commands import derived_request
from bot.config import DiscordSettings
from bot.policy import Requester
from generation.addons import AddonLibrary
from generation.request import LORA_MERGE_UNITS, GenerationRequest, Kind
from generation.settings import GenerationSettings
from models.lora import family_label
from storage.addons import addon_rules, reset_addon_rules, set_addon_rule
from storage.audit import audit_log
from storage.db import Database
from tests.fixtures.addons import lora_modules, random_lora, write_embedding, write_lora
from tests.fixtures.checkpoints import tiny_family
from tests.fixtures.storage import clock, db  # noqa: F401

GUILD, MOD = 10, 99
HERE = Requester(user_id=1, guild_id=GUILD, channel_id=5)
#: The family label of the tiny test models (32-wide conditioning), which every test file fits.
TINY = family_label(32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A LoRA folder (add_detail with kohya trigger words, an LCM LoRA, an NSFW one, a broken file)
    and an embedding folder (easynegative), all for the tiny SD 1.x family."""
    root = tmp_path_factory.mktemp("addons")
    modules = lora_modules(tiny_family("sd1"), blocks=False)
    tags = '{"img": {"intricate": 7, "detailed": 9}}'
    write_lora(root / "loras" / "add_detail.safetensors", random_lora(modules), metadata={"ss_tag_frequency": tags})
    write_lora(root / "loras" / "lcm-lora-tiny.safetensors", random_lora(modules, seed=1))
    write_lora(root / "loras" / "nsfw_body.safetensors", random_lora(modules, seed=2))
    (root / "loras" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    write_embedding(root / "embeddings" / "easynegative.safetensors", torch.randn(3, 32))
    return root / "loras", root / "embeddings"


@pytest.fixture
def addons(folders: tuple[Path, Path], db: Database) -> Addons:  # noqa: F811
    return Addons(AddonLibrary(*folders), db, DiscordSettings(nsfw_addons=("NSFW_*",)))


def request(prompt: str, negative: str = "", **changes: object) -> GenerationRequest:
    fields = dict(prompt=prompt, negative_prompt=negative, model="tiny", steps=10, guidance=7.0, seed=1, width=512,
                  height=512)
    return GenerationRequest(**(fields | changes))


async def test_usable_add_ons_pass_the_checks(addons: Addons) -> None:
    ok = request("a castle <lora:add_detail:0.7> <lora:lcm-lora-tiny>", "easynegative, blurry")
    assert await addons.problems(ok, HERE, TINY) == []
    assert await addons.problems(request("a castle, easy negative"), HERE, TINY) == []  # not the word


async def test_each_problem_is_named_at_once(addons: Addons) -> None:
    bad = request("a castle <lora:add_detial:1> <lora:nsfw_body:0.5> <lora:broken>", "<lora:add_detail> easynegative")
    problems = await addons.problems(bad, HERE, "SD 2.x")
    assert problems[0].startswith("<lora:...> tags go in the prompt, not the negative prompt")
    assert problems[1] == "unknown LoRA 'add_detial'; did you mean add_detail?"
    assert problems[2] == "LoRA nsfw_body runs only in age-restricted channels; try it in one"
    assert problems[3].startswith("LoRA broken cannot be used: ")
    assert problems[4] == f"embedding easynegative is for {TINY}; the model tiny is SD 2.x"
    assert len(problems) == 5
    assert await addons.problems(request("x <lora:a:zz>"), HERE, TINY) == [
        "<lora:a:zz>: the weight must be a number, as in <lora:a:0.8>"]


async def test_a_lora_for_another_family_names_both(addons: Addons) -> None:
    assert await addons.problems(request("x <lora:add_detail:0.5>"), HERE, "SD 2.x") == [
        f"LoRA add_detail is for {TINY}; the model tiny is SD 2.x"]
    assert await addons.problems(request("x <lora:add_detail:0.5>"), HERE, None) == []  # model unreadable


async def test_nsfw_add_ons_run_in_age_restricted_channels(addons: Addons) -> None:
    nsfw_channel = Requester(user_id=1, guild_id=GUILD, channel_id=6, channel_nsfw=True)
    assert await addons.problems(request("x <lora:nsfw_body:0.5>"), nsfw_channel, TINY) == []
    assert addons.nsfw("nsfw_body") and addons.nsfw("NSFW_x") and not addons.nsfw("add_detail")
    # Refused elsewhere, and audited for the moderators as prompts with NSFW words are.
    assert await addons.problems(request("x <lora:nsfw_body:0.5>"), HERE, TINY) == [
        "LoRA nsfw_body runs only in age-restricted channels; try it in one"]
    (entry,) = await audit_log(addons.db, GUILD)
    assert (entry.action, entry.target, entry.actor_id) == ("prompt.refused", "nsfw:nsfw_body", HERE.user_id)


async def test_moderators_rules_allow_and_refuse_files(addons: Addons, db: Database) -> None:  # noqa: F811
    assert (await addon_rules(db, GUILD)).allows("lora", "add_detail")  # the default: everything
    assert await set_addon_rule(db, actor_id=MOD, guild_id=GUILD, kind="lora", name="add_detail", allowed=False)
    assert not await set_addon_rule(db, actor_id=MOD, guild_id=GUILD, kind="lora", name="add_detail", allowed=False)
    refused = await addons.problems(request("x <lora:add_detail>"), HERE, TINY)
    assert refused == ["LoRA add_detail is not allowed in this server (/loras lists those that are)"]
    other = Requester(user_id=1, guild_id=GUILD + 1, channel_id=5)
    assert await addons.problems(request("x <lora:add_detail>"), other, TINY) == []  # per server
    dm = Requester(user_id=1, guild_id=None, channel_id=5)
    assert await addons.problems(request("x <lora:add_detail>"), dm, TINY) == []
    # A near miss of a disallowed name is not offered.
    assert await addons.problems(request("x <lora:add_detal>"), HERE, TINY) == [
        "unknown LoRA 'add_detal'; available: lcm-lora-tiny"]

    # An allow-list: every embedding refused but the one allowed.
    await set_addon_rule(db, actor_id=MOD, guild_id=GUILD, kind="embedding", name="*", allowed=False)
    assert await addons.problems(request("x", "easynegative"), HERE, TINY) == [
        "embedding easynegative is not allowed in this server (/loras lists those that are)"]
    await set_addon_rule(db, actor_id=MOD, guild_id=GUILD, kind="embedding", name="easynegative", allowed=True)
    assert await addons.problems(request("x", "easynegative"), HERE, TINY) == []

    entries = await audit_log(db, GUILD)
    assert [(e.action, e.target, e.after) for e in reversed(entries)] == [
        ("addons.disallow", "lora:add_detail", {"allowed": False}),
        ("addons.disallow", "embedding:*", {"allowed": False}),
        ("addons.allow", "embedding:easynegative", {"allowed": True})]
    assert await reset_addon_rules(db, actor_id=MOD, guild_id=GUILD) == 3
    assert (await audit_log(db, GUILD))[0].action == "addons.reset"
    assert (await addon_rules(db, GUILD)).rules == {}
    assert await reset_addon_rules(db, actor_id=MOD, guild_id=GUILD) == 0


async def test_prompt_completion_offers_usable_names(addons: Addons, db: Database) -> None:  # noqa: F811
    values = [c.value for c in await addons.complete_prompt(HERE, "a castle <lora:")]
    assert values == ["a castle <lora:add_detail:1>", "a castle <lora:lcm-lora-tiny:1>"]  # not nsfw, not broken
    assert [c.value for c in await addons.complete_prompt(HERE, "a castle <LORA:lor")] == [
        "a castle <lora:lcm-lora-tiny:1>"]
    assert [c.value for c in await addons.complete_prompt(HERE, "a castle <lora:add")] == [
        "a castle <lora:add_detail:1>"]
    assert await addons.complete_prompt(HERE, "a castle <lora:add_detail:1> at dusk") == []
    assert await addons.complete_prompt(HERE, "a castle") == []
    long = "x" * (CHOICE_CHARS - len("<lora:add_detail:1>"))
    assert [c.value for c in await addons.complete_prompt(HERE, long + "<lora:a")] == [long + "<lora:add_detail:1>"]
    assert await addons.complete_prompt(HERE, long + "y<lora:a") == []  # over Discord's 100 characters
    await set_addon_rule(db, actor_id=MOD, guild_id=GUILD, kind="lora", name="add_detail", allowed=False)
    assert [c.value for c in await addons.complete_prompt(HERE, "<lora:")] == ["<lora:lcm-lora-tiny:1>"]


async def test_listing_shows_families_triggers_and_fits_a_message(addons: Addons, db: Database) -> None:  # noqa: F811
    text = await addons.listing(HERE)
    assert f"- `add_detail` · {TINY} · triggers: detailed, intricate" in text
    assert "- `lcm-lora-tiny`" in text and "LCM: defaults to sampler lcm, 4 steps, guidance 1.5" in text
    assert f"- `easynegative` · {TINY} · 3 tokens" in text
    assert "- `broken` · family unknown · cannot be used: " in text
    assert "nsfw_body" not in text and "1 more only in age-restricted channels" in text
    assert "nsfw_body" in await addons.listing(Requester(user_id=1, guild_id=GUILD, channel_id=6, channel_nsfw=True))
    await set_addon_rule(db, actor_id=MOD, guild_id=GUILD, kind="lora", name="*", allowed=False)
    await set_addon_rule(db, actor_id=MOD, guild_id=GUILD, kind="embedding", name="*", allowed=False)
    assert await addons.listing(HERE) == "No LoRAs or embeddings can be used here."


async def test_long_listings_are_paged(folders: tuple[Path, Path], db: Database, tmp_path: Path) -> None:  # noqa: F811
    """Eighty LoRAs with long trigger lists: pages that fit a message, each saying where it is."""
    tags = '{"img": {' + ", ".join(f'"trigger word {i}": {i}' for i in range(10)) + "}}"
    modules = lora_modules(tiny_family("sd1"), blocks=False)
    one = random_lora(dict(list(modules.items())[:1]))
    for i in range(80):
        write_lora(tmp_path / f"style_{i:02}.safetensors", one, metadata={"ss_tag_frequency": tags})
    addons = Addons(AddonLibrary(tmp_path, None), db, DiscordSettings())
    first = await addons.listing(HERE)
    count = int(first.rsplit("of ", 1)[1].split(":")[0])
    pages = [first, *[await addons.listing(HERE, page) for page in range(2, count + 1)]]
    assert count > 1 and all(len(page) <= MESSAGE_CHARS for page in pages)
    assert first.endswith(f"-# Page 1 of {count}: /loras page:2 for more.")
    assert pages[-1].endswith(f"-# Page {count} of {count}.") and await addons.listing(HERE, 99) == pages[-1]
    assert sum(page.count("- `style_") for page in pages) == 80


def test_pages_cut_between_lines_within_the_limit() -> None:
    lines = [f"- `lora_{i:03}` · SD 1.x · triggers: " + "word, " * 40 for i in range(60)]
    pages = _pages(lines, MESSAGE_CHARS - 40)
    assert len(pages) > 1 and all(len(p) <= MESSAGE_CHARS - 40 for p in pages)
    assert "\n".join(pages).split("\n") == lines


async def test_x4_upscales_drop_the_drawing_models_add_ons(addons: Addons) -> None:
    source = request("a <lora:add_detail:0.7> castle, easynegative", "easynegative, blurry")
    upscale = await without_addons(source, addons)
    assert (upscale.prompt, upscale.negative_prompt) == ("a castle", "blurry")
    assert (await without_addons(request("<lora:add_detail>"), addons)).prompt == "high quality"


def test_every_button_keeps_the_loras() -> None:
    settings = GenerationSettings(max_pixels=1024 * 1024, max_side=1024)
    source = request("a castle <lora:add_detail:0.7>", "easynegative")
    sha = "0" * 64
    for action in ("vary", "subtle", "strong", "upscale", "zoom"):
        derived, _ = derived_request(action, source, sha, (512, 512), settings)  # type: ignore[arg-type]
        assert (derived.prompt, derived.negative_prompt) == (source.prompt, source.negative_prompt), action


def test_a_lora_merge_costs_units() -> None:
    plain = request("a castle")
    assert request("a castle <lora:a:0.5> <lora:b> <lora:a:0.2>").cost == plain.cost + 2 * LORA_MERGE_UNITS
    assert request("a castle <lora:a>", kind=Kind.TXT2IMG, count=2).loras == 1
    sdxl = request("a castle <lora:a>").model_copy(update={"unet_flops_ratio": 2.1})
    assert sdxl.cost == request("a castle").model_copy(update={"unet_flops_ratio": 2.1}).cost + 2.1 * LORA_MERGE_UNITS
