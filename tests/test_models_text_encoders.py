"""The text encoders' prompt-facing interface: tokenization, special ids, causality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTokenizer

from models.families import TextEncoderConfig
from models.loading import load_checkpoint
from models.text_encoders import CLIPTextEncoder, OpenCLIPTextEncoder, TextEncoder
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_checkpoints  # noqa: F401

PROMPTS = [
    "a photo of a cat",
    "cinematic film still, 4k, realistic, ((cinematic photo:1.3)) of panda wearing a blue spacesuit, ((low light:1.4))",
    "Café  naïve 東京 🐼 \\(escaped\\) [word] BREAK   trailing   ",
]


@pytest.fixture(scope="module")
def transformers_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    """transformers' own BPE implementation, built offline from the vocabulary open_clip ships."""
    bpe = SimpleTokenizer()
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps(bpe.encoder))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.fixture(scope="module", params=["sd1", "sd2-v"])
def encoder(request: pytest.FixtureRequest, tiny_checkpoints: TinyCheckpoints) -> TextEncoder:
    return load_checkpoint(tiny_checkpoints.get(request.param)[0]).text_encoder


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenize_matches_transformers_clip_tokenizer(
    encoder: TextEncoder, transformers_tokenizer: CLIPTokenizer, prompt: str
) -> None:
    assert encoder.tokenize(prompt) == transformers_tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_tokenize_adds_no_special_tokens_and_never_truncates(encoder: TextEncoder) -> None:
    ids = encoder.tokenize("panda " * 100)
    assert len(ids) == 100 and encoder.bos_id not in ids and encoder.eos_id not in ids
    assert encoder.max_length == 77


def test_special_ids_follow_the_originals(tiny_checkpoints: TinyCheckpoints) -> None:
    sd1 = load_checkpoint(tiny_checkpoints.get("sd1")[0]).text_encoder
    sd2 = load_checkpoint(tiny_checkpoints.get("sd2-v")[0]).text_encoder
    assert isinstance(sd1, CLIPTextEncoder) and isinstance(sd2, OpenCLIPTextEncoder)
    assert (sd1.bos_id, sd1.eos_id, sd1.pad_id) == (49406, 49407, 49407)  # FrozenCLIPEmbedder pads with EOS
    assert (sd2.bos_id, sd2.eos_id, sd2.pad_id) == (49406, 49407, 0)  # open_clip pads with 0


def test_hidden_states_are_causal(encoder: TextEncoder) -> None:
    ids = [encoder.bos_id, *encoder.tokenize("a red fox in the snow"), encoder.eos_id]
    tokens = torch.tensor([ids + [encoder.pad_id] * (77 - len(ids))])  # (1, 77)
    changed = tokens.clone()
    changed[0, 5] = 1000
    with torch.no_grad():
        before, after = encoder(tokens), encoder(changed)
    assert before.shape == (1, 77, encoder.config.width)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=0)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_open_clip_layer_choice_is_honoured(tiny_checkpoints: TinyCheckpoints) -> None:
    model = load_checkpoint(tiny_checkpoints.get("sd2-v")[0])
    last = OpenCLIPTextEncoder(TextEncoderConfig(**{**vars(model.family.text), "layer": "last"}))
    last.load_state_dict(model.text_encoder.state_dict())
    tokens = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        penultimate_states, last_states = model.text_encoder(tokens), last(tokens)
    assert not torch.allclose(penultimate_states, last_states, atol=1e-3)
    # The penultimate output is exactly the last-layer model with its final block skipped.
    del last.model.transformer.resblocks[-1]
    with torch.no_grad():
        torch.testing.assert_close(penultimate_states, last(tokens))


def test_tokenizer_needs_no_files_outside_open_clip() -> None:
    bpe_path = Path(SimpleTokenizer.__init__.__defaults__[0])
    assert bpe_path.is_file() and "open_clip" in bpe_path.parts
