"""Prompt syntax (the web UI's own documented examples as the oracle), chunking with a fake and
with open_clip's real tokenizer, and the weighting with mean restoration."""

import re

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from generation.prompts import (
    BREAK,
    PromptError,
    check_lora_tags,
    chunk_prompt,
    encode_prompts,
    lora_set,
    parse_emphasis,
    split_lora_tags,
)

EXAMPLE = (
    "cinematic film still, 4k, realistic, ((cinematic photo:1.3)) of panda wearing a blue spacesuit, "
    "((low light:1.4))"
)


@pytest.mark.parametrize(
    "text, expected",
    [
        # the examples documented by the web UI's parse_prompt_attention
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)],
        ),
        # further cases
        ("((word))", [("word", 1.21)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.21)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("( word : 0.25 )", [(" word ", 0.25)]),
        ("([mixed])", [("mixed", 1.0)]),
        ("[unclosed (both", [("unclosed ", 1 / 1.1), ("both", 1.0)]),
        ("stray) and] closers", [("stray) and] closers", 1.0)]),
        ("ratio 16:9, no weight", [("ratio 16:9, no weight", 1.0)]),
        ("weight:1.2) without bracket", [("weight:1.2) without bracket", 1.0)]),
        ("back\\\\slash", [("back\\slash", 1.0)]),
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),
        ("a BREAK BREAK b", [("a", 1.0), BREAK, BREAK, ("b", 1.0)]),
        ("a BREAK (b:-1)", [("a", 1.0), BREAK, ("b", -1.0)]),  # a weight of -1 is not a BREAK
        ("BREAKING news, a break", [("BREAKING news, a break", 1.0)]),
        (
            EXAMPLE,
            [("cinematic film still, 4k, realistic, ", 1.0), ("cinematic photo", 1.43),
             (" of panda wearing a blue spacesuit, ", 1.0), ("low light", 1.54)],
        ),
    ],
)
def test_parse_emphasis(text: str, expected: list[tuple[str, float]]) -> None:
    parsed = parse_emphasis(text)
    assert [piece for piece, _ in parsed] == [piece for piece, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected], rel=1e-12)


class FakeEncoder:
    """Words "wN" are token N, "," is token 5; the network embeds ids and positions linearly."""

    bos_id, eos_id, max_length, dim = 1, 2, 77, 6

    def __init__(self, pad_id: int = 2) -> None:
        self.pad_id = pad_id
        self.table = torch.randn(1000, self.dim, generator=torch.Generator().manual_seed(0)) + 0.5
        self.calls = 0

    def tokenize(self, text: str) -> list[int]:
        return [5 if w == "," else int(w[1:]) for w in re.findall(r",|[^\s,()\[\]]+", text)]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert tokens.shape[1:] == (77,) and tokens.dtype == torch.long
        return self.table[tokens] + torch.linspace(0, 1, 77).view(1, 77, 1)


def words(first: int, count: int) -> str:
    return " ".join(f"w{i}" for i in range(first, first + count))


def content(chunk, encoder: FakeEncoder) -> list[int]:
    """The tokens between BOS and the first EOS."""
    assert chunk.tokens[0] == encoder.bos_id and len(chunk.tokens) == len(chunk.weights) == 77
    return list(chunk.tokens[1 : chunk.tokens.index(encoder.eos_id, 1)])


def test_long_prompts_split_into_chunks_of_75() -> None:
    encoder = FakeEncoder()
    chunks = chunk_prompt(encoder, words(100, 160))
    expected = [list(range(100, 175)), list(range(175, 250)), list(range(250, 260))]
    assert [content(c, encoder) for c in chunks] == expected
    assert chunks[0].tokens[-1] == encoder.eos_id
    assert chunks[2].tokens[11:] == (encoder.eos_id,) * 66


def test_a_full_chunk_moves_the_words_after_a_recent_comma_to_the_next() -> None:
    encoder = FakeEncoder()
    chunks = chunk_prompt(encoder, f"{words(100, 60)} , {words(200, 30)}")  # comma at index 60
    assert [content(c, encoder) for c in chunks] == [[*range(100, 160), 5], list(range(200, 230))]
    chunks = chunk_prompt(encoder, f"{words(100, 50)} , {words(200, 30)}")  # comma 25 tokens back
    assert [content(c, encoder) for c in chunks] == [[*range(100, 150), 5, *range(200, 224)], list(range(224, 230))]


def test_break_starts_a_new_chunk_and_weights_follow_their_tokens() -> None:
    encoder = FakeEncoder(pad_id=0)
    chunks = chunk_prompt(encoder, "w10 (w11 w12:1.5) BREAK [w13]")
    assert [content(c, encoder) for c in chunks] == [[10, 11, 12], [13]]
    assert chunks[0].tokens[:6] == (1, 10, 11, 12, 2, 0) and set(chunks[0].tokens[5:]) == {0}
    assert chunks[0].weights[:5] == (1.0, 1.0, 1.5, 1.5, 1.0) and set(chunks[0].weights[5:]) == {1.0}
    assert chunks[1].weights[1] == pytest.approx(1 / 1.1)
    assert [content(c, encoder) for c in chunk_prompt(encoder, "w3 BREAK BREAK w4")] == [[3], [], [4]]


def test_an_empty_prompt_is_one_chunk_of_bos_eos_and_padding() -> None:
    (chunk,) = chunk_prompt(FakeEncoder(pad_id=0), "")
    assert chunk.tokens == (1, 2, *[0] * 75) and chunk.weights == (1.0,) * 77


