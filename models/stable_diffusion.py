"""The three networks of a Stable Diffusion checkpoint under their original key prefixes:
`model.diffusion_model.*`, `first_stage_model.*`, and `cond_stage_model.*` (SD 1.x/2.x) or
`conditioner.embedders.N.*` (SDXL)."""

from __future__ import annotations

from torch import nn

from models.conditioner import Conditioner
from models.families import Family
from models.text_encoders import TextEncoder, build_text_encoder
from models.unet import UNetModel
from models.vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    """The original `model` wrapper: only there to give the UNet its `model.diffusion_model.` keys."""

    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        self.diffusion_model = unet


class StableDiffusion(nn.Module):
    """UNet + VAE + text encoder of one `Family`; `load_state_dict(strict=True)` takes the original
    checkpoint's tensors under the three prefixes above."""

    def __init__(self, family: Family) -> None:
        super().__init__()
        self.family = family
        self.model = DiffusionWrapper(UNetModel(family.unet))
        self.first_stage_model = AutoencoderKL(family.vae)
        if family.conditioner is None:
            self.cond_stage_model: TextEncoder = build_text_encoder(family.text)
        else:
            self.conditioner = Conditioner(family.conditioner)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> TextEncoder:
        """The one text tower of SD 1.x/2.x; SDXL has several (`text_encoders`)."""
        if self.family.conditioner is not None:
            raise AttributeError(f"{self.family.name} has {len(self.text_encoders)} text towers: use text_encoders")
        return self.cond_stage_model

    @property
    def text_encoders(self) -> list[TextEncoder]:
        """Every text tower, in the order their hidden states concatenate."""
        if self.family.conditioner is None:
            return [self.cond_stage_model]
        return self.conditioner.texts

    @property
    def vae_scale(self) -> int:
        """Pixels per latent along one side: 8 for real checkpoints, 2 for the tiny test ones."""
        return self.family.vae.downscale

    @property
    def latent_channels(self) -> int:
        """Channels of the noise the sampler starts from (4; the UNet may take 9 for inpainting)."""
        return self.family.vae.embed_dim
