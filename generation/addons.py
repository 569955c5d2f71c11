"""The LoRA and textual-inversion folders (`[generation] lora_dir`, `embedding_dir`): what is in
them, with per-file info for listings and autocomplete, and what a batch's prompts ask of them.

Folders are re-read when they change (file names, sizes, modification times), so files added or
replaced while the bot runs are seen at the next request. Tensors are read when a prompt uses a
file (LoRA tensors are kept for a few files); hashes are computed when first asked for, once per
file version, as the web UIs compute them:
- `Lora hashes`: the kohya metadata's `sshs_model_hash`, else sha256 of the file after its
  safetensors header (the "addnet" hash A1111 uses for .safetensors LoRAs), first 12 hex digits;
- `TI hashes`: sha256 of the whole embedding file, first 12 hex digits.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from generation.images import ImageInputError
from generation.prompts import LoraSet, PromptError, check_lora_tags, embedding_words, lora_set
from models.embeddings import EXTENSIONS as EMBEDDING_EXTENSIONS
from models.embeddings import embedding_family, embedding_vectors, tower_vectors
from models.lora import (
    AddonFileError,
    Lora,
    LoraNames,
    lora_family,
    lora_for,
    metadata_family,
    read_header,
    read_safetensors,
)
from models.stable_diffusion import StableDiffusion

#: LoRA files whose tensors stay in memory between batches (most recently used).
CACHED_LORAS = 8
#: Trigger words listed per LoRA, most frequent first.
MAX_TRIGGERS = 10
#: The LCM hints: sampler, steps (LCM works at 2 to 8) and guidance (1 to 2).
LCM_SAMPLER, LCM_STEPS, LCM_GUIDANCE = "lcm", 4, 1.5


class AddonError(ImageInputError):
    """A prompt asks for a LoRA or embedding that cannot be used; the message, for the user, says
    why and what is allowed (an ImageInputError, so the runner shows it as it shows bad inputs)."""


#: (size, modification time in ns): a file version.
Stamp = tuple[int, int]


@dataclass(frozen=True)
class AddonInfo:
    """One file of the LoRA or embedding folder, as listings show it."""

    name: str  # the file stem: what prompts use
    kind: Literal["lora", "embedding"]
    path: Path
    stamp: Stamp
    #: The family it fits ("SD 1.x", "SD 2.x", "SDXL"), None when the file does not tell.
    family: str | None
    #: Trigger words from kohya metadata (`modelspec.trigger_phrase`, else `ss_tag_frequency`).
    triggers: tuple[str, ...] = ()
    #: Whether it is a latent-consistency (LCM) LoRA, by its file name or metadata.
    lcm: bool = False
    #: Embeddings: how many token positions the word takes.
    vectors: int | None = None
    #: Why the file cannot be used, when it cannot (it is listed anyway, so operators see why).
    error: str | None = None


def is_lcm(*texts: str) -> bool:
    """Whether a model or LoRA says it is LCM: "lcm" in its name or metadata text."""
    return any("lcm" in text.lower() for text in texts)


def _stamp(path: Path) -> Stamp:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _triggers(metadata: Mapping[str, str]) -> tuple[str, ...]:
    phrase = metadata.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        return tuple(p.strip() for p in phrase.split(",") if p.strip())[:MAX_TRIGGERS]
    try:
        frequencies = json.loads(metadata.get("ss_tag_frequency", "{}"))
        counts: dict[str, int] = {}
        for tags in frequencies.values():
            for tag, count in tags.items():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + int(count)
    except (ValueError, AttributeError, TypeError):
        return ()
    return tuple(sorted((t for t in counts if t), key=lambda t: -counts[t])[:MAX_TRIGGERS])


def lora_info(path: Path) -> AddonInfo:
    """What a LoRA file is, from its header alone (no tensor is read)."""
    stamp = _stamp(path)
    try:
        shapes, metadata = read_header(path, "LoRA")
    except AddonFileError as exc:
        return AddonInfo(path.stem, "lora", path, stamp, None, error=str(exc))
    family = lora_family(shapes) or metadata_family(metadata)
    texts = (path.stem, metadata.get("ss_output_name", ""), metadata.get("modelspec.title", ""),
             metadata.get("modelspec.architecture", ""))
    return AddonInfo(path.stem, "lora", path, stamp, family, _triggers(metadata), is_lcm(*texts))


def embedding_info(path: Path) -> AddonInfo:
    """What an embedding file is (its vectors are small: they are read)."""
    stamp = _stamp(path)
    try:
        vectors = embedding_vectors(path)
    except AddonFileError as exc:
        return AddonInfo(path.stem, "embedding", path, stamp, None, error=str(exc))
    return AddonInfo(path.stem, "embedding", path, stamp, embedding_family(vectors), (path.stem,),
                     vectors=len(next(iter(vectors.values()))))


def addnet_hash(path: Path) -> str:
    """sha256 of a .safetensors file after its header (8-byte length + JSON), hex."""
    with path.open("rb") as file:
        header = int.from_bytes(file.read(8), "little")
    return file_hash(path, start=8 + header)


def file_hash(path: Path, start: int = 0) -> str:
    """sha256 of a file from byte `start` on, hex (read in blocks: files may be GBs)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        file.seek(start)
        while block := file.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


