"""Compiled execution of the UNet, the VAE decode and the text towers, owned by the engine so
pipelines and samplers never see it.

One machinery serves any module call (`CompiledCall`): a compiled graph is fixed to the shapes and
dtypes of its inputs, so graphs are kept per `GraphKey`, the call's arguments bound to its
signature (defaults filled in, so `f(x)` and `f(x, None)` share a graph): each tensor's shape
(rows after bucketing) and dtype, every other argument as it is (None, flags). Every tensor
argument has the batch rows first and every row of the output depends on its own input row only
(true of the UNet, the VAE decoder and the text towers), so batch rows are either padded up to
the next bucket (a few graphs serve every batch; the padding rows repeat the last real row and
are sliced off) or kept exact (one graph per row count): the `batches` setting picks.

A call whose key has no ready graph runs eagerly at once and queues the graph's build on one
background thread per model (`Builder`: its parts' builds one at a time, the UNet's warm-up
first; compile, then one call on dummy inputs of the key), so no job ever
waits for a compiler. A build or a compiled call that fails is logged and its key runs eagerly
from then on. The compile function is a parameter: tests use stand-ins, the engine
`torch_compiler(mode)`.

The parts (`Compiling.compile`): the UNet per step (`UNetCalls`), keyed by latents, timesteps,
text, labels and which call it is: the exact one, or with cached steps the full call that keeps
the deep feature and the shallow call on it (another tensor input, rows first like the rest);
the VAE decode (the half-precision `vae_decoder` when the model has one, else the float32 VAE's
`decode`), keyed by latent shape, its rows bucketed like the UNet's images (tiled decodes of
large images stay eager: `pipeline.decode` never calls it for them); each text tower's call
(SDXL's bigG: context and pooled output from one call), keyed by rows x tokens and whether
textual-inversion token embeddings are passed. The modes differ per part: the UNet's is the
setting; the VAE is compute-bound with large activations, so CUDA graphs buy it little and would
pin their memory: it runs the same mode without them; text encoding is launch-bound at small
batches, where CUDA graphs pay most: it keeps the setting's.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import queue
import threading
import time
import types
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from generation.pipeline import LoadedModel
from generation.request import aspect_size
from generation.settings import CompileBatches, CompileMode, CompilePart, GenerationSettings
from generation.step_cache import UNetCalls
from models.families import Family
from models.stable_diffusion import StableDiffusion
from models.text_encoders import CLIPTextEncoder, TextEncoder

log = logging.getLogger(__name__)

#: A module call's output: one tensor or a tuple of them, batch rows first.
Output = Tensor | tuple[Tensor, ...]
#: Compiles a call into a function of the same inputs.
Compiler = Callable[[Callable[..., Output]], Callable[..., Output]]
#: Tokens of one prompt chunk: the warmed-up text length.
CHUNK_TOKENS = 77
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: The VAE's mode for each setting: the same, without CUDA graphs.
WITHOUT_CUDA_GRAPHS: dict[str, CompileMode] = {
    "reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


@dataclass(frozen=True)
class Spec:
    """Shape and dtype of one input tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def dummy(self, device: torch.device) -> Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=device)


@dataclass(frozen=True)
class GraphKey:
    """What fixes a compiled graph's shapes: its call's arguments, in signature order, each
    tensor as its (padded) `Spec`, every other argument as it is."""

    args: tuple[Spec | Hashable, ...]

    def dummies(self, device: torch.device) -> tuple[object, ...]:
        return tuple(a.dummy(device) if isinstance(a, Spec) else a for a in self.args)


#: Which of `UNetCalls`' calls a UNet key is: the exact one, the full call keeping the deep
#: feature, the shallow call on it (cached steps).
UNetCall = Literal["exact", "keep", "shallow"]


def unet_key(rows: int, channels: int, latent: tuple[int, int], tokens: int, width: int, dtype: torch.dtype,
             adm: int | None = None, call: UNetCall = "exact", deep_channels: int = 0) -> GraphKey:
    """The UNet key of a txt2img step: `dtype` latents and text, float32 timesteps, no labels but
    SDXL's `adm`-wide `dtype` vectors; for the shallow call, the `deep_channels` deep feature."""
    deep = Spec((rows, deep_channels, *latent), dtype) if call == "shallow" else None
    return GraphKey((Spec((rows, channels, *latent), dtype), Spec((rows,), torch.float32),
                     Spec((rows, tokens, width), dtype), None if adm is None else Spec((rows, adm), dtype),
                     deep, call == "keep"))


