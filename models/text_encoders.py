"""The conditioning text towers of SD 1.x (OpenAI CLIP ViT-L/14 through transformers) and SD 2.x
(OpenCLIP ViT-H/14 through open_clip building blocks, penultimate layer), with the original key
names under `cond_stage_model.` and one small interface for the prompt code.

Both tokenize with the BPE vocabulary that open_clip ships: no hub access, ever."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import Transformer
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from models.families import TextEncoderConfig

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>


class TextEncoder(nn.Module):
    """Shared interface: `tokenize`, the special ids, `max_length`, `embed_tokens(tokens)` and
    `forward(tokens, token_embeds=None) -> states`; `token_embeds` (B, T, D) replaces the token
    embeddings (before the positional ones are added): how textual-inversion vectors get in."""

    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id: int

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.max_length = config.max_length
        self._tokenizer = SimpleTokenizer(context_length=config.max_length)

    def tokenize(self, text: str) -> list[int]:
        """BPE ids of `text`, lower-cased and cleaned as CLIP does; no BOS/EOS, no truncation."""
        return self._tokenizer.encode(text)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) token embeddings, before positions."""
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class _TextModelHolder(nn.Module):
    """Gives transformers' flattened CLIPTextModel (>= 5.6) the original `text_model.` key prefix."""

    def __init__(self, text_model: CLIPTextModel) -> None:
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids=input_ids, position_ids=position_ids).last_hidden_state

    def penultimate(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The output of the next-to-last layer, before the final layer norm."""
        out = self.text_model(input_ids=input_ids, position_ids=position_ids, output_hidden_states=True)
        return out.hidden_states[-2]


class CLIPTextEncoder(TextEncoder):
    """SD 1.x FrozenCLIPEmbedder: last hidden state of CLIP's text transformer; pads with EOS."""

    pad_id = EOS_ID

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__(config)
        clip_config = CLIPTextConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.width,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            intermediate_size=config.mlp_width,
            max_position_embeddings=config.max_length,
            hidden_act="quick_gelu",
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
        )
        text_model = CLIPTextModel(clip_config)
        # Position ids are a constant arange passed in `forward`; dropping the buffer leaves the
        # module holding checkpoint tensors only (so it can be built on the meta device).
        del text_model.embeddings.position_ids
        self.transformer = _TextModelHolder(text_model)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer.text_model.embeddings.token_embedding(tokens)

    def forward(self, tokens: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, T) ids -> (B, T, width) last hidden states (after the final layer norm), or
        with `layer: penultimate` (SDXL's `layer: hidden, layer_idx: 11`) the next-to-last ones,
        normed only with `final_norm`. token_embeds (B, T, width): replace the token embeddings
        (textual inversion)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]  # (1, T)
        with self._token_embeds(token_embeds):
            if self.config.layer == "last":
                return self.transformer(tokens, positions)
            hidden = self.transformer.penultimate(tokens, positions)
        return self.transformer.text_model.final_layer_norm(hidden) if self.config.final_norm else hidden

    @contextlib.contextmanager
    def _token_embeds(self, token_embeds: torch.Tensor | None) -> Iterator[None]:
        """transformers' text model takes no embeddings; its embedding layer does, so they are
        handed to that layer for this one call (the model's own code path, nothing rewritten)."""
        if token_embeds is None:
            yield
            return
        handle = self.transformer.text_model.embeddings.register_forward_pre_hook(
            lambda _module, args, kwargs: (args, {**kwargs, "inputs_embeds": token_embeds}), with_kwargs=True
        )
        try:
            yield
        finally:
            handle.remove()


class _OpenCLIPText(nn.Module):
    """The text half of open_clip's CLIP, with its attribute (= key) names."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.max_length, width))
        self.transformer = Transformer(
            width, config.layers, config.heads, mlp_ratio=config.mlp_width / width, act_layer=nn.GELU
        )
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, config.projection_dim or width))
        self.logit_scale = nn.Parameter(torch.full([], math.log(1 / 0.07)))


class OpenCLIPTextEncoder(TextEncoder):
    """SD 2.x FrozenOpenCLIPEmbedder: a resblock's output (penultimate by default) then ln_final;
    pads with 0 as open_clip's tokenizer does."""

    pad_id = 0

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__(config)
        self.model = _OpenCLIPText(config)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens)

    def forward(self, tokens: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, T) ids -> (B, T, width) hidden states (then ln_final with `final_norm`);
        token_embeds (B, T, width) replace the token embeddings (textual inversion)."""
        x = self._blocks(self._embed(tokens, token_embeds), self.model.transformer.resblocks[: self._layers])
        return self._output(x)

    def forward_pooled(
        self, tokens: torch.Tensor, token_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(`forward`'s hidden states (B, T, width), the pooled embedding (B, projection_dim)) from
        one run of the tower, as sgm's FrozenOpenCLIPEmbedder2 takes both: the hidden states at
        their layer (penultimate for SDXL), then on through the remaining resblocks to open_clip's
        text embedding: the last layer through ln_final at the EOS token (the highest id), times
        `text_projection` (SDXL's pooled conditioning)."""
        blocks = self.model.transformer.resblocks
        x = self._blocks(self._embed(tokens, token_embeds), blocks[: self._layers])
        states = self._output(x)
        last = self._blocks(x, blocks[self._layers :])
        eos = last[torch.arange(last.shape[0], device=last.device), tokens.argmax(dim=-1)]  # (B, D)
        return states, self.model.ln_final(eos) @ self.model.text_projection

    @property
    def _layers(self) -> int:
        """How many resblocks `forward` runs: all, or all but the last (`layer: penultimate`)."""
        blocks = len(self.model.transformer.resblocks)
        return blocks - 1 if self.config.layer == "penultimate" else blocks

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.ln_final(x) if self.config.final_norm else x

    def _embed(self, tokens: torch.Tensor, token_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token (or the given) embeddings plus positions, (B, T, width)."""
        embeds = self.model.token_embedding(tokens) if token_embeds is None else token_embeds
        return embeds + self.model.positional_embedding[: tokens.shape[1]]

    def _blocks(self, x: torch.Tensor, blocks: Iterable[nn.Module]) -> torch.Tensor:
        """x (B, T, width) through `blocks` under the causal mask."""
        t = x.shape[1]
        causal = torch.full((t, t), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        for block in blocks:
            x = block(x, attn_mask=causal)
        return x


def build_text_encoder(config: TextEncoderConfig) -> TextEncoder:
    return CLIPTextEncoder(config) if config.kind == "clip" else OpenCLIPTextEncoder(config)
