"""`atelier bench serve` end to end on the CPU with a tiny random-weight checkpoint: every job of the
trace is delivered and the printed figures agree with each other."""

from __future__ import annotations

import re

import pytest

from bot.cli import main as cli
from bot.serve_bench import CLASSES, _graphs_built, _members, _paced, _reuse_cache, _trace, _warm_ups
from generation.compiled import CompileStatus, Compiling, GraphStatus, State, cache_dir_in, read_statuses, write_status

TINY_RUN = ["--members", "4", "--jobs", "6", "--steps", "2", "--counts", "1,2", "--sizes", "64x64,64x80", "--seed", "3"]


def figure(output: str, pattern: str) -> tuple[float, ...]:
    match = re.search(pattern, output)
    assert match is not None, f"{pattern!r} not in the output:\n{output}"
    return tuple(float(group) for group in match.groups())


@pytest.mark.parametrize("compile_option", [[], ["--compile", "auto"]])  # auto: eager on the CPU, as the bot
def test_the_serve_bench_delivers_every_job_and_prints_consistent_figures(
    compile_option: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["bench", "serve", *TINY_RUN, *compile_option]) == 0
    output = capsys.readouterr().out
    assert ", UNet eager\n" in output and "graphs compiled" not in output
    images, done, jobs, wall, rate = figure(
        output, r"delivered +(\d+) images of (\d+)/(\d+) jobs in +([\d.]+) s: +([\d.]+) images/s")
    assert done == jobs == 6 and images >= 6
    engine_images, batches, engine_s, engine_rate = figure(
        output, r"engine alone +(\d+) images in (\d+) batches +in +([\d.]+) s: +([\d.]+) images/s")
    assert engine_images == images and 1 <= batches <= jobs
    assert rate == pytest.approx(images / wall, rel=0.01) and engine_rate == pytest.approx(images / engine_s, rel=0.01)
    (ratio,) = figure(output, r"ratio +([\d.]+) \(delivered / engine alone\)")
    assert 0 < ratio <= 1.5 and ratio == pytest.approx(rate / engine_rate, abs=0.002)
    busy, busy_s = figure(output, r"device busy +([\d.]+) of the wall time \(([\d.]+) s in pipeline runs")
    assert 0 < busy <= 1 and busy == pytest.approx(busy_s / wall, abs=0.02)  # both printed rounded
    rows = re.findall(r"^(member|supporter|patron) +[\d.]+ +\d+ +(\d+) +(\d+) \|", output, re.MULTILINE)
    assert rows and sum(int(jobs) for _, jobs, _ in rows) == 6 and sum(int(n) for _, _, n in rows) == images