def vae_key(rows: int, channels: int, latent: tuple[int, int], dtype: torch.dtype) -> GraphKey:
    """The VAE decode key of `rows` latents (channels, h, w) in `dtype`."""
    return GraphKey((Spec((rows, channels, *latent), dtype),))


def text_key(rows: int, tokens: int = CHUNK_TOKENS) -> GraphKey:
    """A text tower's key of `rows` chunks of token ids, without token embeddings."""
    return GraphKey((Spec((rows, tokens), torch.long), None))


def describe_unet(key: GraphKey) -> str:
    x, _, context, y, *step = key.args
    deep, keep = step or (None, False)  # a plain UNet's key has no `UNetCalls` arguments
    rows, channels, h, w = x.shape
    labels = ", labels" if y is not None else ""
    which = ", keeping the deep feature" if keep else ", shallow (cached steps)" if deep is not None else ""
    return f"{rows} rows x {channels} x {h}x{w} latent, {context.shape[1]} tokens{labels}{which}"


def describe_latents(key: GraphKey) -> str:
    rows, channels, h, w = key.args[0].shape
    return f"{rows} rows x {channels} x {h}x{w} latent"


def describe_tokens(key: GraphKey) -> str:
    tokens, embeds = key.args[:2]
    return f"{tokens.shape[0]} rows x {tokens.shape[1]} tokens" + (", embeddings" if embeds is not None else "")


@dataclass(frozen=True)
class Bucketing:
    """How a call's rows map to a graph's rows."""

    batches: CompileBatches = "buckets"
    #: Images per batch that get a graph; guided rows are these and twice these.
    buckets: tuple[int, ...] = (1, 2, 4, 8)
    #: Rows are images and their guidance twins (the UNet, prompts and negative prompts), or
    #: images only (the VAE).
    guided: bool = True

    def rows(self, rows: int) -> int:
        """The graph rows a call of `rows` runs in: the next bucket, or `rows` itself when exact
        or larger than every bucket."""
        if self.batches == "exact":
            return rows
        return next((b for b in self.row_buckets() if b >= rows), rows)

    def row_buckets(self) -> list[int]:
        return sorted({b * copies for b in self.buckets for copies in ((1, 2) if self.guided else (1,))})


class State(StrEnum):
    QUEUED = "queued"
    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"
    #: Past the graph limit: eager for good.
    SKIPPED = "skipped"


@dataclass
class Graph:
    """One key's graph and how its build went."""

    state: State = State.QUEUED
    fn: Callable[..., Output] | None = None
    seconds: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class GraphStatus:
    key: str
    state: State
    seconds: float | None
    error: str | None


@dataclass(frozen=True)
class CompileStatus:
    """What `atelier doctor` and the log show: every key's graph of one part, in the order first
    asked for."""

    model: str
    device: str
    mode: str
    graphs: tuple[GraphStatus, ...] = field(default=())
    part: str = "unet"

    def count(self, state: State) -> int:
        return sum(g.state is state for g in self.graphs)


def torch_compiler(mode: CompileMode) -> Compiler:
    """torch.compile(fullgraph, static shapes) of each key's call. Each gets its own code object:
    dynamo keeps graphs per code object and would refuse more than its recompile limit (8) of
    them, where a model at a few sizes and batch buckets needs dozens."""

    def compile_call(fn: Callable[..., Output]) -> Callable[..., Output]:
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        return torch.compile(own, fullgraph=True, dynamic=False, mode=mode)

    return compile_call


