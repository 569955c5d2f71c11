"""The runner's `Pipeline`: a batch of queue jobs in, one `JobResult` per job out, with images that
carry the web UIs' `parameters` text in `info` (written as the PNG's `parameters` chunk when stored),
so every stored or posted image says how it was made.

Everything here runs on a device thread, so it does device work only: PNGs are encoded where the
results are stored, while the device runs the next batch; latent previews are read back from the
device at most once per `preview_every_s`, not at every step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from generation.addons import AddonLibrary
from generation.compiled import Compiling
from generation.denoiser import latent_preview
from generation.metadata import parameters_text, refiner_infotext, step_cache_infotext
from generation.pipeline import (
    Inputs,
    LoadedModel,
    checkpoint_hash,
    load_model,
    prepare_batch,
    resolve_device,
    resolve_dtype,
    resolve_vae_dtype,
    run_batch,
)
from generation.queue import Job
from generation.refiner import check_pair
from generation.request import Kind
from generation.runner import JobResult, Progress
from generation.samplers import Cancelled
from generation.settings import GenerationSettings, ModelSettings


class Engine:
    """Loads the configured checkpoints and runs batches of jobs on them (see the runner's
    `Pipeline` protocol). `inputs(sha256)` returns a stored input image's bytes (img2img, inpaint,
    variations, upscales); `preview` adds a cheap latent-to-RGB image to each progress report, a
    fresh one at most every `preview_every_s` seconds (reports in between repeat the last one);
    `addons`: the LoRA and embedding folders prompts may use;
    `compiling` decides which parts of loaded models (UNet, VAE decode, text towers) run compiled
    graphs and warms them up at load;
    `vae_dtype` is the VAE decode's precision ("auto": float16 on CUDA, where the family allows);
    `fuse_projections`: fused attention projections ([generation] fuse_projections);
    `step_cache_interval`: cached steps ([generation] step_cache_interval, 1: off)."""

    def __init__(
        self,
        models: Sequence[ModelSettings],
        dtype: str,
        inputs: Inputs,
        *,
        preview: bool = False,
        preview_every_s: float = 0.0,
        vae_tile_above_pixels: int = 1024 * 1024,
        vae_dtype: str = "auto",
        compiling: Compiling = Compiling(),
        fuse_projections: bool = True,
        step_cache_interval: int = 1,
        clock: Callable[[], float] = time.monotonic,
        addons: AddonLibrary | None = None,
    ) -> None:
        self._models = {m.name: m for m in models}
        self._addons = addons
        self._dtype = dtype
        self._vae_tile_above_pixels = vae_tile_above_pixels
        self._vae_dtype = vae_dtype
        self._compiling = compiling
        self._fuse_projections = fuse_projections
        self._step_cache_interval = step_cache_interval
        self._inputs = inputs
        self._preview = preview
        self._preview_every_s = preview_every_s
        self._clock = clock
        #: checkpoint_hash by (path, size, mtime): models evicted from the cache reload without rehashing.
        self._hashes: dict[tuple[Path, int, int], str] = {}

    @classmethod
    def of(cls, models: Sequence[ModelSettings], settings: GenerationSettings, inputs: Inputs, *,
           compiling: Compiling, addons: AddonLibrary | None = None, preview: bool = False,
           preview_every_s: float = 0.0) -> Engine:
        """The engine that `[generation]` describes (the bot's, and the benches' that measure it)."""
        return cls(models, settings.dtype, inputs, preview=preview, preview_every_s=preview_every_s,
                   vae_tile_above_pixels=settings.vae_tile_above_pixels, vae_dtype=settings.vae_dtype,
                   compiling=compiling, fuse_projections=settings.fuse_projections,
                   step_cache_interval=settings.step_cache_interval, addons=addons)

    def load(self, name: str, device: str) -> LoadedModel:
        """The checkpoint configured as `name`, on `device` (the runner's `load_model`); its parts
        compiled when `compiling` says so, the warm-up shapes' graphs building in the background."""
        settings = self._models.get(name)
        if settings is None:
            raise KeyError(f"unknown model {name!r}; configured: {', '.join(self._models)}")
        torch_device = resolve_device(device)
        dtype = resolve_dtype(self._dtype, torch_device)
        stat = settings.checkpoint.stat()
        key = (settings.checkpoint, stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = checkpoint_hash(settings.checkpoint)
        model = load_model(settings, torch_device, dtype, self._vae_tile_above_pixels, self._hashes[key],
                           self._addons, resolve_vae_dtype(self._vae_dtype, torch_device), self._fuse_projections,
                           self._step_cache_interval)
        model = self._compiling.compile(model)
        if settings.refiner is None:
            return model
        refiner = self.load(settings.refiner, device)
        check_pair(model, refiner)
        return dataclasses.replace(model, refiner=refiner, refiner_strength=settings.refiner_strength)

    @staticmethod
    def size(model: LoadedModel) -> int:
        """Bytes the model's weights hold, its half-precision VAE decoder's and its refiner's
        included (the runner's `model_size`)."""
        decoder = {} if model.vae_decoder is None else model.vae_decoder.state_dict()
        tensors = [*model.network.state_dict().values(), *decoder.values()]
        own = sum(t.numel() * t.element_size() for t in tensors)
        return own + (0 if model.refiner is None else Engine.size(model.refiner))

    @staticmethod
    def prepare(model: LoadedModel, device: str, batch: list[Job]) -> None:
        """Queue the next batch's text encoding and start noise now (`pipeline.prepare_batch`)."""
        prepare_batch(model, [job.request for job in batch])

    def run(
        self,
        model: LoadedModel,
        device: str,
        batch: list[Job],
        progress: Progress,
        cancelled: Callable[[str], bool],
    ) -> list[JobResult]:
        requests = [job.request for job in batch]
        # Image index in the whole batch where each job's images start, for its preview.
        starts = [sum(r.count for r in requests[:i]) for i in range(len(requests))]

        previews: list[Image.Image | None] = [None] * len(batch)
        previewed_at = -math.inf

        def report(step: int, total: int, x0: torch.Tensor) -> None:  # x0: (B, C, h, w)
            nonlocal previewed_at
            if self._preview and self._clock() - previewed_at >= self._preview_every_s:
                previewed_at = self._clock()
                factors = model.network.family.latent_rgb
                previews[:] = [Image.fromarray(latent_preview(x0[start], factors).numpy()) for start in starts]
            for job, preview in zip(batch, previews, strict=True):
                progress(job.id, step, total, preview)

        try:
            grouped = run_batch(model, requests, self._inputs, report, lambda i: cancelled(batch[i].id))
        except Cancelled:
            return []  # every job was cancelled: the runner records each one
        results = []
        addon_fields = ([[] for _ in requests] if self._addons is None
                        else self._addons.infotexts([(r.prompt, r.negative_prompt) for r in requests]))
        for job, images, extra in zip(batch, grouped, addon_fields, strict=True):
            if not images:  # cancelled with every request of its strength: the runner told it
                continue
            seeds = job.request.seeds()
            r = job.request
            if model.refiner is not None and r.kind in (Kind.TXT2IMG, Kind.IMG2IMG):  # what the refiner finishes
                extra = [*extra, *refiner_infotext(model.refiner.name, model.refiner.short_hash, r.steps,
                                                   model.refiner_strength)]
            if r.kind is not Kind.UPSCALE:  # upscales run on tiles, never cached
                extra = [*extra, *step_cache_infotext(model.step_cache_interval)]
            for image, seed in zip(images, seeds, strict=True):
                image.info["parameters"] = parameters_text(r, seed, model.short_hash, extra)
            results.append(JobResult(job.id, tuple(images), tuple(seeds)))
        return results


def memory_budget(device: str) -> int:
    """Bytes of weights one device may keep loaded: 70% of a GPU's memory, half the RAM on a CPU
    (the rest is for activations, and on a CPU for everything else on the machine)."""
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        return int(0.7 * torch.cuda.get_device_properties(torch_device).total_memory)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
