"""generation/compiled.py: graphs per shape key, batch buckets, background builds with the eager
UNet meanwhile, failures that fall back to eager for good, thread safety, warm-up and its status;
the real inductor on the CPU gives the eager UNet's output; and the half-precision VAE decode
with its float32 re-decode of images that overflow."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from generation.compiled import (
    Bucketing,
    CompiledCall,
    Compiling,
    State,
    compiled_calls,
    read_statuses,
    text_key,
    torch_compiler,
    unet_key,
    vae_key,
)
from generation import sdxl
from generation.engine import Engine
from generation.pipeline import LoadedModel, decode, load_model, sample_latents, txt2img
from generation.request import GenerationRequest
from generation.settings import GenerationSettings, ModelSettings
from generation.step_cache import UNetCalls
from tests.fixtures.checkpoints import TinyCheckpoints, TinySDXL, tiny_checkpoints, tiny_sdxl  # noqa: F401
from tests.fixtures.devices import StandInDevice, on_stand_in_device

CPU = torch.device("cpu")


class RowwiseUNet(nn.Module):
    """A stand-in UNet whose every output row depends on its own input row only, as the real one's."""

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        out = x[:, :4] * t.view(-1, 1, 1, 1) + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return out if y is None else out + y.view(-1, 1, 1, 1)


class StandInCompiler:
    """Records each compile and each call of a compiled graph (its rows); optionally fails."""

    def __init__(self, fail_compile: bool = False, fail_call: bool = False, gate: threading.Event | None = None):
        self.compiled = 0
        self.rows: list[int] = []
        self.fail_compile, self.fail_call, self.gate = fail_compile, fail_call, gate
        self.lock = threading.Lock()

    def __call__(self, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if self.gate is not None:
            assert self.gate.wait(120), "the test never let the build finish"
        with self.lock:
            self.compiled += 1
        if self.fail_compile:
            raise RuntimeError("stand-in compile error")
        warmed = []

        def graph(*args: object) -> Tensor:
            if warmed and self.fail_call:
                raise RuntimeError("stand-in graph error")
            warmed.append(True)
            with self.lock:
                self.rows.append(args[0].shape[0])
            return fn(*args)

        return graph


def inputs(rows: int, side: int = 4, tokens: int = 3, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, side, side, generator=g), torch.rand(rows, generator=g) * 999,
            torch.randn(rows, tokens, 8, generator=g))


def compiled(compiler: StandInCompiler, bucketing: Bucketing = Bucketing(), **kwargs) -> CompiledCall:
    return CompiledCall(RowwiseUNet(), compiler, model="m", device=CPU, mode="default", bucketing=bucketing, **kwargs)


def test_a_new_shape_runs_eagerly_then_on_its_bucket_graph_with_padding_sliced_off() -> None:
    compiler = StandInCompiler()
    unet = compiled(compiler, Bucketing("buckets", (1, 2, 4)))
    x, t, context = inputs(3)
    expected = RowwiseUNet()(x, t, context)

    first = unet(x, t, context)  # no graph yet: eager, its build queued
    unet.wait()
    assert compiler.rows == [4]  # the build's warm-up call on dummies of the padded key
    second = unet(x, t, context)
    assert compiler.rows == [4, 4] and second.shape == expected.shape
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)

    unet(*inputs(4, seed=1))  # the same bucket: no new graph
    unet(*inputs(5))  # 5 rows -> 8 (twice the bucket 4)
    unet(*inputs(9))  # beyond every bucket: its own graph of 9 rows
    unet(*inputs(4, side=8))  # another latent size, another graph
    unet(*inputs(4, tokens=5))  # another text length, another graph
    unet.wait()
    status = unet.status()
    assert compiler.compiled == 5 and status.count(State.READY) == 5
    assert [g.key for g in status.graphs] == [
        "4 rows x 4 x 4x4 latent, 3 tokens", "8 rows x 4 x 4x4 latent, 3 tokens", "9 rows x 4 x 4x4 latent, 3 tokens",
        "4 rows x 4 x 8x8 latent, 3 tokens", "4 rows x 4 x 4x4 latent, 5 tokens"]


def test_shapes_past_the_graph_limit_run_eagerly_for_good(caplog: pytest.LogCaptureFixture) -> None:
    compiler = StandInCompiler()
    unet = CompiledCall(RowwiseUNet(), compiler, model="m", device=CPU, bucketing=Bucketing("exact"), max_graphs=2)
    with caplog.at_level(logging.INFO, logger="generation.compiled"):
        for rows in (1, 2, 3, 3, 1):
            x, t, context = inputs(rows)
            torch.testing.assert_close(unet(x, t, context), RowwiseUNet()(x, t, context))
            unet.wait()
    assert [g.state for g in unet.status().graphs] == [State.READY, State.READY, State.SKIPPED]
    assert compiler.rows == [1, 2, 1] and caplog.text.count("the most allowed") == 1


