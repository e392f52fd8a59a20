"""Regional compilation of the DiT (--compile): one graph serves every block at every step, resident or streamed;
the images match the uncompiled ones; a compiler that fails leaves an eager run behind, not a failed one."""
from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import max_diff, pixels
from pixart_lowvram.compiling import compile_blocks, shapes_to_compile
from pixart_lowvram.errors import UsageError
from pixart_lowvram.generate import Settings, run_queue
from pixart_lowvram.jobs import jobs_from_options
from pixart_lowvram.models import (load_scheduler, load_transformer, load_transformer_streamed, make_pipeline,
                                   resolve_model)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from nothing: torch keeps compiled code on the block class's `forward` for the process."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def latents(pipe, info, batch: int, size: int = 256) -> torch.Tensor:
    width = info.configs["transformer"]["caption_channels"]
    embeds = torch.randn(batch, 120, width, generator=torch.Generator().manual_seed(9))
    mask = torch.ones(batch, 120, dtype=torch.long)
    with torch.inference_mode():
        return pipe(prompt=None, negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
                    negative_prompt_embeds=embeds.flip(1), negative_prompt_attention_mask=mask, width=size,
                    height=size, num_inference_steps=3, output_type="latent",
                    generator=[torch.Generator().manual_seed(i) for i in range(batch)]).images


@pytest.mark.parametrize("placement", ["resident", "streamed, held in RAM", "streamed from the files"])
def test_one_graph_serves_every_block_and_step(tiny_model, placement):
    """Streaming swaps each block's weights in and out at every step: the compiled graph takes them as inputs, so
    nothing recompiles for it. One graph per input shape (batch 1, then 2), each block and step reusing it."""
    info = resolve_model(tiny_model, hash_weights=False)
    streamer = None
    if placement == "resident":
        transformer = load_transformer(info, torch.float32, CPU)
    else:
        transformer, streamer = load_transformer_streamed(info.path / "transformer", torch.float32, CPU, ahead=1,
                                                          resident=1, hold_in_ram=placement.endswith("RAM"))
    pipe = make_pipeline(info, transformer=transformer, scheduler=load_scheduler(info))
    eager = [latents(pipe, info, 1), latents(pipe, info, 2)]

    record = compile_blocks(transformer.transformer_blocks, backend="aot_eager")  # torch's ops, traced
    compiled = [latents(pipe, info, 1), latents(pipe, info, 1), latents(pipe, info, 2)]

    assert len(transformer.transformer_blocks) >= 2
    assert counters["stats"]["unique_graphs"] == 2  # batch 1 and batch 2, every block and step
    assert record.fallback is None and record.seconds > 0
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[0])
    assert torch.equal(compiled[2], eager[1])

    # Compiling holds no reference to the blocks: the DiT dies with its last reference, without the collector.
    gc.disable()
    try:
        ref = weakref.ref(transformer)
        if streamer is not None:
            streamer.close()
        del transformer, pipe, streamer
        assert ref() is None
    finally:
        gc.enable()


def test_a_model_loaded_again_reuses_the_graph(tiny_model):
    """The denoise stage loads the DiT once per LoRA set: the next load's blocks run the graph the first one's
    compiled, and one record counts the compiling of both."""
    info = resolve_model(tiny_model, hash_weights=False)
    record = None
    for _ in range(2):
        transformer = load_transformer(info, torch.float32, CPU)
        pipe = make_pipeline(info, transformer=transformer, scheduler=load_scheduler(info))
        record = compile_blocks(transformer.transformer_blocks, backend="aot_eager", record=record)
        latents(pipe, info, 1)
    assert counters["stats"]["unique_graphs"] == 1 and len(record._shapes) == 1


