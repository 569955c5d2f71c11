"""`atelier bench serve`: the whole path, from a queued request to a stored image, against the
engine alone.

The real Studio (fair queue, runner, storage on a temporary SQLite file and image folder, the real
Engine; no Discord) is fed a synthetic trace: members of a few servers, in role classes of
different fair-share weights, submit a mix of sizes, image counts and step counts, faster than the
device can serve them. It prints the delivered images per second (first submission to last stored
image), the engine's own images per second for the same jobs in the same batches (direct Engine
calls, no queue or storage), their ratio, the fraction of the wall time the device spent in
pipeline runs, and per member class the p50/p95 wait until a job started and until it was stored.

With `--compile auto` the engine compiles its UNet as the bot does on CUDA (`[generation] compile`;
eager on the CPU): every graph the trace can use (each size at each batch bucket) is built during
the warm-up, and both runs wait for them (the compile status files, `CompiledCall.wait`) before
anything is timed, so no figure mixes eager and compiled batches. Default: eager (`off`). The
compile cache is a cold one in the temporary folder, or with `--cache-dir` a folder to reuse (the
one `atelier bench engine --cache-dir` filled, or an earlier run's).

Weights are random (speed does not depend on their values): a random-weight checkpoint in the
original single-file layout is written to the temporary folder, in the real SD 1.x / 2.x
architectures, or `tiny` (SD 1.x scaled down) for a structure check on a CPU; or `--checkpoint`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from bot.config import AppConfig
from bot.policy import Requester
from bot.studio import Origin, Studio
from generation.compiled import Compiling, State, cache_dir_in, compiled_calls, read_statuses
from generation.engine import Engine, memory_budget
from generation.engine_bench import TINY, randomise
from generation.queue import Estimate, Job
from generation.request import SAMPLER_NAMES, GenerationRequest, JobState
from generation.settings import GenerationSettings, ModelSettings, QueueSettings
from models.families import SD1, SD2_V, Family
from models.stable_diffusion import StableDiffusion
from storage import jobs as stored
from storage.images import ImageRecord
from storage.settings import StorageSettings

FAMILIES = {"tiny": TINY, "sd1": SD1, "sd2": SD2_V}
#: The native square and the 2:3 and 3:2 aspects the bot offers (tiny: small enough for a CPU).
SIZES = {"tiny": "64x64,64x96,96x64", "sd1": "512x512,512x768,768x512", "sd2": "768x768,640x960,960x640"}
#: Member classes: (role name, fair-share weight, share of the members).
CLASSES = (("member", 1.0, 0.6), ("supporter", 2.0, 0.3), ("patron", 4.0, 0.1))
SERVERS = 3
#: By default arrivals bring work this many times as fast as the device does it one image at a
#: time (the warm-up measures that), more than batching can absorb: a queue builds up and stays.
LOAD = 8.0
PROMPTS = ("a lighthouse at dusk, oil painting", "a red fox in the snow", "a city of glass, isometric",
           "portrait of an old sailor, charcoal", "a bowl of ramen, studio photo")
MODEL = "bench"


@dataclass(frozen=True)
class Member:
    user_id: int
    guild_id: int
    role: str


@dataclass(frozen=True)
class Arrival:
    """One submission of the trace, `at` seconds after it starts."""

    at: float
    member: Member
    request: GenerationRequest


@dataclass
class Timeline:
    """The bench's listener: when each job was submitted, started and stored, as the Studio tells it."""

    submitted: dict[str, float] = field(default_factory=dict)
    started_at: dict[str, float] = field(default_factory=dict)
    stored_at: dict[str, float] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    expected: int = 0
    all_stored: asyncio.Event = field(default_factory=asyncio.Event)

    async def queue_moved(self, estimates: Mapping[str, Estimate]) -> None:
        pass

    async def started(self, job: stored.Job) -> None:
        self.started_at[job.id] = time.perf_counter()

    async def progressed(self, job_id: str, step: int, total: int, preview: Any) -> None:
        pass

    async def finished(self, job: stored.Job, images: list[ImageRecord]) -> None:
        self.stored_at[job.id] = time.perf_counter()
        self.images[job.id] = len(images)
        if job.state is not JobState.DONE:
            self.failed[job.id] = job.error or str(job.state)
        if len(self.stored_at) >= self.expected:
            self.all_stored.set()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atelier bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=20, help="members submitting (default 20)")
    parser.add_argument("--jobs", type=int, default=100, help="jobs in the trace (default 100)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="default: float16 on CUDA, float32 on the CPU")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--family", choices=sorted(FAMILIES), default=None,
                        help="random weights in this architecture (default: sd1 on CUDA, tiny on the CPU)")
    source.add_argument("--checkpoint", type=Path, help="a real single-file checkpoint instead of random weights")
    parser.add_argument("--sizes", default=None,
                        help="WxH image sizes, comma-separated (default: the family's square, 2:3 and 3:2; "
                             "with --checkpoint, SD 1.x's)")
    parser.add_argument("--steps", default="20,25", help="step counts, comma-separated (default 20,25)")
    parser.add_argument("--counts", default="1,2,4", help="images per job, comma-separated (default 1,2,4)")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default="dpmpp_2m_karras")
    parser.add_argument("--load", type=float, default=LOAD,
                        help=f"work arrives this many times as fast as the device does it one image at a time "
                             f"(default {LOAD:g}: a queue builds up; near 1, batches form from what arrives)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trace and of the random weights")
    parser.add_argument("--compile", choices=("auto", "off"), default="off",
                        help="compiled graphs (every part) as [generation] compile (auto: on CUDA; built and "
                             "waited for during the warm-up); default off: eager")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="with --compile auto: the compile cache to reuse (inductor's code and status/, e.g. "
                             "the folder `atelier bench engine --cache-dir` filled); default: a cold one in the "
                             "temporary folder")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device: {args.device!r} is not a device; allowed: cpu, cuda, cuda:N")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: PyTorch sees no CUDA device here; use --device cpu")
    if args.checkpoint and not args.checkpoint.is_file():
        parser.error(f"--checkpoint: {args.checkpoint} is not a file")
    if args.cache_dir is not None and args.compile == "off":
        parser.error("--cache-dir: only with --compile auto (an eager UNet compiles nothing)")
    if args.cache_dir is not None and args.cache_dir.exists() and not args.cache_dir.is_dir():
        parser.error(f"--cache-dir: {args.cache_dir} is not a folder")
    dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    args.family = None if args.checkpoint else args.family or ("sd1" if device.type == "cuda" else "tiny")
    family = FAMILIES[args.family] if args.family else None
    try:
        sizes = _sizes(args.sizes or SIZES[args.family or "sd1"])
        steps, counts = _numbers(args.steps, "--steps"), _numbers(args.counts, "--counts")
        if args.members < 1 or args.jobs < 1:
            raise ValueError("--members and --jobs must be at least 1")
        if not args.load > 0:
            raise ValueError(f"--load must be above 0, got {args.load:g}")
        members = _members(args.members, random.Random(args.seed))
        trace = _trace(members, args.jobs, sizes, steps, counts, args.sampler, random.Random(args.seed + 1))
    except ValueError as exc:
        parser.error(str(exc))
    with tempfile.TemporaryDirectory(prefix="atelier-bench-serve-") as folder:
        checkpoint = args.checkpoint or _random_checkpoint(family, Path(folder), device, args.seed)
        prediction = "v" if family is SD2_V else None
        config = AppConfig(
            # no warm-up aspects: the bench warms exactly the trace's sizes (`_warm_ups`)
            generation=GenerationSettings(device=args.device, dtype=dtype, compile=args.compile, compile_warmup=()),
            models=(ModelSettings(name=MODEL, checkpoint=checkpoint, prediction=prediction),),
            queue=QueueSettings(max_queued_per_user=args.jobs, max_queued_total=max(500, args.jobs),
                                role_weights={name: weight for name, weight, _ in CLASSES if weight != 1.0}),
            storage=StorageSettings(data_dir=Path(folder) / "data"),
        )
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        what = args.checkpoint.name if args.checkpoint else f"{args.family} random weights"
        compiling = Compiling.of(config.generation, cache_dir_in(config.storage.data_dir))
        mode = compiling.mode_on(device)
        print(f"atelier bench serve: {what}, {dtype}, {name}, torch {torch.__version__}, "
              f"UNet {'compiled, mode ' + mode if mode else 'eager'}")
        if args.cache_dir is not None:
            print(_reuse_cache(config.storage.data_dir, args.cache_dir))
        print(f"trace: {args.members} members in {min(SERVERS, args.members)} servers, {args.jobs} jobs "
              f"({sum(a.request.count for a in trace)} images), sizes {_format_sizes(sizes)}, "
              f"steps {args.steps}, counts {args.counts}, {args.sampler}", flush=True)
        warm = _warm_ups(sizes, config.generation.compile_buckets if mode else (1,),
                         config.queue.max_batch_images, min(steps), args.sampler)
        served = asyncio.run(_serve(config, args.device, trace, warm, compiling if mode else None, args.load))
        engine_s, batches = _engine_seconds(config, args.device, served.batches, warm, compiling if mode else None)
    _report(served, engine_s, batches, members)
    return 1 if served.timeline.failed else 0