def test_the_builder_thread_is_a_daemon_that_ends_with_its_model() -> None:
    """A stop never waits for queued compiles, and an unloaded model's thread goes with it."""
    unet = CompiledCall(RowwiseUNet(), StandInCompiler(), model="unloaded", device=CPU)
    unet(*inputs(2))
    unet.wait()
    (thread,) = [t for t in threading.enumerate() if t.name == "compile unet unloaded"]
    assert thread.daemon
    del unet
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


def test_bucket_rows_and_exact_rows() -> None:
    buckets = Bucketing("buckets", (1, 2, 4, 8))
    assert buckets.row_buckets() == [1, 2, 4, 8, 16]
    assert [buckets.rows(n) for n in (1, 2, 3, 5, 6, 9, 16, 17)] == [1, 2, 4, 8, 8, 16, 16, 17]
    assert Bucketing("buckets", (3,)).row_buckets() == [3, 6]
    assert [Bucketing("exact").rows(n) for n in (1, 3, 6, 17)] == [1, 3, 6, 17]


def test_exact_batches_build_one_graph_per_row_count_and_labels_are_part_of_the_key() -> None:
    compiler = StandInCompiler()
    unet = compiled(compiler, Bucketing("exact"))
    x, t, context = inputs(3)
    labels = torch.arange(3, dtype=torch.long)
    for _ in range(2):
        unet(x, t, context)
        unet(x, t, context, labels)
        unet.wait()
    assert compiler.rows == [3, 3, 3, 3] and compiler.compiled == 2
    assert [g.key for g in unet.status().graphs] == ["3 rows x 4 x 4x4 latent, 3 tokens",
                                                     "3 rows x 4 x 4x4 latent, 3 tokens, labels"]
    torch.testing.assert_close(unet(x, t, context, labels), RowwiseUNet()(x, t, context, labels))


def test_jobs_never_wait_for_a_build() -> None:
    gate = threading.Event()
    compiler = StandInCompiler(gate=gate)
    unet = compiled(compiler)
    x, t, context = inputs(2)
    try:
        for _ in range(3):  # the build is stuck in the compiler: every call runs eagerly meanwhile
            torch.testing.assert_close(unet(x, t, context), RowwiseUNet()(x, t, context))
        assert compiler.rows == [] and unet.status().graphs[0].state in (State.QUEUED, State.BUILDING)
    finally:
        gate.set()
    unet.wait()
    unet(x, t, context)
    assert compiler.rows == [2, 2]


def test_a_failed_compile_is_logged_and_its_key_runs_eagerly_for_good(caplog: pytest.LogCaptureFixture) -> None:
    compiler = StandInCompiler(fail_compile=True)
    unet = compiled(compiler)
    x, t, context = inputs(2)
    with caplog.at_level(logging.WARNING, logger="generation.compiled"):
        for _ in range(3):
            torch.testing.assert_close(unet(x, t, context), RowwiseUNet()(x, t, context))
            unet.wait()
    assert compiler.compiled == 1  # never retried
    (graph,) = unet.status().graphs
    assert graph.state is State.FAILED and "stand-in compile error" in graph.error
    assert "runs eagerly" in caplog.text and "stand-in compile error" in caplog.text


def test_a_graph_that_fails_when_called_falls_back_to_eager_for_that_call_and_after(
        caplog: pytest.LogCaptureFixture) -> None:
    compiler = StandInCompiler(fail_call=True)
    unet = compiled(compiler)
    x, t, context = inputs(2)
    unet(x, t, context)
    unet.wait()
    with caplog.at_level(logging.WARNING, logger="generation.compiled"):
        torch.testing.assert_close(unet(x, t, context), RowwiseUNet()(x, t, context))  # the job is unaffected
        torch.testing.assert_close(unet(x, t, context), RowwiseUNet()(x, t, context))
    assert compiler.rows == [2] and unet.status().graphs[0].state is State.FAILED
    assert "running it eagerly from now on" in caplog.text


