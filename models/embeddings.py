"""Textual-inversion embeddings as people download them: `.safetensors` with `emb_params` (N, width)
and the web UI's `.pt` (`{'string_to_param': {'*': tensor}}`), the latter read with
`torch.load(weights_only=True)` only, so a file that would run code is refused, never executed;
SDXL's `.safetensors` hold one set per text tower: `clip_l` (N, 768) and `clip_g` (N, 1280)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from models.lora import AddonFileError, family_label, model_family, read_safetensors, text_towers
from models.stable_diffusion import StableDiffusion

#: Vectors one embedding may hold: it must fit one 75-token chunk.
MAX_VECTORS = 75
EXTENSIONS = (".safetensors", ".pt", ".bin")
#: The key of SD 1.x/2.x files' one set of vectors in `embedding_vectors`' result.
ONE_SET = "*"
#: SDXL files' vector sets by the LoRA name of the tower that takes them (`models.lora.text_towers`).
SDXL_SETS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


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


def _checked(name: str, vectors: object) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor):
        raise EmbeddingError(f"embedding {name} holds a {type(vectors).__name__}, not vectors")
    vectors = vectors.detach().float()
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors.dim() != 2 or not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise EmbeddingError(f"embedding {name} has shape {tuple(vectors.shape)}; allowed: "
                             f"(N, width) with 1 <= N <= {MAX_VECTORS}")
    return vectors


def embedding_vectors(path: Path) -> dict[str, torch.Tensor]:
    """The (N, width) float32 vectors of an embedding file by the tower they are for: SD 1.x/2.x
    files' one set under `ONE_SET`, SDXL files' `clip_l` and `clip_g` (the same N); anything else
    is refused clearly."""
    if path.suffix == ".safetensors":
        tensors, _ = read_safetensors(path, "embedding")
    else:
        data = _from_pt(path)
        params = data.get("string_to_param")
        # the web UI's format, else diffusers' learned_embeds.bin ({token: (width,)})
        tensors = dict(params) if isinstance(params, dict) else {
            k: v for k, v in data.items() if isinstance(v, torch.Tensor)
        }
    sets = set(SDXL_SETS.values())
    if sets & tensors.keys():
        if not sets <= tensors.keys():
            raise EmbeddingError(f"embedding {path.name} has {', '.join(sorted(sets & tensors.keys()))} vectors "
                                 f"but SDXL embeddings need both {' and '.join(sorted(sets))}")
        result = {key: _checked(path.name, tensors[key]) for key in sorted(sets)}
        counts = {key: len(v) for key, v in result.items()}
        if len(set(counts.values())) > 1:
            raise EmbeddingError(f"embedding {path.name} has {counts} vectors; both towers need the same count")
        return result
    candidates = [t for k, t in tensors.items() if k in ("emb_params", "*")] or list(tensors.values())
    if len(candidates) != 1:
        raise EmbeddingError(f"embedding {path.name} holds no single 'emb_params', 'string_to_param' or "
                             f"clip_l/clip_g tensors (keys: {', '.join(sorted(tensors)) or 'none'})")
    return {ONE_SET: _checked(path.name, candidates[0])}


def embedding_family(vectors: dict[str, torch.Tensor]) -> str:
    """The family an embedding file's vectors are for: SDXL for clip_l/clip_g, else by width."""
    return family_label(vectors[ONE_SET].shape[1]) if ONE_SET in vectors else "SDXL"


def tower_vectors(name: str, vectors: dict[str, torch.Tensor], network: StableDiffusion) -> list[torch.Tensor]:
    """The rows each text tower of `network` takes, in tower order: SD 1.x/2.x's one tower the
    file's one set, SDXL's towers their clip_l / clip_g sets (the refiner's bigG its clip_g);
    an embedding for another family or width is refused, naming both."""
    model, towers = model_family(network), text_towers(network)
    sdxl = network.family.conditioner is not None
    if sdxl == (ONE_SET in vectors):
        raise EmbeddingError(f"embedding {name} is for {embedding_family(vectors)}"
                             f"{'' if sdxl else ' (clip_l/clip_g vectors)'}; the model is {model}")
    rows = []
    for tower_name, _, tower in towers:
        key = SDXL_SETS[tower_name] if sdxl else ONE_SET
        found, width = vectors[key].shape[1], tower.config.width
        if found != width and sdxl:
            raise EmbeddingError(f"embedding {name} has {found}-wide {key} vectors; the model is {model}, whose "
                                 f"{key} tower is {width}-wide")
        if found != width:
            raise EmbeddingError(f"embedding {name} is for {family_label(found)} ({found}-wide); the model is "
                                 f"{model} ({width}-wide)")
        rows.append(vectors[key])
    return rows
