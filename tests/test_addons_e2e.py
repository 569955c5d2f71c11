"""LoRAs and embeddings end to end: the real bot against the loopback Discord server, with a tiny
checkpoint and tiny LoRA and embedding files in its folders (see tests/test_bot_e2e.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch

from generation.request import LORA_MERGE_UNITS, JobState
from generation.settings import ModelSettings
from models.lora import family_label
from storage import jobs as stored
from storage.moderation import ban
from tests.fixtures.addons import lora_modules, random_lora, write_embedding, write_lora
from tests.fixtures.checkpoints import tiny_checkpoints, tiny_family  # noqa: F401
from tests.test_bot_e2e import TIMEOUT, World, imagine_from_upload, message_for, png_info, private_answer, running
from tests.test_bot_e2e import tiny_x4_upscaler
from tests.test_bot_e2e import world as base_world  # noqa: F401


@pytest.fixture
def world(base_world: World, tmp_path: Path) -> World:
    """test_bot_e2e's world, with a LoRA folder (add_detail, an LCM LoRA) and an embedding."""
    modules = lora_modules(tiny_family("sd1"))
    write_lora(tmp_path / "loras" / "add_detail.safetensors", random_lora(modules, size=0.2))
    write_lora(tmp_path / "loras" / "lcm-lora-tiny.safetensors", random_lora(modules, seed=1, size=0.2))
    write_embedding(tmp_path / "embeddings" / "easynegative.safetensors", torch.randn(2, 32))
    folders = dict(lora_dir=tmp_path / "loras", embedding_dir=tmp_path / "embeddings")
    config = base_world.config
    return replace(base_world, config=config.model_copy(update={
        "generation": config.generation.model_copy(update=folders)}))


async def test_a_lora_and_an_embedding_reach_the_png_and_the_buttons_keep_them(world: World) -> None:
    server = world.server
    async with running(world.config, server) as bot:
        choices = await server.autocomplete(world.alice, world.channel, "imagine", {"prompt": "a fox <lora:add"},
                                            "prompt")
        assert [c["value"] for c in choices] == ["a fox <lora:add_detail:1>"]

        asked = await server.slash(world.alice, world.channel, "imagine", {
            "prompt": "a fox <lora:add_detail:0.7>", "negative": "easynegative, blurry", "seed": 3, "steps": 2})
        result = (await server.wait_for(message_for(asked, files=True), TIMEOUT)).message
        library = bot.studio.addons
        lora_hash = library.short_hash(library.loras()["add_detail"])
        ti_hash = library.short_hash(library.embeddings()["easynegative"])
        _, parameters = png_info(result.attachments[0].data)
        assert parameters.startswith("a fox <lora:add_detail:0.7>\nNegative prompt: easynegative, blurry\n")
        assert f'Lora hashes: "add_detail: {lora_hash}", TI hashes: "easynegative: {ti_hash}"' in parameters
        job_id = result.buttons()[0]["custom_id"].split(":")[3]
        job = await stored.get_job(bot.studio.db, job_id)
        assert job.request.prompt == "a fox <lora:add_detail:0.7>" and job.cost == pytest.approx(
            2 * 128 * 128 / (512 * 512) + LORA_MERGE_UNITS)  # two steps at 128x128 and one LoRA merge

        shown = await server.slash(world.alice, world.channel, "show", {"job": job_id})
        text = (await server.wait_for(lambda a: a.interaction is shown and a.kind == "edit"
                                      and a.content.startswith("**Job"))).content
        assert "Prompt: a fox <lora:add\\_detail:0.7>" in text
        assert f"Lora hashes: add_detail: {lora_hash}; TI hashes: easynegative: {ti_hash}" in text

        rerun = await server.press_button(world.bob, result, f"atelier:v1:rerun:{job_id}:0")
        again = (await server.wait_for(message_for(rerun, files=True), TIMEOUT)).message
        assert f'Lora hashes: "add_detail: {lora_hash}"' in png_info(again.attachments[0].data)[1]

        text = f"{server.bot.mention} a fox <lora:add_detail:0.5> --no easynegative --steps 2"
        reply = await server.post_message(world.carol, world.channel, text, reference=result)
        redone = (await server.wait_for(lambda a: a.kind == "message" and a.message.reference is reply
                                        and bool(a.message.attachments), TIMEOUT)).message
        assert f'Lora hashes: "add_detail: {lora_hash}", TI hashes:' in png_info(redone.attachments[0].data)[1]
        typo = await server.post_message(world.carol, world.channel, f"{server.bot.mention} a fox <lora:add_detai>",
                                         reference=result)
        said = (await server.wait_for(lambda a: a.kind == "message" and a.message.reference is typo)).message
        assert said.content == "unknown LoRA 'add_detai'; did you mean add_detail?"

        menu = await server.context_menu(world.carol, result, "Remix")
        await server.wait_for(lambda a: a.interaction is menu and a.callback_type == 9)
        submitted = await server.submit_modal(world.carol, menu, {"prompt": "a wolf", "negative": "<lora:add_detail>"})
        assert (await private_answer(server, submitted)).content.startswith("<lora:...> tags go in the prompt")
        menu = await server.context_menu(world.carol, result, "Remix")
        await server.wait_for(lambda a: a.interaction is menu and a.callback_type == 9)
        submitted = await server.submit_modal(world.carol, menu, {"prompt": "a wolf <lora:add_detail:0.4>"})
        remixed = (await server.wait_for(message_for(submitted, files=True), TIMEOUT)).message
        assert f'Lora hashes: "add_detail: {lora_hash}"' in png_info(remixed.attachments[0].data)[1]

        lcm = await server.slash(world.alice, world.channel, "imagine", {"prompt": "a fox <lora:lcm-lora-tiny>"})
        fast = (await server.wait_for(message_for(lcm, files=True), TIMEOUT)).message
        assert "Steps: 4, Sampler: LCM, CFG scale: 1.5" in png_info(fast.attachments[0].data)[1]


