"""Compiled execution of the UNet, owned by the engine so pipelines and samplers never see it.

A compiled graph is fixed to the shapes and dtypes of its inputs, so graphs are kept per
`GraphKey`: the UNet batch rows (after bucketing), latent channels (inpainting's and the
upscaler's concat channels included) and size, text tokens, and whether class labels are given;
the model and device are those of the `CompiledUNet` itself. Batch rows are either padded up to
the next bucket (a few graphs serve every batch; the padding rows repeat the last real row and are
sliced off, and since every UNet layer works per row they cannot change the real rows) or kept
exact (one graph per row count): the `batches` setting picks, so both can be measured.

A call whose key has no ready graph runs eagerly at once and queues the graph's build on one
background thread (compile, then one call on dummy inputs of the key), so no job ever waits for a
compiler. A build or a compiled call that fails is logged and its key runs eagerly from then on.
The compile function is a parameter: tests use stand-ins, the engine `torch_compiler(mode)`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from generation.request import aspect_size
from generation.settings import CompileBatches, CompileMode, GenerationSettings
from models.families import Family

log = logging.getLogger(__name__)

#: Compiles a UNet call (x, t, context, y) -> out into a function of the same inputs.
Compiler = Callable[[Callable[..., Tensor]], Callable[..., Tensor]]
#: Tokens of one prompt chunk: the warmed-up context length.
CHUNK_TOKENS = 77
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class Spec:
    """Shape and dtype of one input tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def dummy(self, device: torch.device) -> Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=device)


@dataclass(frozen=True)
class GraphKey:
    """What fixes a compiled UNet graph's shapes: its inputs' (padded) shapes and dtypes."""

    x: Spec  # (N, C, h, w) latents (with any concat channels)
    t: Spec  # (N,) timesteps
    context: Spec  # (N, T, D) text
    y: Spec | None = None  # (N,) class labels

    @classmethod
    def of(cls, rows: int, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None) -> GraphKey:
        """The key of a call on these tensors once padded to `rows` rows."""
        def spec(v: Tensor) -> Spec:
            return Spec((rows, *v.shape[1:]), v.dtype)

        return cls(spec(x), spec(t), spec(context), None if y is None else spec(y))

    @classmethod
    def txt2img(cls, rows: int, channels: int, latent: tuple[int, int], tokens: int, width: int,
                dtype: torch.dtype, adm: int | None = None) -> GraphKey:
        """The key of a txt2img step: `dtype` latents and text, float32 timesteps, no labels but
        SDXL's `adm`-wide `dtype` vectors."""
        return cls(Spec((rows, channels, *latent), dtype), Spec((rows,), torch.float32),
                   Spec((rows, tokens, width), dtype), None if adm is None else Spec((rows, adm), dtype))

    def describe(self) -> str:
        rows, channels, h, w = self.x.shape
        labels = ", labels" if self.y is not None else ""
        return f"{rows} rows x {channels} x {h}x{w} latent, {self.context.shape[1]} tokens{labels}"

    def dummies(self, device: torch.device) -> tuple[Tensor | None, ...]:
        return tuple(None if s is None else s.dummy(device) for s in (self.x, self.t, self.context, self.y))


@dataclass(frozen=True)
class Bucketing:
    """How a call's UNet rows map to a graph's rows."""

    batches: CompileBatches = "buckets"
    #: Images per batch that get a graph; UNet rows are these and twice these (guidance).
    buckets: tuple[int, ...] = (1, 2, 4, 8)

    def rows(self, rows: int) -> int:
        """The graph rows a call of `rows` runs in: the next bucket, or `rows` itself when exact
        or larger than every bucket."""
        if self.batches == "exact":
            return rows
        return next((b for b in self.row_buckets() if b >= rows), rows)

    def row_buckets(self) -> list[int]:
        return sorted({b * copies for b in self.buckets for copies in (1, 2)})


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
    fn: Callable[..., Tensor] | None = None
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
    """What `atelier doctor` and the log show: every key's graph, in the order first asked for."""

    model: str
    device: str
    mode: str
    graphs: tuple[GraphStatus, ...] = field(default=())

    def count(self, state: State) -> int:
        return sum(g.state is state for g in self.graphs)


