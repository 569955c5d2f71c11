"""Textual-inversion embeddings as people download them: `.safetensors` with `emb_params` (N, width)
and the web UI's `.pt` (`{'string_to_param': {'*': tensor}}`), the latter read with
`torch.load(weights_only=True)` only, so a file that would run code is refused, never executed."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from models.lora import AddonFileError, family_label, read_safetensors

#: Vectors one embedding may hold: it must fit one 75-token chunk.
MAX_VECTORS = 75
EXTENSIONS = (".safetensors", ".pt", ".bin")


class EmbeddingError(AddonFileError):
    """An embedding file is unusable with this model; the message says why and what is allowed."""


def _from_pt(path: Path) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise EmbeddingError(f"embedding {path.name} needs code run to load it, which is refused ({exc})"
                             .split("\n")[0]) from None
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise EmbeddingError(f"embedding {path.name} is not a readable .pt file ({exc})") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"embedding {path.name} holds a {type(data).__name__}, not an embedding")
    return data


def embedding_vectors(path: Path) -> torch.Tensor:
    """The (N, width) float32 vectors of an embedding file, refusing anything else clearly
    (SDXL's two-tower clip_l/clip_g files included, naming the family)."""
    if path.suffix == ".safetensors":
        tensors, _ = read_safetensors(path, "embedding")
    else:
        data = _from_pt(path)
        params = data.get("string_to_param")
        # the web UI's format, else diffusers' learned_embeds.bin ({token: (width,)})
        tensors = dict(params) if isinstance(params, dict) else {
            k: v for k, v in data.items() if isinstance(v, torch.Tensor)
        }
    if {"clip_l", "clip_g"} & tensors.keys():
        raise EmbeddingError(f"embedding {path.name} is for SDXL (clip_l/clip_g vectors); "
                             "SD 1.x and 2.x take one set of vectors")
    candidates = [t for k, t in tensors.items() if k in ("emb_params", "*")] or list(tensors.values())
    if len(candidates) != 1 or not isinstance(candidates[0], torch.Tensor):
        raise EmbeddingError(f"embedding {path.name} holds no single 'emb_params' or 'string_to_param' tensor "
                             f"(keys: {', '.join(sorted(tensors)) or 'none'})")
    vectors = candidates[0].detach().float()
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors.dim() != 2 or not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise EmbeddingError(f"embedding {path.name} has shape {tuple(vectors.shape)}; allowed: "
                             f"(N, width) with 1 <= N <= {MAX_VECTORS}")
    return vectors


def check_width(name: str, vectors: torch.Tensor, width: int) -> None:
    """Refuse an embedding made for a text encoder of another width, naming both families."""
    if vectors.shape[1] != width:
        raise EmbeddingError(f"embedding {name} is for {family_label(vectors.shape[1])} ({vectors.shape[1]}-wide); "
                             f"the model is {family_label(width)} ({width}-wide)")