async def test_unknown_and_disallowed_loras_are_refused_at_once(world: World) -> None:
    server = world.server
    async with running(world.config, server) as bot:
        async def refusal(prompt: str, negative: str | None = None) -> str:
            options = {"prompt": prompt} | ({"negative": negative} if negative else {})
            return (await private_answer(server, await server.slash(world.alice, world.channel, "imagine",
                                                                      options))).content

        assert await refusal("a fox <lora:add_detial:0.7>") == "unknown LoRA 'add_detial'; did you mean add_detail?"
        await ban(bot.studio.db, actor_id=world.mod.id, guild_id=world.guild.id, user_id=world.bob.id, reason="spam")
        both = await server.slash(world.bob, world.channel, "imagine", {"prompt": "a fox <lora:add_detial:0.7>"})
        assert (await private_answer(server, both)).content == (  # with the studio's reasons, in one answer
            "This request cannot run here, for 2 reasons:\n- You are banned from using Atelier in this server "
            "(reason: spam).\n- Unknown LoRA 'add_detial'; did you mean add_detail?")
        assert (await refusal("a fox", "<lora:add_detail>")).startswith("<lora:...> tags go in the prompt")
        assert await refusal("a fox <lora:add_detail:zz>") == (
            "<lora:add_detail:zz>: the weight must be a number, as in <lora:add_detail:0.8>")
        xl = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}
        safetensors.torch.save_file(xl, world.config.generation.lora_dir / "xl_style.safetensors")
        assert await refusal("a fox <lora:xl_style>") == (
            f"LoRA xl_style is for SDXL; the model tiny is {family_label(32)}")  # the tiny SD 1.x model's width

        offered = await server.autocomplete(world.mod, world.channel, "addons disallow", {"name": "e"}, "name")
        assert [c["value"] for c in offered] == ["add_detail", "xl_style", "easynegative"]
        disallowed = await server.slash(world.mod, world.channel, "addons disallow", {"name": "add_detail"})
        said = (await server.wait_for(lambda a: a.interaction is disallowed and a.kind == "message")).message
        assert said.content == "LoRA `add_detail`: not allowed." and said.ephemeral
        assert await refusal("a fox <lora:add_detail:0.7>") == (
            "LoRA add_detail is not allowed in this server (/loras lists those that are)")
        listed = await server.slash(world.alice, world.channel, "loras", {})
        text = (await server.wait_for(lambda a: a.interaction is listed and a.kind == "message")).message.content
        assert "`lcm-lora-tiny`" in text and "`easynegative`" in text and "add_detail" not in text

        refused = await server.slash(world.alice, world.channel, "addons allow", {"name": "add_detail"})
        answer = (await server.wait_for(lambda a: a.interaction is refused and a.kind == "message")).message
        assert answer.content.startswith("Only moderators")

        async def moderate(command: str, options: dict[str, str]) -> str:
            asked = await server.slash(world.mod, world.channel, command, options)
            return (await server.wait_for(lambda a: a.interaction is asked and a.kind == "message")).message.content

        assert await moderate("addons disallow", {"name": "*", "kind": "embedding"}) == (
            "Every embedding without a rule of its own: not allowed.")
        assert await moderate("addons allow", {"name": "add_detial"}) == (
            "There is no LoRA or embedding named `add_detial`; did you mean `add_detail`?")
        assert await moderate("addons show", {}) == (
            "**LoRAs**: allowed unless listed\n- `add_detail`: not allowed\n"
            "**embeddings**: not allowed unless listed")
        audited = await moderate("audit", {"kind": "add-ons"})
        assert "addons.disallow `lora:add_detail`" in audited and "addons.disallow `embedding:*`" in audited
        assert await moderate("addons reset", {}) == (
            "Removed 2 rules: every LoRA and embedding in the folders is allowed here.")
        assert await stored.jobs_by_state(bot.studio.db, *JobState) == []  # nothing was queued
        # The member refused /addons was told once: no "something went wrong" followed.
        assert [a.message.content[:15] for a in server.responses(refused) if a.message] == ["Only moderators"]