def torch_compiler(mode: CompileMode) -> Compiler:
    """torch.compile(fullgraph, static shapes) of each key's call. Each gets its own code object:
    dynamo keeps graphs per code object and would refuse more than its recompile limit (8) of
    them, where a model at a few sizes and batch buckets needs dozens."""

    def compile_call(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        return torch.compile(own, fullgraph=True, dynamic=False, mode=mode)

    return compile_call


class CompiledUNet:
    """A UNet call (x, t, context, y=None) -> out that runs each key's compiled graph once it is
    ready and the eager UNet until then. Thread-safe: calls may come from any thread while the
    background thread builds. Past `max_graphs` keys (each holds compiled code and, with CUDA
    graphs, device memory) new shapes run eagerly for good: a bot sees few sizes, but uploaded
    images bring odd ones. `on_change` hears every change of a graph's state."""

    def __init__(
        self,
        unet: nn.Module,
        compiler: Compiler,
        *,
        model: str,
        device: torch.device,
        mode: str = "reduce-overhead",
        bucketing: Bucketing = Bucketing(),
        max_graphs: int = 32,
        on_change: Callable[[CompileStatus], None] | None = None,
    ) -> None:
        self._unet = unet
        self._compiler = compiler
        self._model, self._device, self._mode = model, device, mode
        self._bucketing = bucketing
        self._max_graphs = max_graphs
        self._on_change = on_change
        self._cuda_graphs = device.type == "cuda" and mode in CUDA_GRAPH_MODES
        self._graphs: dict[GraphKey, Graph] = {}
        self._lock = threading.Lock()
        #: Builds to run, in order, on one daemon thread (a process never waits for it to exit).
        self._todo: queue.SimpleQueue[tuple[GraphKey, str] | None] = queue.SimpleQueue()
        self._builder: threading.Thread | None = None
        self._unfinished = 0
        self._idle = threading.Condition(self._lock)

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        rows = x.shape[0]
        padded = self._bucketing.rows(rows)
        key = GraphKey.of(padded, x, t, context, y)
        fn = self._ready(key)
        if fn is None:
            return self._unet(x, t, context, y=y)
        try:
            if self._cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = fn(*(None if v is None else _pad(v, padded) for v in (x, t, context, y)))
        except torch.OutOfMemoryError:
            raise  # the runner splits the batch
        except Exception as exc:  # noqa: BLE001 - any failure of a compiled graph: eager from now on
            log.warning("compiled UNet of %s failed for %s; running it eagerly from now on",
                        self._model, key.describe(), exc_info=True)
            self._set(key, state=State.FAILED, fn=None, error=repr(exc))
            return self._unet(x, t, context, y=y)
        return out[:rows].clone()  # out of the graph's memory, which its next replay overwrites

    def warm_up(self, keys: Sequence[GraphKey]) -> None:
        """Build these keys' graphs in the background, in order, with progress in the log."""
        for i, key in enumerate(keys, 1):
            self._queue(key, f"warm-up {i}/{len(keys)}: ")

    def wait(self, timeout: float | None = None) -> None:
        """Block until every queued build is done (benchmarks and tests; jobs never wait)."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._unfinished == 0, timeout):
                raise TimeoutError(f"compile builds of {self._model} still running after {timeout} s")

    def status(self) -> CompileStatus:
        with self._lock:
            graphs = tuple(GraphStatus(k.describe(), g.state, g.seconds, g.error) for k, g in self._graphs.items())
        return CompileStatus(self._model, str(self._device), self._mode, graphs)

    def _ready(self, key: GraphKey) -> Callable[..., Tensor] | None:
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
                self._todo.put((key, label))
                if self._builder is None:
                    self._builder = threading.Thread(target=_builds, args=(weakref.ref(self), self._todo),
                                                     name=f"compile {self._model}", daemon=True)
                    self._builder.start()
                    # The thread holds no reference to this object: it ends when this is collected.
                    weakref.finalize(self, self._todo.put, None)
        if not building:
            log.info("the UNet of %s has %d graphs, the most allowed: %s runs eagerly", self._model,
                     self._max_graphs, key.describe())
        self._changed()

    def _build(self, key: GraphKey, label: str) -> None:
        self._set(key, state=State.BUILDING)
        log.info("%scompiling the UNet of %s on %s for %s", label, self._model, self._device, key.describe())
        start = time.perf_counter()
        try:
            unet = self._unet

            def unet_graph(x: Tensor, t: Tensor, context: Tensor, y: Tensor | None) -> Tensor:
                return unet(x, t, context, y=y)

            fn = self._compiler(unet_graph)
            with torch.inference_mode():  # as the pipelines call it: the same guards
                fn(*key.dummies(self._device))  # compiles: torch.compile is lazy
            if self._cuda_graphs:
                # CUDA graphs are recorded per thread: free this thread's, the device thread records its own.
                from torch._inductor.cudagraph_trees import reset_cudagraph_trees

                reset_cudagraph_trees()
        except Exception as exc:  # noqa: BLE001 - a graph that cannot be built: eager for this key
            log.warning("%scompiling the UNet of %s for %s failed; that shape runs eagerly",
                        label, self._model, key.describe(), exc_info=True)
            self._set(key, state=State.FAILED, error=repr(exc))
            return
        seconds = time.perf_counter() - start
        log.info("%sUNet of %s ready for %s in %.1f s", label, self._model, key.describe(), seconds)
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


def _builds(owner: weakref.ref[CompiledUNet], todo: queue.SimpleQueue[tuple[GraphKey, str] | None]) -> None:
    """The builder thread: queued builds in order, until its `CompiledUNet` is collected (a model
    unloaded meanwhile is not kept alive by its queued builds)."""
    while (item := todo.get()) is not None:
        compiled = owner()
        if compiled is None:
            return
        try:
            compiled._build(*item)
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


@dataclass(frozen=True)
class Compiling:
    """The engine's compile settings: when and how a loaded model's UNet is compiled, which
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

    @classmethod
    def of(cls, settings: GenerationSettings, cache_dir: Path | None) -> Compiling:
        bucketing = Bucketing(settings.compile_batches, settings.compile_buckets)
        return cls(settings.compile, settings.compile_mode, bucketing, settings.compile_warmup,
                   settings.compile_max_graphs, cache_dir)

    def mode_on(self, device: torch.device) -> CompileMode | None:
        """The torch.compile mode on `device`, None for eager: "auto" compiles on CUDA only, and
        off CUDA there are no CUDA graphs to replay."""
        if self.when == "off" or (self.when == "auto" and device.type != "cuda"):
            return None
        return self.mode if device.type == "cuda" else "default"

    def wrap(self, unet: nn.Module, model: str, device: torch.device) -> CompiledUNet | None:
        """The compiled call of a loaded model's UNet, or None when it runs eagerly on `device`."""
        mode = self.mode_on(device)
        if mode is None:
            return None
        if self.cache_dir is not None:
            # Read by inductor whenever it opens its cache; set before this process compiles anything.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache_dir.resolve())
        on_change = None if self.cache_dir is None else lambda status: write_status(self.cache_dir, status)
        return CompiledUNet(unet, self.compiler(mode), model=model, device=device, mode=mode,
                            bucketing=self.bucketing, max_graphs=self.max_graphs, on_change=on_change)

    def warmup_keys(self, family: Family, dtype: torch.dtype, vae_scale: int) -> list[GraphKey]:
        """The graphs of guided txt2img steps (rows = twice each bucket) of one prompt chunk at each
        warm-up aspect at the model's native size; none for models with class labels (upscaler)."""
        if family.unet.num_classes is not None:
            return []
        keys = []
        for aspect in self.warmup:
            width, height = aspect_size(aspect, family.native_size, family.name)
            latent = (height // vae_scale, width // vae_scale)
            for images in self.bucketing.buckets:
                keys.append(GraphKey.txt2img(self.bucketing.rows(2 * images), family.unet.in_channels, latent,
                                             CHUNK_TOKENS, family.unet.context_dim, dtype,
                                             family.unet.adm_in_channels))
        return list(dict.fromkeys(keys))


def cache_dir_in(data_dir: Path) -> Path:
    """Where compiled code and the compile status live under the data folder."""
    return data_dir / "compile-cache"


def write_status(cache_dir: Path, status: CompileStatus) -> None:
    """status/<model>@<device>.json under the cache folder, replaced atomically, for `atelier doctor`."""
    folder = cache_dir / "status"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{status.model}@{status.device}.json"
    temporary = path.with_suffix(f".{threading.get_ident()}.tmp")
    temporary.write_text(json.dumps(asdict(status)))
    temporary.replace(path)


def read_statuses(cache_dir: Path) -> list[CompileStatus]:
    """Every model's last written status (a running bot's, or the last one's)."""
    statuses = []
    for path in sorted((cache_dir / "status").glob("*.json")):
        data = json.loads(path.read_text())
        graphs = tuple(GraphStatus(g["key"], State(g["state"]), g["seconds"], g["error"]) for g in data["graphs"])
        statuses.append(CompileStatus(data["model"], data["device"], data["mode"], graphs))
    return statuses
