"""Prompts as users write them for the popular web UIs: emphasis syntax, 75-token chunks, BREAK.

`(word)` x1.1, `((word))` x1.21, `[word]` / 1.1, `(word:1.3)` x1.3, `\\(` `\\)` `\\[` `\\]` literal,
unclosed brackets close at the end, `BREAK` (a word of its own, in capitals) starts a new chunk.
Each chunk is BOS + up to 75 tokens + EOS, padded to 77 with the encoder's pad id: the originals'
own layout (SD 1.x pads with EOS, SD 2.x's open_clip with 0; the web UIs put SD 2.x's EOS after
the zeros instead). Weights scale the chunk's hidden states, then the chunk is rescaled to its
unweighted mean, as the web UIs do (they take that mean over the whole batch; we take it per
chunk so that a prompt's encoding does not depend on its batch-mates).

Add-ons, as A1111 writes them: `<lora:NAME:WEIGHT>` tags (`split_lora_tags`) are removed from the
text, leaving nothing in their place; a textual-inversion embedding's name, as a whole word,
becomes its N vectors as N token positions (kept together in one chunk, as the web UIs do).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from difflib import get_close_matches
from typing import TYPE_CHECKING, Protocol

from generation.request import LORA_TAG as _LORA_TAG

if TYPE_CHECKING:
    from torch import Tensor

_ROUND = 1.1
#: The piece `parse_emphasis` emits for BREAK.
BREAK = ("BREAK", -1.0)
#: A chunk that fills up moves its words after its last comma to the next chunk, if that comma is
#: at most this many tokens back (the web UIs' default `comma_padding_backtrack`).
COMMA_BACKTRACK = 20

_SYNTAX = re.compile(
    r"""
      (?P<escaped>\\.?)                                      # \( \) \[ \] \\ : the character itself
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)          # ":1.3)" closes a round bracket
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.X | re.S,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_LORA_NAME = re.compile(r"^[\w.\- ]{1,100}$")
#: A LoRA set: (name, weight) pairs sorted by name, one per name, no zero weights.
LoraSet = tuple[tuple[str, float], ...]


class PromptError(ValueError):
    """A prompt uses the add-on syntax wrongly; the message says what is allowed."""


def split_lora_tags(text: str) -> tuple[str, list[tuple[str, float]]]:
    """(the text without its `<lora:NAME:WEIGHT>` tags, the (name, weight) of each tag in order).
    `<lora:NAME>` is weight 1; WEIGHT is any float, negative too."""
    tags = []
    for m in _LORA_TAG.finditer(text):
        name, _, weight = m.group(1).partition(":")
        name = name.strip()
        if not _LORA_NAME.match(name):
            raise PromptError(f"{m.group(0)}: a LoRA name is letters, digits, '-', '_', '.' and spaces; "
                              "write <lora:NAME> or <lora:NAME:WEIGHT>")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise PromptError(f"{m.group(0)}: the weight must be a number, as in <lora:{name}:0.8>") from None
        if value != value or abs(value) > 100:  # nan, or nonsense
            raise PromptError(f"{m.group(0)}: the weight must be a number between -100 and 100")
        tags.append((name, value))
    return _LORA_TAG.sub("", text), tags


def lora_set(prompt: str) -> LoraSet:
    """The LoRA set a prompt asks for: weights of a repeated name add (deltas are linear); names
    at weight 0 are dropped, so `<lora:x:0>` is exactly no LoRA."""
    weights: dict[str, float] = {}
    for name, weight in split_lora_tags(prompt)[1]:
        weights[name] = weights.get(name, 0.0) + weight
    return tuple(sorted((n, w) for n, w in weights.items() if w != 0.0))