async def test_the_x4_upscaler_runs_without_the_drawing_models_add_ons_and_keeps_them_for_later(
        world: World, tmp_path: Path) -> None:
    server = world.server
    x4 = tiny_x4_upscaler(tmp_path)
    models = (*world.config.models, ModelSettings(name="x4", checkpoint=x4))
    generation = world.config.generation.model_copy(update=dict(upscaler="x4", upscaler_steps=2))
    config = world.config.model_copy(update=dict(models=models, generation=generation))
    async with running(config, server):
        first, job_id = await imagine_from_upload(world, "a lighthouse <lora:add_detail:0.7>, easynegative")
        assert 'Lora hashes: "add_detail: ' in png_info(first.attachments[0].data)[1]
        upscale = await server.press_button(world.bob, first, f"atelier:v1:upscale:{job_id}:0")
        upscaled = (await server.wait_for(message_for(upscale, files=True), TIMEOUT)).message
        size, parameters = png_info(upscaled.attachments[0].data)
        assert size == (256, 256) and parameters.startswith("a lighthouse\n") and "hashes" not in parameters
        upscaled_id = upscaled.buttons()[0]["custom_id"].split(":")[3]
        subtle = await server.press_button(world.bob, upscaled, f"atelier:v1:subtle:{upscaled_id}:0")
        varied = (await server.wait_for(message_for(subtle, files=True), TIMEOUT)).message
        parameters = png_info(varied.attachments[0].data)[1]  # drawn again by the model that drew it, with its LoRA
        assert parameters.startswith("a lighthouse <lora:add_detail:0.7>, easynegative\n")
        assert 'Lora hashes: "add_detail: ' in parameters and "Model: tiny" in parameters
