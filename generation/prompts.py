"""Prompts as users write them for the popular web UIs: emphasis syntax, 75-token chunks, BREAK.

`(word)` x1.1, `((word))` x1.21, `[word]` / 1.1, `(word:1.3)` x1.3, `\\(` `\\)` `\\[` `\\]` literal,
unclosed brackets close at the end, `BREAK` (a word of its own, in capitals) starts a new chunk.
Each chunk is BOS + up to 75 tokens + EOS, padded to 77 with the encoder's pad id: the originals'
own layout (SD 1.x pads with EOS, SD 2.x's open_clip with 0; the web UIs put SD 2.x's EOS after
the zeros instead). Weights scale the chunk's hidden states, then the chunk is rescaled to its
unweighted mean, as the web UIs do (they take that mean over the whole batch; we take it per
chunk so that a prompt's encoding does not depend on its batch-mates).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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

    def __call__(self, tokens: Tensor) -> Tensor:
        """(N, max_length) token ids -> (N, max_length, D) hidden states."""
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


def chunk_prompt(encoder: TextEncoder, text: str) -> list[Chunk]:
    """Split a prompt into chunks of up to max_length - 2 weighted tokens; an empty prompt gives
    one chunk of BOS, EOS and padding."""
    size = encoder.max_length - 2
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
        for token in encoder.tokenize(piece):
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


def encode_prompts(encoder: TextEncoder, texts: list[str], device: str = "cpu") -> Tensor:
    """Encode prompts (positive and negative together) in one encoder call -> (N, 77 * k, D),
    every prompt padded to the longest one's k chunks with the empty prompt's chunk."""
    import torch  # here only: parsing and chunking stay importable without torch (bot, queue)

    if not texts:
        raise ValueError("need at least one prompt to encode")
    chunked = [chunk_prompt(encoder, text) for text in texts]
    k = max(len(chunks) for chunks in chunked)
    empty = chunk_prompt(encoder, "")
    flat = [chunk for chunks in chunked for chunk in chunks + empty * (k - len(chunks))]
    tokens = torch.tensor([chunk.tokens for chunk in flat], dtype=torch.long, device=device)  # (N * k, 77)
    weights = torch.tensor([chunk.weights for chunk in flat], dtype=torch.float32, device=device)

    z = encoder(tokens)  # (N * k, 77, D)
    z32 = z.float()
    weighted = z32 * weights[..., None]
    restored = weighted * (z32.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True))
    return restored.to(z.dtype).reshape(len(texts), k * encoder.max_length, z.shape[-1])