def test_encoding_weights_hidden_states_and_restores_the_mean() -> None:
    encoder = FakeEncoder()
    weighted, plain = encode_prompts(encoder, ["(w10 w11:1.5) [w12]", "w10 w11 w12"])
    assert encoder.calls == 1
    (chunk,) = chunk_prompt(encoder, "(w10 w11:1.5) [w12]")
    z = encoder(torch.tensor([chunk.tokens]))[0]  # (77, D)
    assert torch.equal(plain, z)  # unweighted prompts are exactly the encoder's states
    w = torch.tensor(chunk.weights)[:, None]
    expected = z * w * (z.mean() / (z * w).mean())  # the web UI's z * (original_mean / new_mean)
    assert torch.allclose(weighted, expected, rtol=1e-6, atol=1e-6)
    assert weighted.mean().item() == pytest.approx(z.mean().item(), rel=1e-6)
    assert not torch.allclose(weighted, z)


def test_prompts_are_padded_to_a_common_chunk_count_with_the_empty_chunk() -> None:
    encoder = FakeEncoder()
    out = encode_prompts(encoder, [words(100, 80), "w7", ""])
    assert out.shape == (3, 154, FakeEncoder.dim)
    (empty,) = chunk_prompt(encoder, "")
    empty_states = encoder(torch.tensor([empty.tokens]))[0]
    assert torch.equal(out[1, 77:], empty_states) and torch.equal(out[2, :77], empty_states)
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompts(encoder, [])


class OpenCLIPTokens:
    """open_clip's real BPE tokenizer with SD 2.x's special ids and zero padding."""

    bos_id, eos_id, pad_id, max_length = 49406, 49407, 0, 77

    def __init__(self) -> None:
        self.tokenizer = SimpleTokenizer()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)


def test_the_example_prompt_with_open_clips_tokenizer() -> None:
    encoder = OpenCLIPTokens()
    (chunk,) = chunk_prompt(encoder, EXAMPLE)
    pieces = parse_emphasis(EXAMPLE)
    ids = [encoder.tokenize(piece) for piece, _ in pieces]
    n = sum(map(len, ids))
    assert chunk.tokens == (49406, *[t for piece in ids for t in piece], 49407, *[0] * (75 - n))
    photo = encoder.tokenize("cinematic photo")
    start = 1 + len(ids[0])
    assert chunk.tokens[start : start + len(photo)] == tuple(photo)
    assert chunk.weights[start : start + len(photo)] == pytest.approx([1.43] * len(photo))
    assert chunk.weights[-(76 - n) - len(encoder.tokenize("low light")) : -(76 - n)] == pytest.approx([1.54, 1.54])
    # the same text without emphasis tokenizes to open_clip's own tokenization of the plain text
    plain = EXAMPLE.replace("((", "").replace(":1.3))", "").replace(":1.4))", "")
    assert [t for t in chunk.tokens if t not in (49406, 49407, 0)] == encoder.tokenize(plain)


def test_a_long_real_prompt_breaks_after_a_comma() -> None:
    encoder = OpenCLIPTokens()
    text = ", ".join(["a red fox in the snow"] * 14)  # 6 words + comma = 7 tokens per phrase
    chunks = chunk_prompt(encoder, text)
    first = [t for t in chunks[0].tokens[1:] if t not in (49407, 0)]
    assert first[-1] == encoder.tokenize(",")[0] and len(first) == 70  # 10 whole phrases
    rest = [t for c in chunks[1:] for t in c.tokens if t not in (49406, 49407, 0)]
    assert first + rest == encoder.tokenize(text)


@pytest.mark.parametrize(("text", "clean", "tags"), [
    ("a cat <lora:add_detail:0.6> in snow", "a cat  in snow", [("add_detail", 0.6)]),
    ("<lora:my-style_v2>cat<LORA:x:-1.5>", "cat", [("my-style_v2", 1.0), ("x", -1.5)]),
    ("(cat:1.2)<lora:a:.5>, dog", "(cat:1.2), dog", [("a", 0.5)]),
    ("no tags <here>", "no tags <here>", []),
])
def test_lora_tags_are_removed_leaving_nothing(text: str, clean: str, tags: list) -> None:
    assert split_lora_tags(text) == (clean, tags)


def test_lora_sets_add_repeats_and_drop_zero_weights() -> None:
    assert lora_set("<lora:b:0.5> x <lora:a> <lora:b:0.25> <lora:c:0>") == (("a", 1.0), ("b", 0.75))
    assert lora_set("plain") == () == lora_set("<lora:x:0>")


@pytest.mark.parametrize(("text", "message"), [
    ("<lora:a:b>", "the weight must be a number"),
    ("<lora::1>", "a LoRA name is"),
    ("<lora:a:nan>", "between -100 and 100"),
])
def test_malformed_lora_tags_are_refused(text: str, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        split_lora_tags(text)


def test_lora_names_are_checked_with_the_closest_offered() -> None:
    with pytest.raises(PromptError, match="did you mean add_detail"):
        check_lora_tags("<lora:add_detal>", "", ["add_detail", "pixel"])
    with pytest.raises(PromptError, match="no LoRAs are installed"):
        check_lora_tags("<lora:x>", "", [])
    with pytest.raises(PromptError, match="not the negative prompt"):
        check_lora_tags("a", "<lora:pixel:1>", ["pixel"])
    check_lora_tags("<lora:pixel:0.3> a", "ugly", ["pixel"])