def check_lora_tags(prompt: str, negative_prompt: str, available: Sequence[str]) -> None:
    """Refuse (PromptError) LoRA tags in the negative prompt and names not in `available`, naming
    the closest available ones."""
    if _LORA_TAG.search(negative_prompt):
        raise PromptError("<lora:...> tags go in the prompt, not the negative prompt: a LoRA changes the "
                          "model, so it affects both")
    for name, _ in split_lora_tags(prompt)[1]:
        if name not in available:
            close = get_close_matches(name, list(available), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else (
                f"; available: {', '.join(sorted(available)[:10])}" if available else "; no LoRAs are installed")
            raise PromptError(f"unknown LoRA {name!r}{hint}")


def embedding_words(texts: Sequence[str], names: Sequence[str]) -> list[str]:
    """The embedding names (of `names`) used as whole words in any of `texts`, case-insensitively."""
    pattern = words_pattern(names)
    if pattern is None:
        return []
    used = {m.group(0).lower() for text in texts for m in pattern.finditer(text)}
    return [name for name in names if name.lower() in used]


def words_pattern(names: Sequence[str]) -> re.Pattern | None:
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w])(?:{alternatives})(?![\w])", re.I)


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Text runs with their weights, adjacent equal weights merged; BREAK as the `BREAK` piece."""
    pieces: list[list] = []  # [text, weight]; breaks are [BREAK[0], None] until the end
    open_round: list[int] = []  # index into pieces where each open bracket starts
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for m in _SYNTAX.finditer(text):
        if m.group("escaped") is not None:
            pieces.append([m.group("escaped")[1:], 1.0])
        elif m.group("open") == "(":
            open_round.append(len(pieces))
        elif m.group("open") == "[":
            open_square.append(len(pieces))
        elif m.group("weight") is not None and open_round:
            scale(open_round.pop(), float(m.group("weight")))
        elif m.group("close") == ")" and open_round:
            scale(open_round.pop(), _ROUND)
        elif m.group("close") == "]" and open_square:
            scale(open_square.pop(), 1 / _ROUND)
        else:  # plain text, or a bracket with nothing to close
            for i, part in enumerate(_BREAK.split(m.group(0))):
                if i > 0:
                    pieces.append([BREAK[0], None])
                pieces.append([part, 1.0])
    for start in open_round:
        scale(start, _ROUND)
    for start in open_square:
        scale(start, 1 / _ROUND)

    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces:
        if weight is None:
            merged.append(BREAK)
        elif merged and merged[-1] != BREAK and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        elif piece_text:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


class TextEncoder(Protocol):
    """What `models/` provides: a tokenizer without BOS/EOS, the special ids, and the network."""

    bos_id: int
    eos_id: int
    pad_id: int
    max_length: int

    def tokenize(self, text: str) -> list[int]: ...

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """(N, max_length) ids -> (N, max_length, D) token embeddings, before positions."""
        ...

    def __call__(self, tokens: Tensor, token_embeds: Tensor | None = None) -> Tensor:
        """(N, max_length) token ids -> (N, max_length, D) hidden states; `token_embeds` replaces
        the token embeddings (textual inversion)."""
        ...


class PooledTextEncoder(TextEncoder, Protocol):
    """A tower with a pooled output too (SDXL's bigG)."""

    def forward_pooled(self, tokens: Tensor, token_embeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(N, max_length) ids -> ((N, max_length, D) hidden states, (N, P) pooled) from one run."""
        ...


@dataclass(frozen=True)
class Chunk:
    """One encoder input: token ids and per-token weights, both max_length long."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]


def _wrap(encoder: TextEncoder, tokens: list[int], weights: list[float]) -> Chunk:
    padding = encoder.max_length - 2 - len(tokens)
    return Chunk(
        (encoder.bos_id, *tokens, encoder.eos_id, *[encoder.pad_id] * padding),
        (1.0, *weights, 1.0, *[1.0] * padding),
    )


def _token_groups(encoder: TextEncoder, text: str, rows: Mapping[str, tuple[int, int]]) -> list[list[int]]:
    """The text's tokens one per group, except each embedding word: one group of its N placeholder
    ids -(1 + row) (rows: lower-case name -> (first row in the vector table, N))."""
    pattern = words_pattern(list(rows))
    groups: list[list[int]] = []
    position = 0
    for m in pattern.finditer(text) if pattern else ():
        groups += [[t] for t in encoder.tokenize(text[position : m.start()])]
        first, n = rows[m.group(0).lower()]
        groups.append([-(1 + first + r) for r in range(n)])
        position = m.end()
    return groups + [[t] for t in encoder.tokenize(text[position:])]


def chunk_prompt(encoder: TextEncoder, text: str, embeddings: Mapping[str, int] | None = None) -> list[Chunk]:
    """Split a prompt into chunks of up to max_length - 2 weighted tokens; an empty prompt gives
    one chunk of BOS, EOS and padding. `embeddings`: name -> vector count, in the order of their
    rows in the vector table; their words become placeholder ids -(1 + row), kept in one chunk."""
    size = encoder.max_length - 2
    rows, first = {}, 0
    for name, count in (embeddings or {}).items():
        rows[name.lower()] = (first, count)
        first += count
    comma = encoder.tokenize(",")
    comma_id = comma[0] if len(comma) == 1 else None
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append(_wrap(encoder, tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for piece, weight in parse_emphasis(text):
        if (piece, weight) == BREAK:
            close()
            continue
        for group in _token_groups(encoder, piece, rows):
            if group[0] < 0:  # an embedding: its vectors stay together, as the web UIs keep them
                if len(tokens) + len(group) > size:
                    close()
                tokens += group
                weights += [weight] * len(group)
                continue
            (token,) = group
            if len(tokens) == size:
                backtrack = token != comma_id and last_comma >= 0 and size - last_comma <= COMMA_BACKTRACK
                cut = last_comma + 1 if backtrack else size
                carried = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = list(carried[0]), list(carried[1])
            tokens.append(token)
            weights.append(weight)
            if token == comma_id:
                last_comma = len(tokens) - 1
    if tokens or not chunks:
        close()
    return chunks


def encoder_inputs(
    encoder: TextEncoder, chunks: Sequence[Chunk], embeddings: Mapping[str, Tensor], device: str = "cpu"
) -> tuple[Tensor, Tensor | None]:
    """(token ids (N, 77), token embeddings (N, 77, D) or None) of chunks for the encoder: where
    a chunk holds an embedding's placeholder -(1 + r), row r of the embeddings' vectors (in
    their order) replaces that token's embedding and its id reads 0 (below every real id, so
    the highest id is still EOS)."""
    import torch

    from generation.transfer import upload

    tokens = upload([chunk.tokens for chunk in chunks], device, torch.long)  # (N, 77)
    if not any(t < 0 for chunk in chunks for t in chunk.tokens):  # decided on the host: no device sync
        return tokens, None
    ids = tokens.clamp(min=0)
    token_embeds = encoder.embed_tokens(ids)  # (N, 77, D)
    table = upload(torch.cat(list(embeddings.values())), device, token_embeds.dtype)  # (sum N_i, D)
    rows = table[(-tokens - 1).clamp(min=0)]  # (N, 77, D): placeholder -(1 + r) -> row r
    return ids, torch.where((tokens < 0)[..., None], rows, token_embeds)


def encode_prompts(
    encoder: TextEncoder, texts: list[str], device: str = "cpu", embeddings: Mapping[str, Tensor] | None = None
) -> Tensor:
    """Encode prompts (positive and negative together) in one encoder call -> (N, 77 * k, D),
    every prompt padded to the longest one's k chunks with the empty prompt's chunk.
    embeddings: textual-inversion vectors (N_i, D) by name, for the words that use them."""
    flat, ids, token_embeds = _prompt_inputs(encoder, texts, device, embeddings)
    z = encoder(ids) if token_embeds is None else encoder(ids, token_embeds)  # (N * k, 77, D)
    return _weighted(z, flat, len(texts))


def encode_prompts_pooled(
    encoder: PooledTextEncoder, texts: list[str], device: str = "cpu", embeddings: Mapping[str, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """`encode_prompts`, and from the same encoder call the pooled embedding (N, P) of each
    text's first chunk (SDXL's bigG tower: one run gives both, as in sgm)."""
    flat, ids, token_embeds = _prompt_inputs(encoder, texts, device, embeddings)
    z, pooled = encoder.forward_pooled(ids, token_embeds)  # (N * k, 77, D), (N * k, P)
    k = len(flat) // len(texts)
    return _weighted(z, flat, len(texts)), pooled[::k]


def _prompt_inputs(
    encoder: TextEncoder, texts: list[str], device: str, embeddings: Mapping[str, Tensor] | None
) -> tuple[list[Chunk], Tensor, Tensor | None]:
    """(the N * k chunks, text by text, each padded to the longest one's k chunks with the empty
    prompt's chunk, and their `encoder_inputs`)."""
    if not texts:
        raise ValueError("need at least one prompt to encode")
    embeddings = embeddings or {}
    counts = {name: len(vectors) for name, vectors in embeddings.items()}
    chunked = [chunk_prompt(encoder, text, counts) for text in texts]
    k = max(len(chunks) for chunks in chunked)
    empty = chunk_prompt(encoder, "")
    flat = [chunk for chunks in chunked for chunk in chunks + empty * (k - len(chunks))]
    return flat, *encoder_inputs(encoder, flat, embeddings, device)


def _weighted(z: Tensor, chunks: list[Chunk], n: int) -> Tensor:
    """The chunks' states z (N * k, 77, D) scaled by their weights, each chunk rescaled to its
    unweighted mean, as (N, 77 * k, D)."""
    import torch  # here only: parsing and chunking stay importable without torch (bot, queue)

    from generation.transfer import upload

    weights = upload([chunk.weights for chunk in chunks], z.device, torch.float32)
    z32 = z.float()
    weighted = z32 * weights[..., None]
    restored = weighted * (z32.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True))
    return restored.to(z.dtype).reshape(n, -1, z.shape[-1])  # (N, 77 * k, D)