class CompiledCall:
    """A module call that runs each key's compiled graph once it is ready and the eager call until
    then; called as the eager one is. Thread-safe: calls may come from any thread while the
    background thread builds. Past `max_graphs` keys (each holds compiled code and, with CUDA
    graphs, device memory) new shapes run eagerly for good: a bot sees few sizes, but uploaded
    images bring odd ones. Keys for which `eager_only` is true always run eagerly (calls a
    compiler cannot trace). `on_change` hears every change of a graph's state."""

    def __init__(
        self,
        eager: Callable[..., Output],
        compiler: Compiler,
        *,
        model: str,
        device: torch.device,
        part: str = "unet",
        describe: Callable[[GraphKey], str] = describe_unet,
        mode: str = "reduce-overhead",
        bucketing: Bucketing = Bucketing(),
        max_graphs: int = 32,
        eager_only: Callable[[GraphKey], bool] | None = None,
        on_change: Callable[[CompileStatus], None] | None = None,
        builder: Builder | None = None,
    ) -> None:
        self._eager = eager
        self._signature = inspect.signature(eager.forward if isinstance(eager, nn.Module) else eager)
        self._compiler = compiler
        self._model, self._device, self._part, self._mode = model, device, part, mode
        self._describe = describe
        self._bucketing = bucketing
        self._max_graphs = max_graphs
        self._eager_only = eager_only
        self._on_change = on_change
        self._cuda_graphs = device.type == "cuda" and mode in CUDA_GRAPH_MODES
        self._graphs: dict[GraphKey, Graph] = {}
        self._lock = threading.Lock()
        self._builder = Builder(f"compile {part} {model}") if builder is None else builder
        self._unfinished = 0
        self._idle = threading.Condition(self._lock)

    def __call__(self, *args: object, **kwargs: object) -> Output:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = tuple(bound.arguments.values())
        rows = next(v.shape[0] for v in values if isinstance(v, Tensor))
        padded = self._bucketing.rows(rows)
        key = GraphKey(tuple(Spec((padded, *v.shape[1:]), v.dtype) if isinstance(v, Tensor) else v for v in values))
        fn = None if self._eager_only is not None and self._eager_only(key) else self._ready(key)
        if fn is None:
            return self._eager(*args, **kwargs)
        try:
            if self._cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = fn(*(_pad(v, padded) if isinstance(v, Tensor) else v for v in values))
        except torch.OutOfMemoryError:
            raise  # the runner splits the batch
        except Exception as exc:  # noqa: BLE001 - any failure of a compiled graph: eager from now on
            log.warning("compiled %s of %s failed for %s; running it eagerly from now on",
                        self._part, self._model, self._describe(key), exc_info=True)
            self._set(key, state=State.FAILED, fn=None, error=repr(exc))
            return self._eager(*args, **kwargs)
        return _rows(out, rows, clone=self._cuda_graphs)

    def warm_up(self, keys: Sequence[GraphKey]) -> None:
        """Build these keys' graphs in the background, in order, with progress in the log."""
        for i, key in enumerate(keys, 1):
            self._queue(key, f"warm-up {i}/{len(keys)}: ")

    def wait(self, timeout: float | None = None) -> None:
        """Block until every queued build is done (benchmarks and tests; jobs never wait)."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._unfinished == 0, timeout):
                raise TimeoutError(
                    f"compile builds of the {self._part} of {self._model} still running after {timeout} s")

    def status(self) -> CompileStatus:
        with self._lock:
            graphs = tuple(GraphStatus(self._describe(k), g.state, g.seconds, g.error) for k, g in self._graphs.items())
        return CompileStatus(self._model, str(self._device), self._mode, graphs, self._part)

    def _ready(self, key: GraphKey) -> Callable[..., Output] | None:
        """The key's graph when ready; else None, and the build queued if it is new."""
        with self._lock:
            graph = self._graphs.get(key)
            if graph is not None:
                return graph.fn if graph.state is State.READY else None
        self._queue(key, "")
        return None

    def _queue(self, key: GraphKey, label: str) -> None:
        with self._lock:
            if key in self._graphs:
                return
            building = sum(g.state is not State.SKIPPED for g in self._graphs.values()) < self._max_graphs
            self._graphs[key] = Graph() if building else Graph(State.SKIPPED)
            if building:
                self._unfinished += 1
                self._builder.put(self, key, label)
        if not building:
            log.info("the %s of %s has %d graphs, the most allowed: %s runs eagerly", self._part, self._model,
                     self._max_graphs, self._describe(key))
        self._changed()

    def _build(self, key: GraphKey, label: str) -> None:
        self._set(key, state=State.BUILDING)
        what = f"the {self._part} of {self._model}"
        log.info("%scompiling %s on %s for %s", label, what, self._device, self._describe(key))
        start = time.perf_counter()
        try:
            eager = self._eager

            def graph(*args: object) -> Output:
                return eager(*args)

            fn = self._compiler(graph)
            with torch.inference_mode():  # as the pipelines call it: the same guards
                fn(*key.dummies(self._device))  # compiles: torch.compile is lazy
            if self._cuda_graphs:
                # CUDA graphs are recorded per thread: free this thread's, the device thread records its own.
                from torch._inductor.cudagraph_trees import reset_cudagraph_trees

                reset_cudagraph_trees()
        except Exception as exc:  # noqa: BLE001 - a graph that cannot be built: eager for this key
            log.warning("%scompiling %s for %s failed; that shape runs eagerly",
                        label, what, self._describe(key), exc_info=True)
            self._set(key, state=State.FAILED, error=repr(exc))
            return
        seconds = time.perf_counter() - start
        log.info("%s%s ready for %s in %.1f s", label, what, self._describe(key), seconds)
        self._set(key, state=State.READY, fn=fn, seconds=seconds)

    def _set(self, key: GraphKey, **changes: object) -> None:
        with self._lock:
            graph = self._graphs[key]
            for name, value in changes.items():
                setattr(graph, name, value)
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change(self.status())
            except Exception:  # noqa: BLE001 - a status writer must not stop builds or jobs
                log.warning("compile status listener failed", exc_info=True)


