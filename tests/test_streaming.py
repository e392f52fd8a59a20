"""Streamed weights on the CPU with the tiny model: micro-batched blocks give the results of one-row runs bit
for bit, and T5 streamed block by block from its safetensors files equals `from_pretrained`'s T5, tensor by
tensor and output by output, whichever placement the encode stage uses."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pixart_lowvram.encode import encode_texts
from pixart_lowvram.stage import StageContext
from pixart_lowvram.models import (
    caption_cleaning,
    component_sizes,
    index_safetensors,
    load_text_encoder_streamed,
    resolve_model,
)
from pixart_lowvram.placement import StagePlan
from pixart_lowvram.run import RunFolder
from pixart_lowvram.streaming import MicroBatched, micro_batch_blocks

TEXTS = ["a red cat", "pirate ship trapped in a cosmic maelstrom nebula, highly detailed, oil painting", ""]


# -- MicroBatched ------------------------------------------------------------------------------------------------

class SharedBias(nn.Module):
    """Like a T5 block: (hidden, bias) where the bias is the same for every row; records the shapes it saw."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.table = nn.Parameter(torch.randn(1, 3, 4))
        self.calls: list[dict] = []

    def forward(self, hidden, mask=None, scale=1.0, extra=None):
        self.calls.append({"hidden": tuple(hidden.shape), "mask": None if mask is None else tuple(mask.shape),
                           "extra": None if extra is None else tuple(extra.shape)})
        out = self.linear(hidden) * scale
        if mask is not None:
            out = out * mask[..., None]
        return out, self.table * 2, None


class PerRow(nn.Module):
    """Every output depends on the rows: all are concatenated."""

    def forward(self, hidden):
        return hidden * 2, hidden.sum(-1), hidden[:, :1]


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, hidden):
        return torch.nn.functional.gelu(self.linear(hidden)) @ self.linear.weight


def test_micro_batched_slices_batch_tensors_and_keeps_a_shared_bias():
    torch.manual_seed(0)
    block = SharedBias()
    hidden, mask, extra = torch.randn(5, 6, 8), (torch.rand(5, 6) > 0.3).float(), torch.randn(1, 6)
    out, bias, nothing = MicroBatched(block, size=2)(hidden, mask, scale=0.5, extra=extra)

    # slices of 2, 2 and 1; batch-sized arguments sliced with the hidden states, the others passed as they are
    assert block.calls == [{"hidden": (2, 6, 8), "mask": (2, 6), "extra": (1, 6)},
                           {"hidden": (2, 6, 8), "mask": (2, 6), "extra": (1, 6)},
                           {"hidden": (1, 6, 8), "mask": (1, 6), "extra": (1, 6)}]
    expected = torch.cat([block(hidden[s], mask[s], scale=0.5, extra=extra)[0]
                          for s in (slice(0, 2), slice(2, 4), slice(4, 5))])
    assert torch.equal(out, expected)
    assert torch.equal(bias, block.table * 2) and bias.shape == (1, 3, 4)  # taken once, not concatenated
    assert nothing is None


def test_micro_batched_concatenates_outputs_that_differ_by_slice():
    hidden = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)
    doubled, sums, firsts = MicroBatched(PerRow(), size=1)(hidden)
    assert torch.equal(doubled, hidden * 2)
    assert torch.equal(sums, hidden.sum(-1))
    assert torch.equal(firsts, hidden[:, :1])