def test_a_compiler_that_fails_leaves_an_eager_run(tiny_model):
    info = resolve_model(tiny_model, hash_weights=False)
    transformer = load_transformer(info, torch.float32, CPU)
    pipe = make_pipeline(info, transformer=transformer, scheduler=load_scheduler(info))
    expected = latents(pipe, info, 1)

    def broken(graph, inputs):
        raise RuntimeError("no C compiler here")

    record = compile_blocks(transformer.transformer_blocks, backend=broken)
    assert torch.equal(latents(pipe, info, 1), expected)
    assert "no C compiler here" in record.fallback


def test_compiled_images_match_uncompiled_ones(tiny_model, tmp_path):
    """With inductor, as a run compiles (float32 on the CPU: within 1/255), the DiT streamed; the time spent
    compiling is in the stage's figures and run.json, and inductor's cache in our cache folder."""
    from test_streaming import override_plan  # noqa: PLC0415
    from pixart_lowvram.files import cache_dir  # noqa: PLC0415
    from pixart_lowvram.placement import StagePlan  # noqa: PLC0415

    jobs = jobs_from_options("a lighthouse at dusk", seed=5, steps=2, count=2, width=256, height=256)
    settings = dict(model=tiny_model, device="cpu", dtype="float32", embed_cache=None)
    plain = run_queue(jobs, tmp_path / "plain", Settings(**settings))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # so that leaving the context removes what the run sets
        patch.delenv("TORCHINDUCTOR_CACHE_DIR")
        override_plan(patch, denoise=StagePlan("denoise", "streamed", estimate=0, ahead=1, resident_blocks=1))
        compiled = run_queue(jobs, tmp_path / "compiled", Settings(compile="on", **settings))
        assert (cache_dir() / "torch-compile").is_dir()

    for item in plain.items:
        assert max_diff(pixels(plain.images[item.id]), pixels(compiled.images[item.id])) <= 1
    assert counters["stats"]["unique_graphs"] == 1
    denoise = {s.name: s for s in compiled.stages}["denoise"]
    assert 0 < denoise.compile_seconds < denoise.seconds
    assert {s.name: s for s in plain.stages}["denoise"].compile_seconds is None
    manifest = json.loads((tmp_path / "compiled" / "run.json").read_text())
    assert manifest["settings"]["compile"] == "on"
    assert [s["compile_seconds"] for s in manifest["stages"]] == [None, denoise.compile_seconds, None]


def test_auto_compiles_on_a_gpu_the_shapes_that_repay_it():
    gpu = torch.device("cuda", 0)
    long, short = (2, 1024, 1024, True), (1, 512, 512, True)
    calls = {long: 1280, short: 110}  # 128 images of 20 steps in batches of 2; the seed queue's
    assert shapes_to_compile("auto", gpu, calls) == {long}
    assert shapes_to_compile("auto", gpu, {(2, 1024, 1024, True): 320}) == set()  # 32 images: too few to repay it
    assert shapes_to_compile("auto", gpu, {short: 400, (2, 512, 512, True): 400}) == set()  # 800 calls, in two
    assert shapes_to_compile("auto", CPU, calls) == set()  # compiling on a CPU takes longer than most runs
    assert shapes_to_compile("on", CPU, calls) == {long, short}
    assert shapes_to_compile("off", gpu, calls) == set()


def test_no_more_shapes_than_torch_compiles_for_one_function():
    """Past torch's limit dynamo warns and runs eager: the shapes chosen stop at the limit, the most calls first."""
    calls = {(1, 128 * k, 128, True): 700 * k for k in range(1, 7)}
    with torch._dynamo.config.patch(recompile_limit=3):
        assert shapes_to_compile("on", CPU, calls) == {(1, 128 * k, 128, True) for k in (4, 5, 6)}
        assert shapes_to_compile("auto", torch.device("cuda", 0), calls) == {(1, 128 * k, 128, True)
                                                                             for k in (4, 5, 6)}
    assert len(shapes_to_compile("on", CPU, calls)) == 6  # torch's own limit, 8