_Build = tuple[weakref.ref[CompiledCall], GraphKey, str]


class Builder:
    """One daemon thread building the graphs of the calls that share it, one at a time, in the
    order asked for: a model's parts share one (`Compiling.compile`, the UNet's warm-up first), as
    builds running side by side would contend for the interpreter with each other and with the
    device thread's eager jobs. It holds its calls weakly: a model unloaded meanwhile is not kept
    alive by its queued builds (they are skipped), and the thread ends with the builder."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._todo: queue.SimpleQueue[_Build | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, call: CompiledCall, key: GraphKey, label: str) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=_builds, args=(self._todo,), name=self._name, daemon=True)
                self._thread.start()
                weakref.finalize(self, self._todo.put, None)  # the thread holds the queue, not the builder
        self._todo.put((weakref.ref(call), key, label))


def _builds(todo: queue.SimpleQueue[_Build | None]) -> None:
    """A builder's thread: its queued builds in order, until the builder is collected."""
    while (item := todo.get()) is not None:
        owner, key, label = item
        compiled = owner()
        if compiled is None:  # its model was unloaded
            continue
        try:
            compiled._build(key, label)
        finally:
            with compiled._idle:
                compiled._unfinished -= 1
                compiled._idle.notify_all()
        del compiled


def _pad(v: Tensor, rows: int) -> Tensor:
    """v with its last row repeated up to `rows` rows, contiguous (as the graph was traced)."""
    missing = rows - v.shape[0]
    if missing == 0:
        return v.contiguous()
    return torch.cat([v, v[-1:].expand(missing, *v.shape[1:])])


def _rows(out: Output, rows: int, clone: bool) -> Output:
    """The real rows of a graph's output; copied out of the graph's memory when it is a CUDA
    graph's, which its next replay overwrites."""
    if isinstance(out, tuple):
        return tuple(_rows(o, rows, clone) for o in out)
    if clone:
        return out[:rows].clone()
    return out if out.shape[0] == rows else out[:rows]


def tower_calls(network: StableDiffusion) -> list[tuple[TextEncoder, str]]:
    """The text towers' methods the pipelines call: each tower's `forward`, but SDXL's pooled
    (bigG) tower's `forward_pooled`, which gives its context and pooled embedding from one run."""
    pooled = None if network.family.conditioner is None else network.conditioner.pooled_tower
    return [(tower, "forward_pooled" if tower is pooled else "forward") for tower in network.text_encoders]


def compiled_calls(model: LoadedModel) -> Iterator[CompiledCall]:
    """Every compiled call of a loaded model (not its refiner's): UNet, VAE decode, text towers."""
    towers = [vars(tower).get(method) for tower, method in tower_calls(model.network)]
    yield from (c for c in [model.unet, model.vae_decode, *towers] if isinstance(c, CompiledCall))