@dataclass
class Served:
    timeline: Timeline
    jobs: dict[str, tuple[Arrival, Job]]
    wall_s: float
    busy_s: float
    #: The batches the runner formed, in the order they ran: the jobs of one share their dispatch time.
    batches: list[list[Job]]
    warmup_s: float
    #: Compiled graphs built during the warm-up, and the seconds of their builds (0 when eager).
    graphs: int
    compile_s: float
    #: Device seconds of one warm image of the first size, alone: what paces the arrivals.
    probe_s: float
    load: float


def _warm_ups(sizes: list[tuple[int, int]], buckets: Sequence[int], max_images: int, steps: int,
              sampler: str) -> list[GenerationRequest]:
    """The warm-up jobs, run one at a time: each size once per batch bucket a batch can reach
    (eager: one image per size), so that every UNet shape of the trace has run, and has its graph
    built when compiling."""
    counts = [b for b in buckets if b <= max_images] or [1]
    return [_request(w, h, count, steps, sampler, "warm-up", 0) for w, h in sizes for count in counts]


def _reuse_cache(data_dir: Path, cache_dir: Path) -> str:
    """Make `cache_dir` the compile cache of the Studio on `data_dir` (it is `cache_dir_in(data_dir)`,
    here a link to it), without the bench's own compile status of an earlier run: that file
    described an engine gone since, and the warm-up waits on this run's. Other models' status
    files (a bot's sharing the folder) stay, and `_graphs_built` does not read them. Returns the
    line saying how warm the cache is."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = sum(1 for _ in cache_dir.rglob("*"))
    for stale in (cache_dir / "status").glob(f"{MODEL}@*.json"):
        stale.unlink()
    data_dir.mkdir(parents=True, exist_ok=True)
    cache_dir_in(data_dir).symlink_to(cache_dir.resolve(), target_is_directory=True)
    return f"compile cache {cache_dir}: {files} files before this run ({'warm' if files else 'cold'})"


async def _graphs_built(compiling: Compiling,
                        pause: Callable[[], Awaitable[None]] = lambda: asyncio.sleep(0.5)) -> tuple[int, float]:
    """Once no graph is queued or building in the compile status the Studio's engine writes for the
    bench's model (the Studio keeps its `CompiledCall`s to itself; `atelier doctor` reads the same
    files), looking again after each `pause`: the number of graphs and their build seconds."""
    assert compiling.cache_dir is not None
    while True:
        graphs = [g for status in read_statuses(compiling.cache_dir) if status.model == MODEL for g in status.graphs]
        if not any(g.state in (State.QUEUED, State.BUILDING) for g in graphs):
            return len(graphs), sum(g.seconds or 0.0 for g in graphs)
        await pause()


async def _serve(config: AppConfig, device: str, trace: list[Arrival], warm: list[GenerationRequest],
                 compiling: Compiling | None, load: float) -> Served:
    """Run the trace through the real Studio; return what the listener saw and the device's busy
    time. `compiling` (when the UNet is compiled): wait for the warm-up's graphs, then run the
    warm-up again so that CUDA graphs are recorded before anything is timed."""
    timeline = Timeline()
    async with Studio.open(config, (device,), memory_budget(device)) as studio:
        studio.start(timeline)

        async def device_seconds(requests: list[GenerationRequest]) -> float:
            """Run `requests` one after another (one member's), until stored; the device's seconds."""
            busy = studio.busy_seconds()[device]
            for request in requests:  # one at a time: each runs in its own batch, at its own shape
                timeline.expected += 1
                timeline.all_stored.clear()
                await studio.submit(request, Requester(0, None, 0), Origin(channel_id=0))
                await timeline.all_stored.wait()
            return studio.busy_seconds()[device] - busy

        began = time.perf_counter()
        await device_seconds(warm)  # the model loads, and each shape runs once
        graphs, compile_s = 0, 0.0
        if compiling is not None:
            graphs, compile_s = await _graphs_built(compiling)
            await device_seconds(warm)  # each shape on its graph: CUDA graphs recorded
        warmup_s = time.perf_counter() - began
        probe_s = max(await device_seconds(warm[:1]), 1e-9)
        rate = warm[0].cost / probe_s  # cost units per second, one image at a time
        timeline.all_stored.clear()
        timeline.expected += len(trace)
        busy_before, jobs = studio.busy_seconds()[device], {}
        began = time.perf_counter()
        for arrival in _paced(trace, load * rate):
            await _until(began + arrival.at)
            member = arrival.member
            requester = Requester(member.user_id, member.guild_id, member.guild_id, role_names=(member.role,))
            submitted = time.perf_counter()
            job = await studio.submit(arrival.request, requester, Origin(channel_id=member.guild_id))
            timeline.submitted[job.id] = submitted
            jobs[job.id] = (arrival, job)
        await timeline.all_stored.wait()
        wall_s = max(timeline.stored_at[j] for j in jobs) - began
        busy_s = studio.busy_seconds()[device] - busy_before
    by_dispatch: dict[float, list[Job]] = {}
    for _, job in jobs.values():
        if job.started_at is not None:
            by_dispatch.setdefault(job.started_at, []).append(job)
    batches = [by_dispatch[at] for at in sorted(by_dispatch)]
    return Served(timeline, jobs, wall_s, busy_s, batches, warmup_s, graphs, compile_s, probe_s, load)


def _engine_seconds(config: AppConfig, device: str, batches: list[list[Job]], warm: list[GenerationRequest],
                    compiling: Compiling | None) -> tuple[float, int]:
    """Seconds the Engine alone takes for the same batches, after the same warm-up (model loaded,
    each shape run once; compiled: its graphs built, from the Studio run's cache, and run)."""
    def no_inputs(sha256: str) -> bytes:
        raise LookupError("the serve bench runs txt2img only")

    engine = Engine.of(config.models, config.generation, no_inputs, compiling=compiling or Compiling(when="off"))
    model = engine.load(MODEL, device)
    warm_jobs = [Job(f"warm-{i}", request, 0, None, 1.0, 0) for i, request in enumerate(warm)]
    for job in warm_jobs:
        engine.run(model, device, [job], _no_progress, _never)
    if calls := list(compiled_calls(model)):
        for call in calls:
            call.wait()
        for job in warm_jobs:
            engine.run(model, device, [job], _no_progress, _never)
    seconds = 0.0
    for batch in batches:
        began = time.perf_counter()
        engine.run(model, device, batch, _no_progress, _never)  # returns PIL images: read back, synchronised
        seconds += time.perf_counter() - began
    return seconds, len(batches)


def _report(served: Served, engine_s: float, batches: int, members: list[Member]) -> None:
    timeline = served.timeline
    done = [job_id for job_id in served.jobs if job_id not in timeline.failed]
    images = sum(timeline.images[job_id] for job_id in done)
    for job_id, error in timeline.failed.items():
        print(f"job {job_id} did not finish: {error}")
    if not images:
        print("no job was delivered: nothing to measure")
        return
    delivered_rate, engine_rate = images / served.wall_s, images / engine_s
    compiled = f", {served.graphs} graphs compiled (UNet, VAE, text) in {served.compile_s:.1f} s" if served.graphs else ""
    print(f"warm-up       {served.warmup_s:8.2f} s (the model loaded, each shape run once{compiled}); "
          f"one image alone {served.probe_s:.2f} s: the trace brings work {served.load:g}x as fast")
    print(f"delivered     {images:5d} images of {len(done)}/{len(served.jobs)} jobs in {served.wall_s:8.2f} s: "
          f"{delivered_rate:8.3f} images/s")
    print(f"engine alone  {images:5d} images in {batches} batches      in {engine_s:8.2f} s: "
          f"{engine_rate:8.3f} images/s")
    print(f"ratio         {delivered_rate / engine_rate:8.3f} (delivered / engine alone)")
    print(f"device busy   {served.busy_s / served.wall_s:8.3f} of the wall time "
          f"({served.busy_s:.2f} s in pipeline runs; the same batches alone: {engine_s:.2f} s)")
    print(f"{'class':<10} {'weight':>6} {'members':>7} {'jobs':>5} {'images':>6} | "
          f"{'wait p50':>8} {'p95':>7} | {'stored p50':>10} {'p95':>7}  (seconds from submission)")
    for role, weight, _ in CLASSES:
        ids = [job_id for job_id, (arrival, _) in served.jobs.items() if arrival.member.role == role]
        if not ids:
            continue
        waits = [timeline.started_at[j] - timeline.submitted[j] for j in ids if j in timeline.started_at]
        totals = [timeline.stored_at[j] - timeline.submitted[j] for j in ids]
        print(f"{role:<10} {weight:>6g} {sum(m.role == role for m in members):>7} {len(ids):>5} "
              f"{sum(timeline.images[j] for j in ids):>6} | "
              f"{_percentile(waits, 50):>8.2f} {_percentile(waits, 95):>7.2f} | "
              f"{_percentile(totals, 50):>10.2f} {_percentile(totals, 95):>7.2f}")


def _members(count: int, rng: random.Random) -> list[Member]:
    """`count` members spread over `SERVERS` servers, each in a class drawn by the classes' shares."""
    roles = [name for name, _, _ in CLASSES]
    shares = [share for _, _, share in CLASSES]
    return [Member(1000 + i, 1 + i % SERVERS, rng.choices(roles, shares)[0]) for i in range(count)]


def _trace(members: list[Member], jobs: int, sizes: list[tuple[int, int]], steps: list[int], counts: list[int],
           sampler: str, rng: random.Random) -> list[Arrival]:
    """`jobs` submissions of random members with random size, count and steps; `at` is a Poisson
    process of unit rate, scaled to the device by `_paced`."""
    trace, at = [], 0.0
    for i in range(jobs):
        width, height = rng.choice(sizes)
        request = _request(width, height, rng.choice(counts), rng.choice(steps), sampler, rng.choice(PROMPTS), i)
        trace.append(Arrival(at, rng.choice(members), request))
        at += rng.expovariate(1.0)
    return trace


def _paced(trace: list[Arrival], rate: float) -> list[Arrival]:
    """The trace with its arrivals scaled so that work arrives at `rate` cost units per second."""
    span = sum(a.request.cost for a in trace) / rate
    end = trace[-1].at or 1.0
    return [replace(a, at=a.at * span / end) for a in trace]


def _request(
    width: int, height: int, count: int, steps: int, sampler: str, prompt: str, seed: int
) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, negative_prompt="blurry", model=MODEL, sampler=sampler, steps=steps,
                             guidance=7.0, seed=seed, width=width, height=height, count=count)


def _random_checkpoint(family: Family, folder: Path, device: torch.device, seed: int) -> Path:
    """A checkpoint of `family` with random weights, in the original single-file layout (the
    network's parameter names are the original keys), stored in float16 as released files are."""
    with torch.device("meta"):
        network = StableDiffusion(family)
    randomise(network, device, torch.float16, seed)
    path = folder / f"random-{family.name}.safetensors"
    weights = {key: tensor.cpu().contiguous() for key, tensor in network.state_dict().items()}
    safetensors.torch.save_file(weights, path)
    return path


def _sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for size in text.split(","):
        width, _, height = size.strip().partition("x")
        if not (width.isdigit() and height.isdigit()) or int(width) % 8 or int(height) % 8:
            raise ValueError(f"--sizes: {size!r} is not WxH with sides multiple of 8, e.g. 512x768")
        sizes.append((int(width), int(height)))
    return sizes


def _format_sizes(sizes: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"{w}x{h}" for w, h in sizes)


def _numbers(text: str, option: str) -> list[int]:
    values = [v.strip() for v in text.split(",")]
    if not all(v.isdigit() and int(v) > 0 for v in values):
        raise ValueError(f"{option}: {text!r} is not a comma-separated list of positive whole numbers")
    return [int(v) for v in values]


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; nan without values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def _until(moment: float) -> None:
    if (delay := moment - time.perf_counter()) > 0:
        await asyncio.sleep(delay)


def _no_progress(job_id: str, step: int, total: int, preview: Any) -> None:
    pass


def _never(job_id: str) -> bool:
    return False