class AddonLibrary:
    """The two folders, thread-safe: the bot lists and checks, the runner threads load."""

    def __init__(self, lora_dir: Path | None, embedding_dir: Path | None) -> None:
        self.lora_dir, self.embedding_dir = lora_dir, embedding_dir
        self._lock = threading.Lock()
        self._infos: dict[tuple[Path, Stamp], AddonInfo] = {}
        self._hashes: dict[tuple[Path, Stamp], str] = {}
        self._tensors: OrderedDict[tuple[Path, Stamp], tuple[dict[str, torch.Tensor], dict[str, str]]] = OrderedDict()
        self._vectors: dict[tuple[Path, Stamp], dict[str, torch.Tensor]] = {}

    # --- listings ---

    def _scan(self, folder: Path | None, extensions: tuple[str, ...], read: object) -> dict[str, AddonInfo]:
        if folder is None or not folder.is_dir():
            return {}
        found: dict[str, AddonInfo] = {}
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in extensions or not path.is_file() or path.stem in found:
                continue
            try:
                key = (path, _stamp(path))
            except OSError:  # removed meanwhile
                continue
            with self._lock:
                info = self._infos.get(key)
            if info is None:
                info = read(path)  # type: ignore[operator]
                with self._lock:
                    self._infos[key] = info
            found[path.stem] = info
        return found

    def loras(self) -> dict[str, AddonInfo]:
        """The LoRA folder's `.safetensors` files by name (file stem), re-read if it changed."""
        return self._scan(self.lora_dir, (".safetensors",), lora_info)

    def embeddings(self) -> dict[str, AddonInfo]:
        """The embedding folder's `.safetensors` / `.pt` / `.bin` files by name."""
        return self._scan(self.embedding_dir, EMBEDDING_EXTENSIONS, embedding_info)

    def short_hash(self, info: AddonInfo) -> str:
        """The 12 hex digits the web UIs write in `Lora hashes` / `TI hashes` (cached per version)."""
        key = (info.path, info.stamp)
        with self._lock:
            known = self._hashes.get(key)
        if known is None:
            if info.kind == "lora":
                metadata = {} if info.error else read_header(info.path, "LoRA")[1]
                known = metadata.get("sshs_model_hash") or addnet_hash(info.path)
            else:
                known = file_hash(info.path)
            with self._lock:
                self._hashes[key] = known
        return known[:12]

    # --- what prompts ask ---

    def check_prompt(self, prompt: str, negative_prompt: str, loras: Mapping[str, AddonInfo] | None = None) -> None:
        """Refuse (AddonError) LoRA tags in the negative prompt and LoRA names not in the folder,
        offering the closest names. `loras`: the folder as already read for this batch (the
        methods taking it read the folder themselves without it)."""
        try:
            check_lora_tags(prompt, negative_prompt, list(self.loras() if loras is None else loras))
        except PromptError as exc:
            raise AddonError(str(exc)) from None

    def lora_key(self, wanted: LoraSet, loras: Mapping[str, AddonInfo] | None = None) -> tuple:
        """What identifies a LoRA set's merged weights: names, weights and the files' versions."""
        loras = self.loras() if loras is None else loras
        missing = [name for name, _ in wanted if name not in loras]
        if missing:
            self.check_prompt(" ".join(f"<lora:{n}>" for n in missing), "")
        return tuple((name, weight, loras[name].stamp) for name, weight in wanted)

    def loras_for(self, network: StableDiffusion, wanted: LoraSet,
                  loras: Mapping[str, AddonInfo] | None = None) -> list[tuple[Lora, float]]:
        """The LoRAs of a set mapped onto `network`, each with its weight; AddonError when one
        cannot be used with it."""
        loras = self.loras() if loras is None else loras
        names = LoraNames.of(network) if wanted else None  # the model's LoRA names, walked once
        result = []
        for name, weight in wanted:
            info = loras.get(name)
            if info is None:
                self.check_prompt(f"<lora:{name}>", "")
            key = (info.path, info.stamp)
            try:
                with self._lock:
                    cached = self._tensors.get(key)
                    if cached is not None:
                        self._tensors.move_to_end(key)
                if cached is None:
                    cached = read_safetensors(info.path, "LoRA")
                    with self._lock:
                        self._tensors[key] = cached
                        while len(self._tensors) > CACHED_LORAS:
                            self._tensors.popitem(last=False)
                result.append((lora_for(network, name, *cached, names=names), weight))
            except AddonFileError as exc:
                raise AddonError(str(exc)) from None
        return result

    def vectors_for(self, network: StableDiffusion, texts: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """For each text tower of `network` (`text_encoders` order), the embeddings whose names
        the texts use as words: name -> that tower's (N, width) vectors; an AddonError when one
        does not fit the model's text towers."""
        embeddings = self.embeddings()
        result: list[dict[str, torch.Tensor]] = [{} for _ in network.text_encoders]
        for name in embedding_words(texts, list(embeddings)):
            info = embeddings[name]
            key = (info.path, info.stamp)
            try:
                with self._lock:
                    vectors = self._vectors.get(key)
                if vectors is None:
                    vectors = embedding_vectors(info.path)
                    with self._lock:
                        self._vectors[key] = vectors
                rows = tower_vectors(name, vectors, network)
            except AddonFileError as exc:
                raise AddonError(str(exc)) from None
            for tower, tower_rows in zip(result, rows, strict=True):
                tower[name] = tower_rows
        return result

    def infotexts(self, prompts: Sequence[tuple[str, str]]) -> list[list[tuple[str, str]]]:
        """For each (prompt, negative prompt), the web UIs' `Lora hashes` and `TI hashes` fields,
        quoted as they write them (both folders read once for all)."""
        loras, embeddings = self.loras(), self.embeddings()
        infotexts = []
        for prompt, negative_prompt in prompts:
            fields = []
            used = [(name, loras[name]) for name, _ in lora_set(prompt) if name in loras]
            if used:
                fields.append(("Lora hashes", json.dumps(", ".join(f"{n}: {self.short_hash(i)}" for n, i in used))))
            words = embedding_words([prompt, negative_prompt], list(embeddings))
            if words:
                hashes = ", ".join(f"{n}: {self.short_hash(embeddings[n])}" for n in words)
                fields.append(("TI hashes", json.dumps(hashes)))
            infotexts.append(fields)
        return infotexts

    def lcm_hint(self, prompt: str, model_name: str = "") -> bool:
        """Whether the model (by name) or a LoRA the prompt uses says it is LCM."""
        loras = self.loras()
        return is_lcm(model_name) or any(loras[n].lcm for n, _ in lora_set(prompt) if n in loras)


def sampling_defaults(
    lcm: bool,
    defaults: tuple[str, int, float],
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
) -> tuple[str, int, float]:
    """(sampler, steps, guidance) of a request: what the member chose, else the LCM hints when the
    model or a LoRA is LCM (`AddonLibrary.lcm_hint`), else the configured `defaults`."""
    base = (LCM_SAMPLER, LCM_STEPS, LCM_GUIDANCE) if lcm else defaults
    return (
        base[0] if sampler is None else sampler,
        base[1] if steps is None else steps,  # 0 is the member's (refused as out of range), not a default
        base[2] if guidance is None else guidance,
    )