@pytest.mark.parametrize(("options", "message"), [
    (["--sizes", "512by512"], "'512by512' is not WxH with sides multiple of 8"),
    (["--steps", "20,x"], "--steps: '20,x' is not a comma-separated list of positive whole numbers"),
    (["--device", "gpu"], "'gpu' is not a device; allowed: cpu, cuda, cuda:N"),
    (["--load", "0"], "--load must be above 0, got 0"),
    (["--checkpoint", "/nowhere/model.safetensors"], "/nowhere/model.safetensors is not a file"),
    (["--cache-dir", "/tmp"], "--cache-dir: only with --compile auto (an eager UNet compiles nothing)"),
    (["--compile", "auto", "--cache-dir", "/dev/null"], "--cache-dir: /dev/null is not a folder"),
])
def test_bad_options_are_refused_with_what_is_allowed(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        cli(["bench", "serve", *options])
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_the_trace_mixes_classes_sizes_and_counts_and_arrives_at_the_rate_asked() -> None:
    import random

    members = _members(20, random.Random(0))
    assert {m.guild_id for m in members} == {1, 2, 3} and {m.role for m in members} == {c[0] for c in CLASSES}
    trace = _trace(members, 200, [(512, 512), (512, 768)], [20, 25], [1, 2, 4], "euler", random.Random(1))
    assert [a.at for a in trace] == sorted(a.at for a in trace)
    assert {(a.request.width, a.request.height) for a in trace} == {(512, 512), (512, 768)}
    assert {a.request.count for a in trace} == {1, 2, 4} and {a.request.steps for a in trace} == {20, 25}
    rate = 10.0  # cost units per second
    paced = _paced(trace, rate)
    assert paced[-1].at == pytest.approx(sum(a.request.cost for a in trace) / rate)
    assert [a.request for a in paced] == [a.request for a in trace]


def test_compiled_warm_up_runs_every_size_at_every_reachable_bucket_and_eager_once_per_size() -> None:
    sizes = [(512, 512), (512, 768)]
    compiled = _warm_ups(sizes, (1, 2, 4, 8), 4, 20, "euler")
    assert [(r.width, r.height, r.count) for r in compiled] == [
        (512, 512, 1), (512, 512, 2), (512, 512, 4), (512, 768, 1), (512, 768, 2), (512, 768, 4)]
    assert [(r.width, r.height, r.count) for r in _warm_ups(sizes, (1,), 8, 20, "euler")] == [
        (512, 512, 1), (512, 768, 1)]
    assert {r.steps for r in compiled} == {20} and {r.sampler for r in compiled} == {"euler"}


async def test_the_studio_run_waits_until_no_graph_is_queued_or_building(tmp_path) -> None:
    def status(*states: State) -> None:
        graphs = tuple(GraphStatus(f"key {i}", state, 2.5 if state is State.READY else None, None)
                       for i, state in enumerate(states))
        write_status(tmp_path, CompileStatus("bench", "cuda:0", "reduce-overhead", graphs))

    # what the engine's builder writes between two looks; a failed build runs eagerly: not waited for
    later = [(State.READY, State.READY, State.BUILDING), (State.READY, State.READY, State.FAILED)]
    pauses = []

    async def pause() -> None:
        pauses.append(len(later))
        status(*later.pop(0))

    status(State.READY, State.BUILDING, State.QUEUED)
    assert await _graphs_built(Compiling(cache_dir=tmp_path), pause) == (3, 5.0)
    assert pauses == [2, 1] and not later


async def test_a_reused_cache_is_the_studios_without_the_stale_status_of_an_earlier_run(tmp_path) -> None:
    """`--cache-dir`: the folder becomes the Studio's compile cache (inductor's code found there);
    the bench's own status of an earlier run (a graph it left building, which would be waited for
    forever) is gone, another model's (a bot's sharing the folder) stays and is not waited for;
    the folder outlives the run's temporary one."""
    cache, data = tmp_path / "engine-cache", tmp_path / "run" / "data"
    (cache / "fxgraph").mkdir(parents=True)
    (cache / "fxgraph" / "entry").write_text("compiled code")
    building = (GraphStatus("key 0", State.BUILDING, None, None),)
    write_status(cache, CompileStatus("bench", "cuda:0", "reduce-overhead", building))
    write_status(cache, CompileStatus("sd15", "cuda:0", "reduce-overhead", building))

    assert _reuse_cache(data, cache) == f"compile cache {cache}: 5 files before this run (warm)"
    assert (cache_dir_in(data) / "fxgraph" / "entry").read_text() == "compiled code"
    assert [s.model for s in read_statuses(cache)] == ["sd15"]

    async def pause() -> None:
        raise AssertionError("waited for a graph of another model")

    assert await _graphs_built(Compiling(cache_dir=cache_dir_in(data)), pause) == (0, 0.0)
    ready = (GraphStatus("key 0", State.READY, 4.0, None),)
    write_status(cache_dir_in(data), CompileStatus("bench", "cuda:0", "reduce-overhead", ready))
    assert await _graphs_built(Compiling(cache_dir=cache_dir_in(data)), pause) == (1, 4.0)
    assert _reuse_cache(tmp_path / "cold" / "data", tmp_path / "new").endswith(": 0 files before this run (cold)")


def test_the_serve_bench_reuses_a_cache_dir_and_leaves_it_in_place(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    (cache / "fxgraph").mkdir(parents=True)
    (cache / "fxgraph" / "entry").write_text("compiled code")
    assert cli(["bench", "serve", *TINY_RUN, "--jobs", "2", "--compile", "auto", "--cache-dir", str(cache)]) == 0
    assert f"compile cache {cache}: 2 files before this run (warm)\n" in capsys.readouterr().out
    assert (cache / "fxgraph" / "entry").read_text() == "compiled code"  # the link went with the run, not this