def test_calls_are_counted_by_the_shape_the_transformer_sees(tiny_model):
    """Sizes that bin to one size are one shape; guidance doubles a batch; each LoRA set's batches are its own."""
    from pixart_lowvram.denoise import calls_by_shape, call_shape  # noqa: PLC0415
    from pixart_lowvram.items import expand  # noqa: PLC0415

    info = resolve_model(tiny_model, hash_weights=False)
    jobs = jobs_from_options("a fox", seed=1, steps=3, count=3, width=128, height=128)
    jobs += jobs_from_options("a fox", seed=9, steps=4, width=128, height=128, cfg=1.0)
    items, _ = expand(jobs, info.defaults, {})
    calls = calls_by_shape(info, items, 2)
    assert calls == {call_shape(info, items[:2]): 3, call_shape(info, items[2:3]): 3, call_shape(info, items[3:]): 4}
    assert call_shape(info, items[2:3]) != call_shape(info, items[3:])  # guided or not
    assert sum(calls.values()) == 10


def test_a_queue_of_more_sizes_than_torch_compiles_runs_without_its_warning(tiny_model, tmp_path, monkeypatch,
                                                                             caplog):
    """--compile on over more sizes than torch compiles for one function: the most-used shapes compile, the rest
    run eager, dynamo never reaches its limit (whose warning a user would see), and every image is the eager one."""
    from pixart_lowvram import denoise  # noqa: PLC0415

    monkeypatch.setattr(denoise, "compile_blocks", lambda blocks, record: compile_blocks(
        blocks, backend="aot_eager", record=record))  # torch's ops, traced: inductor on a CPU takes minutes
    jobs = []
    for n, (w, h) in enumerate([(128, 128), (192, 128), (128, 192), (256, 128)]):
        jobs += jobs_from_options("a lighthouse", seed=n, steps=2 + (n == 0), count=2 if n == 0 else 1, width=w,
                                  height=h)
    settings = dict(model=tiny_model, device="cpu", dtype="float32", embed_cache=None)
    plain = run_queue(jobs, tmp_path / "plain", Settings(**settings))
    with caplog.at_level("WARNING", logger="torch._dynamo"), torch._dynamo.config.patch(recompile_limit=2):
        compiled = run_queue(jobs, tmp_path / "compiled", Settings(compile="on", **settings))
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert counters["stats"]["unique_graphs"] == 2
    assert {s.name: s for s in compiled.stages}["denoise"].compile_seconds > 0
    for item in plain.items:
        assert max_diff(pixels(plain.images[item.id]), pixels(compiled.images[item.id])) <= 1


def test_a_wrong_compile_option_is_an_input_error(tiny_model, tmp_path):
    with pytest.raises(UsageError, match="--compile 'fast': choose auto, on, off"):
        run_queue(jobs_from_options("a fox"), tmp_path / "run", Settings(model=tiny_model, compile="fast"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("deterministic", [True, False])
def test_inductor_runs_in_its_deterministic_mode(monkeypatch, deterministic):
    """Inductor's default times several tile shapes of each reduction kernel and keeps the fastest, which can sum
    in another order in another process; compile_blocks asks for its deterministic mode (where torch has it), so
    a resumed run and every rank of a several-GPU run compute alike. Other backends take no inductor options."""
    import torch._inductor.config as inductor_config

    from pixart_lowvram import compiling

    seen: list[dict] = []
    real = torch.compile

    def spy(fn, **kwargs):
        seen.append(kwargs)
        return real(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)

    class Block(torch.nn.Module):  # a class of its own: _compiled caches one compiled function per class
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(x)

    compile_blocks(torch.nn.ModuleList([Block(), Block()]), deterministic=deterministic)
    compile_blocks(torch.nn.ModuleList([Block()]), backend="aot_eager")
    assert hasattr(inductor_config, "deterministic")  # torch 2.13, the version CI installs, has the mode
    assert seen[0]["options"] == ({"deterministic": True} if deterministic else None)
    assert seen[1]["options"] is None
    compiling._compiled.cache_clear()
