"""SDXL's conditioner under its original keys (`conditioner.embedders.N.*`), as sgm's
GeneralConditioner runs at inference: text towers give the cross-attention context (their hidden
states concatenated along the feature axis) and the last tower's pooled embedding; size values get
Fourier features; pooled + features, in embedder order, are the UNet's ADM vector `y`."""

from __future__ import annotations

import torch
from torch import nn

from models.families import SIZE_KEY_VALUES, ConditionerConfig
from models.text_encoders import OpenCLIPTextEncoder, TextEncoder, build_text_encoder
from models.unet import timestep_embedding


class ConcatTimestepEmbedderND(nn.Module):
    """sgm's size embedder: each of the N values of a row gets a `outdim`-wide sinusoidal
    embedding ([cos, sin], as the UNet's timesteps), concatenated: (B, N) -> (B, N * outdim)."""

    def __init__(self, outdim: int) -> None:
        super().__init__()
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return timestep_embedding(x.flatten(), self.outdim).reshape(b, -1)


class Conditioner(nn.Module):
    """`embedders`: the text towers, then one ConcatTimestepEmbedderND per size key, in the order
    of the original YAML's `emb_models` (so the keys match)."""

    def __init__(self, config: ConditionerConfig) -> None:
        super().__init__()
        self.config = config
        self.embedders = nn.ModuleList(
            [build_text_encoder(text) for text in config.texts]
            + [ConcatTimestepEmbedderND(config.outdim) for _ in config.sizes]
        )

    @property
    def texts(self) -> list[TextEncoder]:
        """The text towers, in order (their outputs concatenate into the context)."""
        return list(self.embedders[: len(self.config.texts)])

    @property
    def pooled_tower(self) -> OpenCLIPTextEncoder:
        tower = self.embedders[len(self.config.texts) - 1]
        assert isinstance(tower, OpenCLIPTextEncoder)
        return tower

    def vector(self, pooled: torch.Tensor, sizes: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ADM vector (B, adm_in_channels): pooled (B, P), then for each size key of the
        config, in order, the Fourier features of sizes[key] (B, n values), all float32."""
        missing = [key for key in self.config.sizes if key not in sizes]
        if missing:
            raise ValueError(f"size conditioning {missing} missing; this model takes {list(self.config.sizes)}")
        parts = [pooled.float()]
        for key, embedder in zip(self.config.sizes, self.embedders[len(self.config.texts) :], strict=True):
            values = sizes[key].float()
            if values.shape != (pooled.shape[0], SIZE_KEY_VALUES[key]):
                raise ValueError(
                    f"{key}: need ({pooled.shape[0]}, {SIZE_KEY_VALUES[key]}) values, got {tuple(values.shape)}"
                )
            parts.append(embedder(values.to(pooled.device)))
        return torch.cat(parts, dim=1)