def test_micro_batched_passes_a_small_batch_through_whole():
    block = SharedBias()
    hidden = torch.randn(3, 6, 8)
    MicroBatched(block, size=4)(hidden)
    MicroBatched(block, size=3)(hidden)
    assert [c["hidden"] for c in block.calls] == [(3, 6, 8), (3, 6, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_micro_batch_of_one_equals_separate_runs_bit_for_bit(dtype):
    torch.manual_seed(1)
    block = Plain().to(dtype)
    hidden = torch.randn(7, 33, 16, dtype=dtype)
    with torch.inference_mode():
        ours = MicroBatched(block, size=1)(hidden)
        separate = torch.cat([block(hidden[i:i + 1]) for i in range(len(hidden))])
    assert torch.equal(ours, separate)


def test_micro_batch_blocks_wraps_in_place_once():
    blocks = nn.ModuleList([Plain(), Plain()])
    originals = list(blocks)
    wrappers = micro_batch_blocks(blocks, 2)
    assert list(blocks) == wrappers and [w.block for w in wrappers] == originals
    again = micro_batch_blocks(blocks, 3)  # no wrapper around a wrapper; the size is updated
    assert again == wrappers and all(w.size == 3 and not isinstance(w.block, MicroBatched) for w in again)


# -- T5, streamed from its files ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokens(tiny_model):
    """Three token sequences of different lengths, padded, with their masks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(tiny_model) / "tokenizer")
    batch = tokenizer(TEXTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    lengths = batch.attention_mask.sum(1).tolist()
    assert len(set(lengths)) == 3 and max(lengths) < 24, "three lengths, all padded"
    return batch.input_ids, batch.attention_mask


@pytest.fixture(scope="module")
def reference_t5(tiny_model):
    from transformers import T5EncoderModel

    models = {}

    def get(dtype):
        if dtype not in models:
            models[dtype] = T5EncoderModel.from_pretrained(Path(tiny_model) / "text_encoder", dtype=dtype).eval()
        return models[dtype]

    return get


def unwrapped(name: str) -> str:
    """A streamed model's parameter name -> from_pretrained's (the MicroBatched wrapper adds a level)."""
    return re.sub(r"^encoder\.block\.(\d+)\.block\.", r"encoder.block.\1.", name)


@pytest.mark.parametrize("ahead", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_streamed_t5_equals_from_pretrained(tiny_model, tokens, reference_t5, dtype, ahead):
    ids, mask = tokens
    reference = reference_t5(dtype)
    with torch.inference_mode():
        expected = torch.cat([reference(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).last_hidden_state
                              for i in range(len(ids))])

    folder = Path(tiny_model) / "text_encoder"
    model, streamer = load_text_encoder_streamed(folder, dtype, torch.device("cpu"), micro_batch=1, ahead=ahead)
    try:
        # what the streamer puts in place of each block's parameters while the block runs
        seen: dict[int, dict[str, torch.Tensor]] = {}

        def keep(i):
            def hook(block, args):
                if i not in seen:
                    seen[i] = {n: p.detach().clone() for n, p in block.named_parameters()}
            return hook

        for i, unit in enumerate(model.encoder.block):
            unit.block.register_forward_pre_hook(keep(i))
        wo_dtypes = []
        model.encoder.block[-1].block.layer[1].DenseReluDense.wo.register_forward_hook(
            lambda m, args, out: wo_dtypes.append((m.weight.dtype, m.weight.device.type)))

        stored = index_safetensors(sorted(folder.glob("*.safetensors")))
        per_pass = sum(s.nbytes for name, s in stored.items() if name.startswith("encoder.block."))
        block_params = [p for unit in model.encoder.block for p in unit.parameters()]
        assert block_params and all(p.is_meta for p in block_params), "nothing of a block is loaded up front"

        for run in (1, 2):  # the second pass reloads every block
            with torch.inference_mode():
                out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert out.dtype == dtype
            assert torch.equal(out, expected), f"pass {run}: max diff {(out.float() - expected.float()).abs().max()}"
            assert all(p.is_meta for unit in model.encoder.block for p in unit.parameters()), "blocks dropped"
            assert streamer.bytes_moved == run * per_pass
        assert len(wo_dtypes) == 2 * len(ids)  # micro-batches of one: one call per text and pass
        assert set(wo_dtypes) == {(torch.float32, "cpu")}, "T5's wo layers stay float32"
    finally:
        streamer.close()

    # every tensor equals from_pretrained's: blocks as they were put in place, the rest as loaded
    ref_params = dict(reference.named_parameters(remove_duplicate=False))
    for i, params in seen.items():
        for name, value in params.items():
            ref = ref_params[f"encoder.block.{i}.{name}"]
            assert value.dtype == ref.dtype and torch.equal(value, ref), f"block {i}: {name}"
    assert sum(len(p) for p in seen.values()) == sum(1 for n in ref_params if n.startswith("encoder.block."))
    outside = {n: p for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith("encoder.block.")}
    assert set(outside) == {n for n in ref_params if not n.startswith("encoder.block.")}
    for name, value in outside.items():
        ref = ref_params[unwrapped(name)]
        assert value.dtype == ref.dtype and not value.is_meta and torch.equal(value, ref), name
    if dtype == torch.float16:
        assert {p.dtype for n, p in ref_params.items() if n.split(".")[-2] == "wo"} == {torch.float32}
        assert any(v.dtype == torch.float16 for params in seen.values() for v in params.values())


def test_streamed_t5_with_micro_batches_of_two_matches_the_resident_model(tiny_model, tokens, reference_t5):
    """Larger micro-batches go through the same wrapper: the streamed and resident models agree exactly."""
    ids, mask = tokens
    reference = reference_t5(torch.float32)
    resident_blocks = micro_batch_blocks(reference.encoder.block, 2)
    try:
        with torch.inference_mode():
            expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        for i, wrapper in enumerate(resident_blocks):  # leave the shared reference as it was
            reference.encoder.block[i] = wrapper.block
    model, streamer = load_text_encoder_streamed(Path(tiny_model) / "text_encoder", torch.float32,
                                                 torch.device("cpu"), micro_batch=2, ahead=1)
    try:
        with torch.inference_mode():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, expected)
    finally:
        streamer.close()


def test_planner_sizes_match_what_the_streamer_moves(tiny_model):
    """The planner reads block sizes from the headers; they are what a streamed block weighs."""
    folder = Path(tiny_model) / "text_encoder"
    stored = index_safetensors(sorted(folder.glob("*.safetensors")))
    assert all(s.dtype == torch.float32 for s in stored.values())  # the tiny model is stored in float32
    per_block: dict[str, int] = {}
    for name, s in stored.items():
        if name.startswith("encoder.block."):
            per_block[name.split(".")[2]] = per_block.get(name.split(".")[2], 0) + s.nbytes
    info = resolve_model(tiny_model)

    fp32 = component_sizes(info, torch.float32)
    assert fp32.text_encoder == sum(s.nbytes for s in stored.values())
    assert fp32.text_encoder_block == max(per_block.values())
    assert fp32.text_encoder_other == stored["encoder.final_layer_norm.weight"].nbytes
    assert (fp32.text_dim, fp32.text_ff, fp32.dtype_bytes) == (32, 64, 4)

    fp16 = component_sizes(info, torch.float16)  # half the bytes, except the wo layers
    wo = sum(s.nbytes for name, s in stored.items() if name.split(".")[-2] == "wo")
    assert fp16.text_encoder == (fp32.text_encoder - wo) // 2 + wo
    assert fp16.transformer * 2 == fp32.transformer and fp16.vae * 2 == fp32.vae


# -- the encode stage, at each placement ---------------------------------------------------------------------------

PLANS = {
    "resident": StagePlan("encode", "resident", estimate=0),
    "streamed": StagePlan("encode", "streamed", estimate=0, ahead=0),
    "streamed ahead": StagePlan("encode", "streamed", estimate=0, ahead=1),
    "cpu": StagePlan("encode", "cpu", estimate=0),
}


def encode_with(info, plan, folder_path, batch_size):
    texts = {f"text{i}": text for i, text in enumerate(TEXTS)}
    with RunFolder(folder_path) as folder:
        ctx = StageContext(info=info, folder=folder, device=torch.device("cpu"), dtype=torch.float32, plan=plan)
        made = encode_texts(ctx, texts, batch_size=batch_size)
        assert made == len(texts)
        return {key: load_file(folder.embed_path(key)) for key in texts}


@pytest.mark.parametrize("batch_size", [1, 2])
def test_every_encode_placement_writes_the_same_embeddings(tiny_model, reference_pipeline, tmp_path, batch_size):
    info = resolve_model(tiny_model)
    results = {name: encode_with(info, plan, tmp_path / name.replace(" ", "-"), batch_size)
               for name, plan in PLANS.items()}
    resident = results.pop("resident")
    for name, embeddings in results.items():
        for key, tensors in embeddings.items():
            assert set(tensors) == {"embeds", "mask"}
            assert torch.equal(tensors["embeds"], resident[key]["embeds"]), (name, key)
            assert torch.equal(tensors["mask"], resident[key]["mask"]), (name, key)
    if batch_size == 1:  # one text at a time: the reference pipeline's own embeddings
        for i, text in enumerate(TEXTS):
            with torch.inference_mode():
                embeds, mask, _, _ = reference_pipeline.encode_prompt(
                    text, do_classifier_free_guidance=False, device="cpu", clean_caption=caption_cleaning(),
                    max_sequence_length=info.geometry.max_sequence_length)
            assert torch.equal(resident[f"text{i}"]["embeds"], embeds[0])
            assert torch.equal(resident[f"text{i}"]["mask"], mask[0])


# -- the DiT, streamed from pinned host memory ---------------------------------------------------------------------

def dit_inputs(transformer, steps=3):
    g = torch.Generator("cpu").manual_seed(1)
    size = transformer.config.sample_size
    latents = torch.randn(2, transformer.config.in_channels, size, size, generator=g)
    text = torch.randn(2, 7, transformer.config.caption_channels, generator=g)
    cond = {"resolution": torch.tensor([[256.0, 256.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    return [dict(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([900 - 300 * t] * 2),
                 added_cond_kwargs=cond, return_dict=False) for t in range(steps)]


@pytest.mark.parametrize(("resident", "ahead", "hold"), [(0, 1, True), (0, 2, True), (1, 2, True), (0, 5, True),
                                                    (1, 1, False)])
def test_streamed_dit_equals_from_pretrained_step_after_step(tiny_model, resident, ahead, hold):
    """Step after step (the last block prefetches the first ones of the next step), the streamed DiT computes
    what from_pretrained's resident one does, bit for bit, and moves exactly the streamed blocks' bytes at every
    step: held in RAM (read from the files once) or, where RAM is short, read from the files at every step."""
    from diffusers import PixArtTransformer2DModel

    from pixart_lowvram.models import load_transformer_streamed

    folder = Path(tiny_model) / "transformer"
    reference = PixArtTransformer2DModel.from_pretrained(folder).eval()
    model, streamer = load_transformer_streamed(folder, torch.float32, torch.device("cpu"), ahead=ahead,
                                                resident=resident, hold_in_ram=hold)
    per_block = [sum(p.numel() * p.element_size() for p in b.parameters())
                 for b in list(reference.transformer_blocks)[resident:]]
    streamed_bytes = sum(per_block)
    ahead_held = min(ahead, len(per_block) - 1)  # the last block cannot prefetch itself
    prefetched = sum(per_block[:ahead_held])  # the first streamed blocks, for the next step
    try:
        assert all(p.is_meta for b in list(model.transformer_blocks)[resident:] for p in b.parameters())
        assert (len(streamer.flat), len(streamer.slots)) == ((len(per_block), 0) if hold else (0, ahead + 2))
        with torch.inference_mode():
            for step, kwargs in enumerate(dit_inputs(reference)):
                moved = streamer.bytes_moved
                assert torch.equal(model(**kwargs)[0], reference(**kwargs)[0]), f"step {step}"
                # every step moves the streamed blocks once; the first also prefetches for the second
                assert streamer.bytes_moved - moved == streamed_bytes + (prefetched if step == 0 else 0)
                # between steps only the prefetched blocks are held
                assert sorted(streamer.on_device) == list(range(ahead_held))
        # held blocks land in device buffers made once: as many as blocks are ever there at once
        assert len(streamer.buffers) == (ahead_held + 1 if hold else 0)
    finally:
        streamer.close()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU runs it on the GPU machines


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hold", [True, False])
def test_streamed_dit_in_float16_equals_from_pretrained(tiny_model, device, hold):
    """In a float16 run the streamed DiT has from_pretrained's dtypes (its positional-embedding buffer too) and
    computes its outputs: bit for bit on the CPU; on a GPU (copies on a side stream, device buffers reused in turn)
    within float16 rounding, over steps that reuse every buffer."""
    from diffusers import PixArtTransformer2DModel

    from pixart_lowvram.models import load_transformer_streamed

    folder = Path(tiny_model) / "transformer"
    device = torch.device(device)
    reference = PixArtTransformer2DModel.from_pretrained(folder, torch_dtype=torch.float16).to(device).eval()
    model, streamer = load_transformer_streamed(folder, torch.float16, device, ahead=1, resident=1, hold_in_ram=hold)
    try:
        assert {n: (b.dtype, b.shape) for n, b in model.named_buffers()} == {
            n: (b.dtype, b.shape) for n, b in reference.named_buffers()}
        assert all(torch.equal(b, dict(reference.named_buffers())[n]) for n, b in model.named_buffers())
        with torch.inference_mode():
            for step, kwargs in enumerate(dit_inputs(reference, steps=4)):
                kwargs = {k: v.to(device, torch.float16) if torch.is_tensor(v) and k != "timestep" else v
                          for k, v in kwargs.items()}
                kwargs["timestep"] = kwargs["timestep"].to(device)
                kwargs["added_cond_kwargs"] = {k: v.to(device, torch.float16)
                                               for k, v in kwargs["added_cond_kwargs"].items()}
                got, want = model(**kwargs)[0], reference(**kwargs)[0]
                if device.type == "cpu":
                    assert torch.equal(got, want), f"step {step}"
                else:
                    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3, msg=f"step {step}")
    finally:
        streamer.close()


def override_plan(monkeypatch, **stages: StagePlan) -> None:
    """Make the queue plan these stages as given (the planner would not choose them on a CPU)."""
    from pixart_lowvram import generate
    from pixart_lowvram.placement import Plan

    original = generate.plan_run

    def plan_run(*args, **kwargs):
        plan = original(*args, **kwargs)
        return Plan(plan.budget, plan.context, {**plan.stages, **stages})

    monkeypatch.setattr(generate, "plan_run", plan_run)


ONE_JOB = dict(prompt="a lighthouse at dusk", seed=5, steps=3, width=256, height=256)


def test_denoise_streams_from_the_files_when_ram_is_short(tiny_model, tmp_path, monkeypatch):
    """A machine without the RAM to pin the DiT still runs a streamed plan, and makes the same latents."""
    from pixart_lowvram import denoise
    from pixart_lowvram.generate import Settings, run_queue
    from pixart_lowvram.jobs import jobs_from_options

    jobs = jobs_from_options(**ONE_JOB)
    settings = Settings(model=tiny_model, device="cpu", dtype="float32", embed_cache=None)
    override_plan(monkeypatch, denoise=StagePlan("denoise", "streamed", estimate=0, ahead=1, resident_blocks=0))
    used = []
    real = denoise.load_transformer_streamed
    monkeypatch.setattr(denoise, "load_transformer_streamed",
                        lambda *a, **k: used.append(k["hold_in_ram"]) or real(*a, **k))
    monkeypatch.setattr(denoise, "available_ram", lambda: 1000)  # 1 kB free: less than even the tiny DiT
    run_queue(jobs, tmp_path / "short", settings)
    assert used == [False], "the DiT did not stream from the files"
    monkeypatch.setattr(denoise, "available_ram", lambda: None)
    run_queue(jobs, tmp_path / "plenty", settings)
    assert used == [False, True]
    short = sorted((tmp_path / "short" / "latents").glob("*.safetensors"))
    plenty = sorted((tmp_path / "plenty" / "latents").glob("*.safetensors"))
    assert [p.name for p in short] == [p.name for p in plenty] and len(short) == 1
    assert torch.equal(load_file(short[0])["latents"], load_file(plenty[0])["latents"])


@pytest.mark.parametrize("streamed", [False, True])
def test_each_stage_component_dies_without_the_cycle_collector(tiny_model, tmp_path, monkeypatch, streamed):
    """`release` runs Python's cycle collector (0.3 to 0.5 s a pass on the GPU machines) only where a stage's
    component is still alive: resident or streamed, each dies with its last reference (the collector off)."""
    import gc

    from pixart_lowvram import generate
    from pixart_lowvram.generate import Settings, run_queue
    from pixart_lowvram.jobs import jobs_from_options

    if streamed:
        override_plan(monkeypatch, encode=StagePlan("encode", "streamed", estimate=0, ahead=1),
                      denoise=StagePlan("denoise", "streamed", estimate=0, ahead=1, resident_blocks=1),
                      decode=StagePlan("decode", "strips", estimate=0, room=2**20))
    alive = []
    real = generate.release
    monkeypatch.setattr(generate, "release", lambda device, components=None: (
        alive.append(None if components is None else [ref() is not None for ref in components]),
        real(device, components)))
    gc.collect()
    gc.disable()
    try:
        result = run_queue(jobs_from_options(**ONE_JOB), tmp_path / "run",
                           Settings(model=tiny_model, device="cpu", dtype="float32", embed_cache=None))
    finally:
        gc.enable()
    assert result.made == {"encode": 2, "denoise": 1, "decode": 1}
    assert alive == [[False]] * 3
    assert [p.placement for p in result.plan.stages.values()] == (
        ["streamed", "streamed", "strips"] if streamed else ["resident", "resident", "whole"])


def test_release_collects_a_component_held_in_a_cycle():
    import weakref

    from pixart_lowvram.memory import release

    component = torch.nn.Linear(2, 2)
    component.me = [component]  # a reference cycle: only the collector frees it
    ref = weakref.ref(component)
    del component
    release(torch.device("cpu"), [ref])
    assert ref() is None


def test_tensors_read_in_pieces_on_several_threads_are_whole(tiny_model, monkeypatch):
    """Reads are split into pieces shared by the I/O threads: the pieces (here 1000 bytes, so every tensor of the
    tiny model spans several, with a short last one) put together every stored tensor exactly."""
    from concurrent.futures import ThreadPoolExecutor

    from pixart_lowvram import streaming

    monkeypatch.setattr(streaming, "READ_PIECE", 1000)
    folder = Path(tiny_model) / "text_encoder"
    expected = load_file(next(folder.glob("*.safetensors")))
    stored = index_safetensors(sorted(folder.glob("*.safetensors")))
    assert max(s.nbytes for s in stored.values()) > 3 * 1000
    with ThreadPoolExecutor(4) as pool:
        for name, s in stored.items():
            out = torch.full((s.nbytes,), 7, dtype=torch.uint8)
            pieces = streaming.read_pieces(pool, s, out)
            assert len(pieces) == -(-s.nbytes // 1000)
            for piece in pieces:
                piece.result()
            assert torch.equal(out.view(s.dtype).reshape(s.shape), expected[name]), name


# -- many tensors onto a device at once ---------------------------------------------------------------------------

def test_load_tensors_reads_every_piece_in_place_and_converts(tmp_path, monkeypatch):
    """Tensors split over several pieces, a ring smaller than the pieces (every slot reused), stored dtypes other
    than the target, an empty tensor and a computed one: each comes out with the stored values in its dtype."""
    from safetensors.torch import save_file

    from pixart_lowvram import streaming

    monkeypatch.setattr(streaming, "READ_PIECE", 1000)
    monkeypatch.setattr(streaming, "LOAD_SLOTS", 3)
    generator = torch.Generator().manual_seed(0)
    values = {"big": torch.randn(37, 29, generator=generator),  # 4292 bytes: five pieces
              "half": torch.randn(300, generator=generator).half(),
              "empty": torch.zeros(0, 4),
              "one": torch.tensor([3.5], dtype=torch.bfloat16)}
    save_file(values, tmp_path / "w.safetensors")
    stored = index_safetensors([tmp_path / "w.safetensors"])
    names = list(values)
    made = streaming.Computed((2, 2), torch.float32, lambda: torch.arange(4.0).reshape(2, 2))
    dtypes = [torch.float16, torch.float32, torch.float16, torch.float32, torch.float16]
    got = streaming.load_tensors([stored[n] for n in names] + [made], dtypes, torch.device("cpu"))
    for name, tensor, dtype in zip(names, got, dtypes):
        assert tensor.dtype == dtype and tensor.shape == values[name].shape
        assert torch.equal(tensor, values[name].to(dtype)), name
    assert torch.equal(got[-1], torch.arange(4.0).reshape(2, 2).half())


def test_load_tensors_names_a_file_cut_short(tmp_path):
    from safetensors.torch import save_file

    from pixart_lowvram import streaming

    save_file({"w": torch.ones(1000)}, tmp_path / "w.safetensors")
    stored = index_safetensors([tmp_path / "w.safetensors"])["w"]
    with open(tmp_path / "w.safetensors", "r+b") as f:
        f.truncate(stored.start + 100)
    with pytest.raises(OSError, match="w.safetensors"):
        streaming.load_tensors([stored], [torch.float32], torch.device("cpu"))