@dataclass(frozen=True)
class Compiling:
    """The engine's compile settings: when and how a loaded model's parts are compiled, which
    shapes are warmed up at load, and where compiled code and the status files are kept."""

    when: Literal["auto", "on", "off"] = "auto"
    mode: CompileMode = "reduce-overhead"
    bucketing: Bucketing = Bucketing()
    #: Aspects whose graphs are built at load, at the model's native size, for every bucket.
    warmup: tuple[str, ...] = ()
    max_graphs: int = 32
    #: Inductor's cache (a restart finds its compiled code there) and `status/`; None: torch's default.
    cache_dir: Path | None = None
    #: mode -> compiler; tests inject stand-ins.
    compiler: Callable[[CompileMode], Compiler] = torch_compiler
    parts: tuple[CompilePart, ...] = ("unet", "vae", "text")
    #: Warm the text towers' row buckets even without warm-up aspects (their shapes do not depend
    #: on the image size): the engine's settings do (`of`), so a bench that warms its own sizes
    #: still finds its text graphs built.
    text_warmup: bool = False

    @classmethod
    def of(cls, settings: GenerationSettings, cache_dir: Path | None) -> Compiling:
        bucketing = Bucketing(settings.compile_batches, settings.compile_buckets)
        return cls(settings.compile, settings.compile_mode, bucketing, settings.compile_warmup,
                   settings.compile_max_graphs, cache_dir, parts=settings.compile_parts, text_warmup=True)

    def mode_on(self, device: torch.device, part: CompilePart = "unet") -> CompileMode | None:
        """The torch.compile mode of `part` on `device`, None for eager: "auto" compiles on CUDA
        only, and off CUDA there are no CUDA graphs to replay; the VAE never replays them (see
        the module's docstring)."""
        if part not in self.parts or self.when == "off" or (self.when == "auto" and device.type != "cuda"):
            return None
        if device.type != "cuda":
            return "default"
        return WITHOUT_CUDA_GRAPHS.get(self.mode, self.mode) if part == "vae" else self.mode

    def compile(self, model: LoadedModel) -> LoadedModel:
        """`model` with its parts that compile on its device wrapped in `CompiledCall`s, their
        warm-up graphs building in the background: the UNet (`LoadedModel.unet`), the VAE decode
        (`LoadedModel.vae_decode`), and each text tower's method the pipelines call (`tower_calls`),
        replaced on the tower instance (not its class), so that every caller of the towers runs
        them."""
        network, device = model.network, model.device
        family = network.family
        if self.cache_dir is not None and any(self.mode_on(device, part) for part in self.parts):
            # Read by inductor whenever it opens its cache; set before this process compiles anything.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache_dir.resolve())
        # The x4 upscaler (class labels) sees its inputs' sizes, not aspects of its native size: no warm-up.
        warmup = self.warmup if family.unet.num_classes is None else ()
        sizes = [self._latent(family, aspect, network.vae_scale) for aspect in warmup]
        builder = Builder(f"compile {model.name}")  # one build at a time, the UNet's warm-up first
        if (mode := self.mode_on(device, "unet")) is not None:
            unet = self._call(UNetCalls(network.unet), model, "unet", mode, describe_unet, self.bucketing, builder)
            calls: tuple[UNetCall, ...] = ("keep", "shallow") if model.step_cache_interval > 1 else ("exact",)
            unet.warm_up(self.unet_keys(family, model.dtype, sizes, calls, network.unet.deep_channels))
            model = dataclasses.replace(model, unet=unet)
        if (mode := self.mode_on(device, "vae")) is not None:
            eager = network.vae.decode if model.vae_decoder is None else model.vae_decoder
            dtype = torch.float32 if model.vae_decoder is None else next(model.vae_decoder.parameters()).dtype
            decode = self._call(eager, model, "vae", mode, describe_latents,
                                dataclasses.replace(self.bucketing, guided=False), builder)
            small = [s for s in sizes if s[0] * s[1] * network.vae_scale**2 <= model.vae_tile_above_pixels]
            decode.warm_up([vae_key(rows, family.vae.embed_dim, size, dtype)
                            for size in small for rows in self.bucketing.buckets])
            model = dataclasses.replace(model, vae_decode=decode)
        if (mode := self.mode_on(device, "text")) is not None:
            rows = dict.fromkeys(self.bucketing.rows(2 * images) for images in self.bucketing.buckets)
            keys = [text_key(n) for n in rows] if warmup or (self.text_warmup and family.unet.num_classes is None) else []
            calls = tower_calls(network)
            for i, (tower, method) in enumerate(calls):
                self._tower(tower, method, model, "text" if len(calls) == 1 else f"text {i + 1}", mode, keys, builder)
        return model

    def unet_keys(self, family: Family, dtype: torch.dtype, sizes: Sequence[tuple[int, int]],
                  calls: Sequence[UNetCall] = ("exact",), deep_channels: int = 0) -> list[GraphKey]:
        """The graphs of guided txt2img steps (rows = twice each bucket) of one prompt chunk at each
        latent size, for each of `calls` (cached steps: the full call keeping the deep feature of
        `deep_channels`, and the shallow one)."""
        return list(dict.fromkeys(
            unet_key(self.bucketing.rows(2 * images), family.unet.in_channels, size, CHUNK_TOKENS,
                     family.unet.context_dim, dtype, family.unet.adm_in_channels, call, deep_channels)
            for size in sizes for images in self.bucketing.buckets for call in calls))

    @staticmethod
    def _latent(family: Family, aspect: str, vae_scale: int) -> tuple[int, int]:
        """(h, w) latents of an aspect at the family's native size."""
        width, height = aspect_size(aspect, family.native_size, family.name)
        return height // vae_scale, width // vae_scale

    def _call(self, eager: Callable[..., Output], model: LoadedModel, part: str, mode: CompileMode,
              describe: Callable[[GraphKey], str], bucketing: Bucketing, builder: Builder,
              eager_only: Callable[[GraphKey], bool] | None = None) -> CompiledCall:
        cache_dir = self.cache_dir
        on_change = None if cache_dir is None else lambda status: write_status(cache_dir, status)
        return CompiledCall(eager, self.compiler(mode), model=model.name, device=model.device, part=part,
                            describe=describe, mode=mode, bucketing=bucketing, max_graphs=self.max_graphs,
                            eager_only=eager_only, on_change=on_change, builder=builder)

    def _tower(self, tower: TextEncoder, method: str, model: LoadedModel, part: str, mode: CompileMode,
               keys: list[GraphKey], builder: Builder) -> None:
        """Replace the tower's own `method` with its compiled call. transformers' CLIP takes
        textual-inversion vectors through a forward pre-hook registered for the one call, which
        dynamo cannot trace: its calls with token embeddings run eagerly."""
        eager_only = (lambda key: key.args[1] is not None) if isinstance(tower, CLIPTextEncoder) else None
        compiled = self._call(getattr(tower, method), model, part, mode, describe_tokens, self.bucketing, builder,
                              eager_only)
        compiled.warm_up(keys)
        setattr(tower, method, compiled)


def cache_dir_in(data_dir: Path) -> Path:
    """Where compiled code and the compile status live under the data folder."""
    return data_dir / "compile-cache"


def write_status(cache_dir: Path, status: CompileStatus) -> None:
    """status/<model>@<device>@<part>.json under the cache folder, replaced atomically, for
    `atelier doctor`."""
    folder = cache_dir / "status"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{status.model}@{status.device}@{status.part}.json"
    temporary = path.with_suffix(f".{threading.get_ident()}.tmp")
    temporary.write_text(json.dumps(asdict(status)))
    temporary.replace(path)


def read_statuses(cache_dir: Path) -> list[CompileStatus]:
    """Every model's and part's last written status (a running bot's, or the last one's)."""
    statuses = []
    for path in sorted((cache_dir / "status").glob("*.json")):
        data = json.loads(path.read_text())
        graphs = tuple(GraphStatus(g["key"], State(g["state"]), g["seconds"], g["error"]) for g in data["graphs"])
        statuses.append(CompileStatus(data["model"], data["device"], data["mode"], graphs, data.get("part", "unet")))
    return statuses