def test_out_of_memory_in_a_graph_reaches_the_runner() -> None:
    def compiler(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        calls = []

        def graph(*args: Tensor | None) -> Tensor:
            calls.append(1)
            if len(calls) > 1:
                raise torch.OutOfMemoryError("stand-in out of memory")
            return fn(*args)

        return graph

    unet = CompiledCall(RowwiseUNet(), compiler, model="m", device=CPU)
    unet(*inputs(2))
    unet.wait()
    with pytest.raises(torch.OutOfMemoryError):
        unet(*inputs(2))  # the runner splits the batch; the graph stays
    assert unet.status().graphs[0].state is State.READY


def test_concurrent_calls_build_each_key_once_and_get_their_own_rows() -> None:
    compiler = StandInCompiler()
    unet = compiled(compiler, Bucketing("buckets", (1, 2, 4)))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(20):
                rows = 1 + (seed + i) % 8
                x, t, context = inputs(rows, seed=seed * 100 + i)
                torch.testing.assert_close(unet(x, t, context), RowwiseUNet()(x, t, context), rtol=0, atol=0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    unet.wait()
    assert errors == []
    assert compiler.compiled == len(unet.status().graphs) == 4  # rows 1..8 -> graphs of 1, 2, 4 and 8 rows


def test_compile_mode_per_device() -> None:
    cuda, meta = torch.device("cuda"), torch.device("meta")
    assert Compiling("auto").mode_on(CPU) is None and Compiling("auto").mode_on(cuda) == "reduce-overhead"
    assert Compiling("on", "max-autotune").mode_on(cuda) == "max-autotune"
    assert Compiling("on", "max-autotune").mode_on(CPU) == Compiling("on").mode_on(meta) == "default"
    assert Compiling("off").mode_on(cuda) is None
    # The VAE never replays CUDA graphs; the text towers keep the setting's.
    assert Compiling("auto").mode_on(cuda, "vae") == "default"
    assert Compiling("auto").mode_on(cuda, "text") == "reduce-overhead"
    assert Compiling("on", "max-autotune").mode_on(cuda, "vae") == "max-autotune-no-cudagraphs"
    assert Compiling("on", "default").mode_on(cuda, "vae") == Compiling("on").mode_on(CPU, "vae") == "default"
    assert Compiling("on", parts=("unet", "text")).mode_on(cuda, "vae") is None
    settings = GenerationSettings(compile="on", compile_batches="exact", compile_buckets=(4, 1, 4),
                                  compile_warmup=("1:1", "16:9"))
    assert Compiling.of(settings, None) == Compiling("on", "reduce-overhead", Bucketing("exact", (1, 4)), ("1:1", "16:9"), 32,
                                                     text_warmup=True)
    assert Compiling.of(GenerationSettings(compile_parts=("text", "unet", "text")), None).parts == ("text", "unet")
    with pytest.raises(ValueError, match="compile_parts"):
        GenerationSettings(compile_parts=("unet", "clip"))
    with pytest.raises(ValueError, match="unknown aspect '5:4'; allowed: 1:1, 2:3"):
        GenerationSettings(compile_warmup=("5:4",))
    with pytest.raises(ValueError, match="compile_buckets must be image counts >= 1"):
        GenerationSettings(compile_buckets=(0, 2))


def engine_with(checkpoints: TinyCheckpoints, compiling: Compiling, dtype: str = "float32", **kwargs) -> Engine:
    path, yaml_path = checkpoints.get("sd1")
    return Engine([ModelSettings(name="tiny", checkpoint=path, config=yaml_path)], dtype,
                  {}.__getitem__, compiling=compiling, **kwargs)


def request(**changes: object) -> GenerationRequest:
    values = dict(prompt="a red fox", negative_prompt="blurry", model="tiny", sampler="dpmpp_2m_karras", steps=4,
                  guidance=5.0, seed=7, width=64, height=64, count=3)
    return GenerationRequest(**values | changes)


def per_part(compilers: list[StandInCompiler], gate: threading.Event | None = None) -> Callable[[str], StandInCompiler]:
    """A compiler factory that hands each part its own stand-in (in the order `Compiling.compile`
    asks: UNet, VAE, text towers), kept in `compilers`."""
    def make(mode: str) -> StandInCompiler:
        compilers.append(StandInCompiler(gate=gate))
        return compilers[-1]

    return make


def wait_all(model: LoadedModel) -> dict[str, CompiledCall]:
    calls = {call.status().part: call for call in compiled_calls(model)}
    for call in calls.values():
        call.wait()
    return calls


def test_engine_warms_the_aspect_presets_up_at_load_and_writes_the_status(
        tiny_checkpoints: TinyCheckpoints, tmp_path: Path, caplog: pytest.LogCaptureFixture,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "restored after the test")
    compilers: list[StandInCompiler] = []
    compiling = Compiling("on", bucketing=Bucketing("buckets", (1, 4)), warmup=("1:1", "16:9"), cache_dir=tmp_path,
                          compiler=per_part(compilers))
    with caplog.at_level(logging.INFO, logger="generation.compiled"):
        model = engine_with(tiny_checkpoints, compiling).load("tiny", "cpu")
        assert isinstance(model.unet, CompiledCall) and isinstance(model.vae_decode, CompiledCall)
        calls = wait_all(model)
    assert list(calls) == ["unet", "vae", "text"]
    assert len({id(call._builder) for call in calls.values()}) == 1  # one build at a time for the model
    # Native 128 px, a VAE of factor 2: 1:1 is 128x128 (64x64 latents), 16:9 is 192x128 (64x96);
    # guided rows: twice 1 and 4 images; 77 tokens of width 32. The VAE decodes images: 1 and 4
    # rows; the text tower one chunk of prompts and negative prompts: 2 and 8 rows.
    sizes = ("64x64", "64x96")
    assert [g.key for g in calls["unet"].status().graphs] == [
        f"{rows} rows x 4 x {size} latent, 77 tokens" for size in sizes for rows in (2, 8)]
    assert [g.key for g in calls["vae"].status().graphs] == [
        f"{rows} rows x 4 x {size} latent" for size in sizes for rows in (1, 4)]
    assert [g.key for g in calls["text"].status().graphs] == ["2 rows x 77 tokens", "8 rows x 77 tokens"]
    assert [c.rows for c in compilers] == [[2, 8, 2, 8], [1, 4, 1, 4], [2, 8]]
    assert "warm-up 4/4: the unet of tiny ready for 8 rows x 4 x 64x96 latent" in caplog.text
    assert "warm-up 4/4: the vae of tiny ready for 4 rows x 4 x 64x96 latent" in caplog.text
    statuses = {status.part: status for status in read_statuses(tmp_path)}
    assert statuses == {part: call.status() for part, call in calls.items()}
    assert {(s.model, s.device, s.mode) for s in statuses.values()} == {("tiny", "cpu", "default")}
    assert [statuses[part].count(State.READY) for part in ("unet", "vae", "text")] == [4, 4, 2]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path.resolve())  # inductor's cache: a warm restart
    path, yaml_path = tiny_checkpoints.get("x4-upscaler")
    upscaler = Engine([ModelSettings(name="x4", checkpoint=path, config=yaml_path)], "float32", {}.__getitem__,
                      compiling=compiling).load("x4", "cpu")
    assert [list(call.status().graphs) for call in wait_all(upscaler).values()] == [[], [], []]  # its inputs' sizes
    only = engine_with(tiny_checkpoints, dataclasses.replace(compiling, parts=("vae",))).load("tiny", "cpu")
    assert only.unet is None and [c.status().part for c in compiled_calls(only)] == ["vae"]
    # Without aspects (a bench warming its own sizes) the engine's settings still warm the text rows.
    texts = engine_with(tiny_checkpoints, dataclasses.replace(compiling, warmup=(), text_warmup=True)).load("tiny", "cpu")
    assert {part: [g.key for g in call.status().graphs] for part, call in wait_all(texts).items()} == {
        "unet": [], "vae": [], "text": ["2 rows x 77 tokens", "8 rows x 77 tokens"]}


def test_txt2img_through_bucket_graphs_of_every_part_gives_the_eager_images(
        tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    """3 images, guided: 6 UNet rows padded to a graph of 8, 3 decodes to a graph of 4, the prompt
    and its negative a text graph of 2 rows (the stand-in compilers run the real modules)."""
    gate = threading.Event()
    compilers: list[StandInCompiler] = []
    compiling = Compiling("on", bucketing=Bucketing("buckets", (1, 2, 4)), compiler=per_part(compilers, gate))
    eager = engine_with(tiny_checkpoints, Compiling("off")).load("tiny", "cpu")
    model = engine_with(tiny_checkpoints, compiling).load("tiny", "cpu")
    assert eager.unet is None and eager.vae_decode is None and list(compiled_calls(eager)) == []
    expected = txt2img(eager, [request()])
    txt2img(model, [request()])  # eager, while the graphs build
    gate.set()
    wait_all(model)
    got = txt2img(model, [request()])
    # each build's warm-up call, then the calls: the UNet's one per step
    assert [c.rows for c in compilers] == [[8] * (1 + 4), [4, 4], [2, 2]]
    for a, b in zip(expected[0], got[0], strict=True):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


def test_sdxl_towers_and_the_pooled_output_run_their_own_graphs(tiny_sdxl: TinySDXL) -> None:  # noqa: F811
    """Both towers' calls of one SDXL prompt, the bigG one's giving its pooled output too, go
    through compiled calls replaced on the tower instances (stand-in compilers run the real
    modules); the conditioning and a whole txt2img run through every part's graphs are the eager
    ones."""
    path, yaml_path = tiny_sdxl.get("sdxl")
    settings = ModelSettings(name="xl", checkpoint=path, config=yaml_path)
    eager, model = (load_model(settings, CPU, torch.float32) for _ in range(2))
    compilers: list[StandInCompiler] = []
    model = Compiling("on", compiler=per_part(compilers)).compile(model)
    calls = {call.status().part: call for call in compiled_calls(model)}
    assert list(calls) == ["unet", "vae", "text 1", "text 2"]  # CLIP-L's forward, bigG's forward_pooled
    per_image = [request(model="xl", count=1, negative_prompt="")]
    for _ in range(2):  # eager while building, then the graphs
        with torch.inference_mode():
            got = sdxl.encode_conditioning(model.network, per_image, CPU, (64, 64))
        wait_all(model)
    with torch.inference_mode():
        expected = sdxl.encode_conditioning(eager.network, per_image, CPU, (64, 64))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for part in ("text 1", "text 2"):
        assert [g.key for g in calls[part].status().graphs] == ["2 rows x 77 tokens"]
    req = request(model="xl", count=1, steps=2, width=64, height=64)
    txt2img(model, [req])  # the UNet's and the VAE's graphs build meanwhile
    wait_all(model)
    calls_before = [len(c.rows) for c in compilers]
    got_images, expected_images = txt2img(model, [req])[0], txt2img(eager, [req])[0]
    # every part's graph ran
    assert all(len(c.rows) > before for c, before in zip(compilers, calls_before, strict=True))
    assert all(c.status().count(State.READY) == len(c.status().graphs) for c in calls.values())
    for a, b in zip(expected_images, got_images, strict=True):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


def test_padding_rows_cannot_change_the_real_rows_of_the_real_unet(tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    model = engine_with(tiny_checkpoints, Compiling("off")).load("tiny", "cpu")
    unet = model.network.unet
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(3, 4, 16, 16, generator=g), torch.tensor([999.0, 500.0, 3.0]), torch.randn(3, 77, 32, generator=g)
    garbage = (torch.randn(1, 4, 16, 16, generator=g) * 100, torch.tensor([1.0]), torch.randn(1, 77, 32, generator=g) * 100)
    with torch.inference_mode():
        alone = unet(x, t, context)
        padded = unet(*(torch.cat([v, w]) for v, w in zip((x, t, context), garbage, strict=True)))[:3]
        through = CompiledCall(unet, lambda fn: fn, model="tiny", device=CPU, bucketing=Bucketing("buckets", (2,)))
        through(x, t, context)
        through.wait()
        bucketed = through(x, t, context)  # 3 rows run as 4, the last repeated
    # Whatever the 4th row holds, the real rows are the same to the bit; against the 3-row batch
    # they differ by kernel rounding only (other batch sizes may take other kernels).
    torch.testing.assert_close(padded, bucketed, rtol=0, atol=0)
    torch.testing.assert_close(bucketed, alone, rtol=0, atol=1e-5)


def test_compiled_steps_on_the_stand_in_device_never_wait_on_it(tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    """As tests/test_pipeline.py checks the eager path: with ready graphs of every part (padding
    included), nothing is read back or copied over between the first step and the last."""
    path, yaml_path = tiny_checkpoints.get("sd1")
    model = on_stand_in_device(load_model(ModelSettings(name="tiny", checkpoint=path, config=yaml_path), CPU,
                                          torch.float16))
    model = Compiling("on", compiler=lambda mode: StandInCompiler()).compile(model)
    req = request(steps=6)
    model.unet.warm_up([unet_key(8, 4, (32, 32), 77, 32, torch.float16)])
    model.vae_decode.warm_up([vae_key(4, 4, (32, 32), torch.float32)])  # 3 images in the graph of 4
    model.network.text_encoder.forward.warm_up([text_key(2)])
    calls = wait_all(model)
    assert [call.status().count(State.READY) for call in calls.values()] == [1, 1, 1]
    crossings_at_step: list[int] = []
    with StandInDevice() as device:
        (images,) = txt2img(model, [req], lambda step, total, x0: crossings_at_step.append(len(device.traffic)))
    assert len(images) == 3 and len(crossings_at_step) == 6
    assert device.traffic[crossings_at_step[0]:crossings_at_step[-1]] == []
    assert [len(call.status().graphs) for call in calls.values()] == [1, 1, 1]  # every call ran on its graph


def test_the_real_inductor_compiles_the_tiny_unet_and_a_txt2img_run_equals_eager(
        tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    """One inductor compile (tens of seconds on two cores): the graph's output equals the eager
    UNet's within 1e-5 in float32, and the whole run's images equal the eager run's."""
    eager = engine_with(tiny_checkpoints, Compiling("off")).load("tiny", "cpu")
    model = dataclasses.replace(eager, unet=CompiledCall(UNetCalls(eager.network.unet), torch_compiler("default"),
                                                         model="tiny", device=CPU, mode="default"))
    req = request(count=1, steps=3)
    key = unet_key(2, 4, (32, 32), 77, 32, torch.float32)
    model.unet.warm_up([key])
    model.unet.wait()
    assert model.unet.status().count(State.READY) == 1
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([999.0, 10.5]), torch.randn(2, 77, 32, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(model.unet(x, t, context), eager.network.unet(x, t, context), rtol=0, atol=1e-5)
    for a, b in zip(txt2img(eager, [req])[0], txt2img(model, [req])[0], strict=True):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


def test_the_real_inductor_compiles_the_tiny_vae_decoder_and_text_tower_equal_to_eager(
        tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    """Two small inductor compiles (the tiniest shapes, the UNet test's cache): the VAE decode of
    one 8x8 latent and the text tower on one chunk equal the eager modules within 1e-5 in float32;
    the CLIP tower's textual-inversion calls run eagerly (its embeddings go in through a hook
    registered per call, which dynamo cannot trace) and give the eager result."""
    eager = engine_with(tiny_checkpoints, Compiling("off")).load("tiny", "cpu")
    compiling = Compiling("on", parts=("vae", "text"), compiler=torch_compiler)
    model = engine_with(tiny_checkpoints, compiling).load("tiny", "cpu")
    tower, eager_tower = model.network.text_encoder, eager.network.text_encoder
    model.vae_decode.warm_up([vae_key(1, 4, (8, 8), torch.float32)])
    tower.forward.warm_up([text_key(1)])
    calls = wait_all(model)
    assert [call.status().count(State.READY) for call in calls.values()] == [1, 1], [c.status() for c in calls.values()]
    g = torch.Generator().manual_seed(0)
    z, tokens = torch.randn(1, 4, 8, 8, generator=g), torch.randint(0, 1000, (1, 77), generator=g)
    embeds = eager_tower.embed_tokens(tokens) + 0.5
    with torch.inference_mode():
        torch.testing.assert_close(model.vae_decode(z), eager.network.vae.decode(z), rtol=0, atol=1e-5)
        torch.testing.assert_close(tower(tokens), eager_tower(tokens), rtol=0, atol=1e-5)
        torch.testing.assert_close(tower(tokens, embeds), eager_tower(tokens, embeds), rtol=0, atol=0)
    assert [len(call.status().graphs) for call in calls.values()] == [1, 1]  # no graph for the embeddings


def tiny_vae_model(checkpoints: TinyCheckpoints, vae_dtype: torch.dtype) -> LoadedModel:
    path, yaml_path = checkpoints.get("sd1")
    return load_model(ModelSettings(name="tiny", checkpoint=path, config=yaml_path), CPU, torch.float32,
                      vae_dtype=vae_dtype)


def test_half_vae_decode_redecodes_only_overflowed_images_in_float32(tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    """post_quant_conv scaled so that a latent of unit size overflows float16 (65504) while a
    zero latent does not: that image alone is decoded again by the float32 VAE, to the bit."""
    half = tiny_vae_model(tiny_checkpoints, torch.float16)
    full = tiny_vae_model(tiny_checkpoints, torch.float32)
    assert full.vae_decoder is None and half.vae_decoder is not None
    for model in (half, full):
        with torch.no_grad():
            model.network.vae.post_quant_conv.weight.mul_(2e4)
    with torch.no_grad():
        half.vae_decoder[0].weight.copy_(half.network.vae.post_quant_conv.weight.half())
    latents = torch.cat([torch.zeros(1, 4, 8, 8), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))])
    float32_rows: list[int] = []
    half.network.vae.decoder.register_forward_pre_hook(lambda module, args: float32_rows.append(args[0].shape[0]))
    with torch.inference_mode():
        assert not torch.isfinite(half.vae_decoder(latents[1:].half() / 0.18215)).all()  # the crafted overflow
        got, expected = decode(half, latents), decode(full, latents)
    assert float32_rows == [1]  # the overflowed image only
    assert np.array_equal(np.asarray(got[1]), np.asarray(expected[1]))
    assert np.abs(np.asarray(got[0]).astype(int) - np.asarray(expected[0]).astype(int)).max() <= 2


def test_half_vae_decode_is_close_to_float32_and_the_float32_path_is_the_vaes_own(
        tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    half = tiny_vae_model(tiny_checkpoints, torch.float16)
    full = tiny_vae_model(tiny_checkpoints, torch.float32)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        own = full.network.vae.decode(latents / full.network.family.scale_factor)
        got, expected = decode(half, latents), decode(full, latents)
    reference = ((own + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert all(np.array_equal(np.asarray(image), pixels) for image, pixels in zip(expected, reference, strict=True))
    for a, b in zip(got, expected, strict=True):
        difference = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
        assert difference.max() <= 3 and difference.mean() < 0.5


def test_engine_vae_dtype_adds_the_half_decoder_and_counts_its_bytes(tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    auto = engine_with(tiny_checkpoints, Compiling()).load("tiny", "cpu")  # "auto": float32 on the CPU
    half = engine_with(tiny_checkpoints, Compiling(), vae_dtype="float16").load("tiny", "cpu")
    assert auto.vae_decoder is None and auto.unet is None
    assert next(half.vae_decoder.parameters()).dtype == torch.float16
    decoder_bytes = sum(p.numel() * 2 for p in half.vae_decoder.parameters())
    assert Engine.size(half) == Engine.size(auto) + decoder_bytes


def test_doctor_shows_the_setting_and_each_models_graphs_of_every_part(tmp_path: Path) -> None:
    from bot.config import load_config
    from bot.doctor import format_checks, run_checks
    from generation.compiled import CompileStatus, GraphStatus, cache_dir_in, write_status

    config_path = tmp_path / "atelier.toml"
    config_path.write_text('[generation]\ndevice = "cpu"\ncompile_warmup = ["1:1", "16:9"]\n'
                           '[storage]\ndata_dir = "state"\n')
    config = load_config(config_path)
    graphs = (GraphStatus("2 rows", State.READY, 61.0, None), GraphStatus("8 rows", State.BUILDING, None, None),
              GraphStatus("16 rows", State.FAILED, None, "RuntimeError('x')"))
    folder = cache_dir_in(config.storage.data_dir)
    write_status(folder, CompileStatus("sd15", "cuda:0", "reduce-overhead", graphs))
    write_status(folder, CompileStatus("sd15", "cuda:0", "default", graphs[:1], "vae"))
    write_status(folder, CompileStatus("sd15", "cuda:0", "reduce-overhead", graphs[1:2], "text"))
    text = format_checks(run_checks(config, {}))
    assert ('[  ok] compiled execution: compile = "auto": unet, vae, text compiled on CUDA devices (the CPU runs '
            "eagerly), mode reduce-overhead, buckets [1, 2, 4, 8], warm-up ['1:1', '16:9']") in text
    assert ("[warn] compiled unet graphs of sd15 on cuda:0: 0 queued, 1 building, 1 ready, 1 failed, 0 skipped (as of "
            in text)
    assert "; eager for good: 16 rows\n       fix: the bot's log says why each failed" in text
    assert "[  ok] compiled vae graphs of sd15 on cuda:0: 0 queued, 0 building, 1 ready, 0 failed, 0 skipped" in text
    assert "[  ok] compiled text graphs of sd15 on cuda:0: 0 queued, 1 building, 0 ready, 0 failed, 0 skipped" in text


def assert_like_eager_without_syncs(model: LoadedModel, eager: LoadedModel, req: GenerationRequest,
                                    tolerance: float) -> None:
    """On CUDA: `model`'s images are `eager`'s within `tolerance` (mean pixel levels, not blank),
    and once its CUDA graphs are recorded (its first run) its steps never synchronise."""
    compiled_images = txt2img(model, [req])[0]  # the device thread records its CUDA graphs here

    def progress(step: int, total: int, x0: Tensor) -> None:
        if step == 1:
            torch.cuda.set_sync_debug_mode("error")

    try:
        latents = sample_latents(model, [req], progress)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(latents).all()
    for a, b in zip(txt2img(eager, [req])[0], compiled_images, strict=True):
        assert np.asarray(b).astype(float).std() > 1.0, "a blank image"
        assert np.abs(np.asarray(a).astype(float) - np.asarray(b).astype(float)).mean() <= tolerance


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_compiled_cuda_graphs_give_the_eager_image_and_never_synchronize(
        tiny_checkpoints: TinyCheckpoints, dtype: str) -> None:  # noqa: F811
    """compile = "auto" on CUDA: reduce-overhead (CUDA graphs). Within the tolerances of
    test_pipeline's GPU test, and the compiled steps queue work without waiting on the GPU."""
    eager = engine_with(tiny_checkpoints, Compiling("off"), dtype, vae_dtype="float32").load("tiny", "cuda")
    compiling = Compiling("auto", parts=("unet",))  # the other parts: the next test
    model = engine_with(tiny_checkpoints, compiling, dtype, vae_dtype="float32").load("tiny", "cuda")
    assert isinstance(model.unet, CompiledCall) and model.unet.status().mode == "reduce-overhead"
    req = request(count=3, steps=6)  # 6 guided rows in the graph of 8
    model.unet.warm_up([unet_key(8, 4, (32, 32), 77, 32, getattr(torch, dtype))])
    model.unet.wait()
    assert model.unet.status().count(State.READY) == 1, model.unet.status()

    assert_like_eager_without_syncs(model, eager, req, 1.0 if dtype == "float32" else 6.0)
    assert model.unet.status().count(State.READY) == 1, model.unet.status()  # no silent fall back to eager


@pytest.mark.gpu
def test_compiled_vae_decode_and_text_tower_on_cuda_give_the_eager_image(
        tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    """compile = "auto" on CUDA: the VAE decode without CUDA graphs (mode default), the text tower
    with them (reduce-overhead), both on ready graphs for a whole txt2img run, whose images are
    the eager run's within test_pipeline's GPU tolerances."""
    eager = engine_with(tiny_checkpoints, Compiling("off"), "float16").load("tiny", "cuda")  # VAE: float16 copy
    compiling = Compiling("auto", parts=("vae", "text"))
    model = engine_with(tiny_checkpoints, compiling, "float16").load("tiny", "cuda")
    decoder_dtype = torch.float32 if model.vae_decoder is None else next(model.vae_decoder.parameters()).dtype
    model.vae_decode.warm_up([vae_key(4, 4, (32, 32), decoder_dtype)])  # 3 images in the graph of 4
    model.network.text_encoder.forward.warm_up([text_key(2)])
    calls = wait_all(model)
    assert {part: call.status().mode for part, call in calls.items()} == {"vae": "default", "text": "reduce-overhead"}
    req = request(count=3, steps=4)
    txt2img(model, [req])  # the device thread records the text tower's CUDA graph
    compiled_images = txt2img(model, [req])[0]
    for call in calls.values():
        (graph,) = call.status().graphs  # no other shape asked for, no silent fall back to eager
        assert graph.state is State.READY, graph
    for a, b in zip(txt2img(eager, [req])[0], compiled_images, strict=True):
        assert np.asarray(b).astype(float).std() > 1.0, "a blank image"
        assert np.abs(np.asarray(a).astype(float) - np.asarray(b).astype(float)).mean() <= 6.0


@pytest.mark.gpu
def test_half_vae_decode_on_a_gpu_is_close_to_float32(tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    full = engine_with(tiny_checkpoints, Compiling("off"), "float16", vae_dtype="float32").load("tiny", "cuda")
    half = engine_with(tiny_checkpoints, Compiling("off"), "float16").load("tiny", "cuda")  # auto: float16
    assert next(half.vae_decoder.parameters()).dtype == torch.float16
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3)).cuda()
    with torch.inference_mode():
        for a, b in zip(decode(full, latents), decode(half, latents), strict=True):
            assert np.abs(np.asarray(a).astype(float) - np.asarray(b).astype(float)).mean() <= 1.0


def test_cached_steps_warm_up_and_run_their_own_two_graphs(tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    """With step_cache_interval > 1 the UNet's graphs are the full call keeping the deep feature
    and the shallow call taking it (no exact one): both warm up at load and a run goes through
    them, giving the eager cached run's images."""
    compilers: list[StandInCompiler] = []
    compiling = Compiling("on", bucketing=Bucketing("buckets", (1,)), warmup=("1:1",), compiler=per_part(compilers))
    model = engine_with(tiny_checkpoints, compiling, step_cache_interval=3).load("tiny", "cpu")
    eager = engine_with(tiny_checkpoints, Compiling("off"), step_cache_interval=3).load("tiny", "cpu")
    unet = wait_all(model)["unet"]
    # 64x64 latents, 2 guided rows; the kept feature: level 1's upsampled output, 64 channels
    assert [g.key for g in unet.status().graphs] == [
        "2 rows x 4 x 64x64 latent, 77 tokens, keeping the deep feature",
        "2 rows x 4 x 64x64 latent, 77 tokens, shallow (cached steps)"]
    assert model.network.unet.deep_channels == 64
    req = request(count=1, steps=4, width=128, height=128)
    got, expected = txt2img(model, [req])[0], txt2img(eager, [req])[0]
    assert compilers[0].rows == [2, 2] + [2] * 4  # the warm-ups, then every call on a graph
    assert unet.status().count(State.READY) == 2 and len(unet.status().graphs) == 2
    for a, b in zip(expected, got, strict=True):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


@pytest.mark.gpu
def test_cached_steps_on_cuda_graphs_give_the_eager_cached_image_and_never_synchronize(
        tiny_checkpoints: TinyCheckpoints) -> None:  # noqa: F811
    """The kept deep feature outlives the CUDA graph replay that made it (its output is copied
    out) and feeds the shallow graph: the compiled cached run is the eager cached run within the
    GPU tolerances, and its steps queue work without waiting on the GPU."""
    eager = engine_with(tiny_checkpoints, Compiling("off"), "float16", vae_dtype="float32",
                        step_cache_interval=3).load("tiny", "cuda")
    model = engine_with(tiny_checkpoints, Compiling("auto", parts=("unet",)), "float16", vae_dtype="float32",
                        step_cache_interval=3).load("tiny", "cuda")
    model.unet.warm_up([unet_key(8, 4, (32, 32), 77, 32, torch.float16, call=call,
                                 deep_channels=model.network.unet.deep_channels) for call in ("keep", "shallow")])
    model.unet.wait()
    assert model.unet.status().count(State.READY) == 2, model.unet.status()
    req = request(count=3, steps=6)
    assert_like_eager_without_syncs(model, eager, req, 6.0)
    assert len(model.unet.status().graphs) == 2 and model.unet.status().count(State.READY) == 2
