"""Textual-inversion embeddings: the files (models/embeddings.py), their words in prompts
(generation/prompts.py) and the text encoders' token-embedding override, on tiny real encoders.

The independent check: an embedding whose vectors are the token embeddings of real words encodes
exactly as those words do, in both text towers, in emphasis too."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from generation.addons import AddonError, AddonLibrary
from generation.prompts import chunk_prompt, embedding_words, encode_prompts
from models.embeddings import EmbeddingError, embedding_vectors
from models.lora import AddonFileError
from models.loading import load_checkpoint
from models.text_encoders import TextEncoder
from tests.fixtures.addons import write_embedding
from tests.fixtures.checkpoints import TinyCheckpoints, tiny_checkpoints  # noqa: F401


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def encoder(request: pytest.FixtureRequest, tiny_checkpoints: TinyCheckpoints) -> TextEncoder:
    return load_checkpoint(tiny_checkpoints.get(request.param)[0]).text_encoder


def vectors_of(encoder: TextEncoder, words: str) -> torch.Tensor:
    return encoder.embed_tokens(torch.tensor(encoder.tokenize(words))).detach()  # (N, D)


@pytest.mark.parametrize(("with_embedding", "with_words"), [
    ("a photo of myemb in the snow", "a photo of red fox cub in the snow"),
    ("(myemb:1.3), snow, [blurry]", "(red fox cub:1.3), snow, [blurry]"),
    ("MyEmb", "red fox cub"),
])
@torch.no_grad()
def test_an_embedding_encodes_as_the_tokens_of_its_vectors(encoder: TextEncoder, with_embedding: str,
                                                          with_words: str) -> None:
    embeddings = {"myemb": vectors_of(encoder, "red fox cub")}
    got = encode_prompts(encoder, [with_embedding, "myemb"], embeddings=embeddings)
    expected = encode_prompts(encoder, [with_words, "red fox cub"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_the_override_path_equals_the_plain_path(encoder: TextEncoder) -> None:
    tokens = torch.tensor([[encoder.bos_id, *encoder.tokenize("a red fox"), encoder.eos_id] + [encoder.pad_id] * 72])
    assert torch.equal(encoder(tokens, encoder.embed_tokens(tokens)), encoder(tokens))


def test_words_are_whole_words_and_chunking_keeps_an_embedding_together(encoder: TextEncoder) -> None:
    assert embedding_words(["easynegative, ugly", "my-easynegative2"], ["easynegative", "bad-hands-5"]) == [
        "easynegative"]
    assert embedding_words(["(bad-hands-5:1.2)"], ["easynegative", "bad-hands-5"]) == ["bad-hands-5"]
    filler = " ".join(["cat"] * 73)  # 73 tokens
    chunks = chunk_prompt(encoder, f"{filler} myemb dog", {"other": 2, "myemb": 3})
    first = [t for t in chunks[0].tokens[1:] if t not in (encoder.eos_id, encoder.pad_id)]
    assert len(first) == 73  # 73 + 3 > 75: the embedding starts the next chunk, whole
    assert list(chunks[1].tokens[1:5]) == [-3, -4, -5, *encoder.tokenize("dog")]
    weighted = chunk_prompt(encoder, "(myemb:1.5) dog", {"myemb": 3})[0]
    assert weighted.tokens[1:4] == (-1, -2, -3) and weighted.weights[1:5] == (1.5, 1.5, 1.5, 1.0)


def test_files_in_both_formats_are_read(tmp_path: Path) -> None:
    vectors = torch.randn(3, 32)
    for name in ("a.safetensors", "b.pt"):
        assert torch.equal(embedding_vectors(write_embedding(tmp_path / name, vectors))["*"], vectors)


class Payload:
    def __reduce__(self) -> tuple:
        return (print, ("this must never run",))


def test_bad_embedding_files_get_their_message(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"string_to_param": {"*": Payload()}}, protocol=2))
    torch.save({"string_to_param": {"*": Payload()}}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(EmbeddingError, match="refused|not a readable"):
            embedding_vectors(tmp_path / name)
    safetensors.torch.save_file({"clip_l": torch.zeros(2, 768)}, tmp_path / "half.safetensors")
    with pytest.raises(EmbeddingError, match="clip_l vectors but SDXL embeddings need both clip_g and clip_l"):
        embedding_vectors(tmp_path / "half.safetensors")
    safetensors.torch.save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(EmbeddingError, match="both towers need the same count"):
        embedding_vectors(tmp_path / "xl.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(AddonFileError, match="embedding cut.safetensors is not a readable .safetensors"):
        embedding_vectors(tmp_path / "cut.safetensors")
    write_embedding(tmp_path / "huge.safetensors", torch.zeros(80, 32))
    with pytest.raises(EmbeddingError, match="1 <= N <= 75"):
        embedding_vectors(tmp_path / "huge.safetensors")


def test_a_width_mismatch_names_both_families(tiny_checkpoints: TinyCheckpoints, tmp_path: Path) -> None:
    network = load_checkpoint(tiny_checkpoints.get("sd1")[0])
    write_embedding(tmp_path / "emb" / "wide.pt", torch.zeros(2, 1024))
    write_embedding(tmp_path / "emb" / "fits.safetensors", torch.zeros(2, 32))
    library = AddonLibrary(None, tmp_path / "emb")
    assert [set(tower) for tower in library.vectors_for(network, ["a fits b"])] == [{"fits"}]
    assert library.vectors_for(network, ["nothing here"]) == [{}]
    with pytest.raises(AddonError, match=r"wide is for SD 2.x \(1024-wide\); the model is .*32-wide"):
        library.vectors_for(network, ["a wide b"])
    assert library.embeddings()["wide"].family == "SD 2.x" and library.embeddings()["wide"].vectors == 2
