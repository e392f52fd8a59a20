"""Model folders we did not make: every way of storing the weights that diffusers and transformers write (sharded
with an index, float16 "variant" files, float32 or float16 on disk) loads on every path (resident, streamed, the
planner's sizes, the identity hash) and makes the plain pipeline's images; folders that are wrong in ways nobody
planned are refused before any weights load, with exit 2 and every problem named by its file; a tokenizer that
is missing or not the text encoder's is refused; and a weights file changed anywhere gets a new identity."""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel
from transformers import T5EncoderModel, T5Tokenizer

from conftest import max_diff, pixels, reference_image
from pixart_lowvram import models
from pixart_lowvram.cli import main
from pixart_lowvram.errors import ModelError
from pixart_lowvram.generate import Settings, run_queue
from pixart_lowvram.jobs import jobs_from_options
from pixart_lowvram.models import (
    check_tokenizer,
    file_sha256,
    find_weights,
    load_text_encoder_streamed,
    load_transformer_streamed,
    read_safetensors,
    resolve_model,
    tensor_shapes,
)
from pixart_lowvram.placement import StagePlan
from test_streaming import override_plan

CPU32 = dict(device="cpu", dtype="float32", embed_cache=None)
NETWORKS = {"text_encoder": T5EncoderModel, "transformer": PixArtTransformer2DModel, "vae": AutoencoderKL}


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    return copy


# -- weight layouts --------------------------------------------------------------------------------------------------

# name -> save_pretrained arguments for each network: what hub checkpoints hold besides one float32 file each
LAYOUTS = {
    "sharded": dict(max_shard_size="40KB"),
    "fp16-variant": dict(variant="fp16", dtype=torch.float16),
    "sharded-fp16-variant": dict(variant="fp16", dtype=torch.float16, max_shard_size="40KB"),
}


@pytest.fixture(scope="module")
def layouts(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny model re-saved by diffusers and transformers in each layout (the variants in float16)."""
    built = {}
    for name, how in LAYOUTS.items():
        root = tmp_path_factory.mktemp(name) / "model"
        shutil.copytree(tiny_model, root)
        how = dict(how)
        dtype = how.pop("dtype", torch.float32)
        for component, cls in NETWORKS.items():
            model = cls.from_pretrained(tiny_model, subfolder=component).to(dtype)
            shutil.rmtree(root / component)
            model.save_pretrained(root / component, **how)
        built[name] = root
    return built


def reference_pipeline(folder: Path) -> PixArtAlphaPipeline:
    """The plain diffusers pipeline on a layout's own files, in float32."""
    variant = "fp16" if "variant" in folder.parent.name else None
    parts = {c: cls.from_pretrained(folder, subfolder=c, variant=variant, torch_dtype=torch.float32)
             for c, cls in NETWORKS.items()}
    pipe = PixArtAlphaPipeline.from_pretrained(folder, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_each_layout_is_found_as_from_pretrained_reads_it(layouts):
    sharded = find_weights(layouts["sharded"] / "transformer")
    assert len(sharded.files) > 1 and sharded.index.name == "diffusion_pytorch_model.safetensors.index.json"
    assert sharded.variant is None
    variant = find_weights(layouts["fp16-variant"] / "text_encoder")
    assert [p.name for p in variant.files] == ["model.fp16.safetensors"] and variant.variant == "fp16"
    both = find_weights(layouts["sharded-fp16-variant"] / "text_encoder")
    assert both.index.name == "model.safetensors.index.fp16.json" and both.variant == "fp16"
    assert all(".fp16-" in p.name for p in both.files)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_plans_from_its_headers_with_the_plain_names_and_shapes(layouts, tiny_model, layout):
    info, plain = resolve_model(str(layouts[layout])), resolve_model(tiny_model)
    for component in NETWORKS:
        shapes, expected = tensor_shapes(info, component), tensor_shapes(plain, component)
        assert {n: s for n, (_, s) in shapes.items()} == {n: s for n, (_, s) in expected.items()}
        assert {d for d, _ in shapes.values()} == ({"F16"} if "fp16" in layout else {"F32"})
    assert models.component_sizes(info, torch.float16) == models.component_sizes(plain, torch.float16)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_makes_the_plain_pipelines_image(layouts, layout, tmp_path):
    job = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=7, steps=3)
    result = run_queue(jobs_from_options(**job), tmp_path / "run", Settings(model=str(layouts[layout]), **CPU32))
    expected = reference_image(reference_pipeline(layouts[layout]), **job)
    assert max_diff(pixels(result.images[result.items[0].id]), expected) <= 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_t5_read_straight_onto_its_device_is_what_from_pretrained_builds(layouts, layout):
    """The resident T5 is read onto its device through device_map; every tensor, and its dtype (T5's `wo` kept in
    float32), is what a plain from_pretrained in float16 gives."""
    folder = layouts[layout]
    got = models.load_text_encoder(models.resolve_model(str(folder)), torch.float16, torch.device("cpu"))
    expected = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float16,
                                              variant="fp16" if "fp16" in layout else None)
    got, expected = got.state_dict(), expected.state_dict()
    assert got.keys() == expected.keys()
    assert {k: t.dtype for k, t in got.items()} == {k: t.dtype for k, t in expected.items()}
    assert torch.float32 in {t.dtype for t in got.values()}
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert models._map_target(torch.device("cuda", 1)) == 1 and models._map_target(torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_streams_what_from_pretrained_loads(layouts, layout):
    folder = layouts[layout]
    variant = "fp16" if "fp16" in layout else None
    t5, streamer = load_text_encoder_streamed(folder / "text_encoder", torch.float32, torch.device("cpu"))
    try:
        ids = torch.tensor([[5, 9, 30, 1]])
        with torch.no_grad():
            expected = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder", variant=variant,
                                                      dtype=torch.float32)(ids).last_hidden_state
            assert torch.equal(t5(ids).last_hidden_state, expected)
    finally:
        streamer.close()
    dit, streamer = load_transformer_streamed(folder / "transformer", torch.float32, torch.device("cpu"), ahead=1)
    try:
        reference = PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer", variant=variant,
                                                             torch_dtype=torch.float32)
        inputs = dict(hidden_states=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
                      encoder_hidden_states=torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(1)),
                      timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        with torch.no_grad():
            assert torch.equal(dit(**inputs).sample, reference(**inputs).sample)
    finally:
        streamer.close()


def test_a_streamed_run_of_sharded_fp16_variant_files_makes_the_resident_runs_images(layouts, tmp_path,
                                                                                      monkeypatch):
    folder = str(layouts["sharded-fp16-variant"])
    jobs = jobs_from_options(prompt="a red fox in the snow", seed=3, steps=3)
    resident = run_queue(jobs, tmp_path / "resident", Settings(model=folder, **CPU32))
    override_plan(monkeypatch, encode=StagePlan("encode", "streamed", estimate=0, ahead=1),
                  denoise=StagePlan("denoise", "streamed", estimate=0, ahead=1, resident_blocks=1))
    streamed = run_queue(jobs, tmp_path / "streamed", Settings(model=folder, **CPU32))
    assert [p.placement for p in streamed.plan.stages.values()][:2] == ["streamed", "streamed"]
    item = resident.items[0].id
    assert max_diff(pixels(streamed.images[item]), pixels(resident.images[item])) == 0


def test_plain_files_are_read_where_a_variant_sits_beside_them(model_copy):
    model = PixArtTransformer2DModel.from_pretrained(model_copy, subfolder="transformer")
    model.to(torch.float16).save_pretrained(model_copy / "transformer", variant="fp16")
    weights = find_weights(model_copy / "transformer")
    assert [p.name for p in weights.files] == ["diffusion_pytorch_model.safetensors"] and weights.variant is None
    assert {d for d, _ in tensor_shapes(resolve_model(str(model_copy)), "transformer").values()} == {"F32"}


# -- folders that are wrong in ways nobody planned ------------------------------------------------------------------

def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


DELETE = object()


def write_safetensors(path: Path, header, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
F32_4 = {"dtype": "F32", "shape": [4]}

# what is broken -> (how to break a copy of the tiny model, the file the message names, what it says)
BROKEN = {
    "a component as a bare string": (
        lambda m: edit_json(m / "model_index.json", vae="AutoencoderKL"), "model_index.json", "[library, class"),
    "a module that is no model": (
        lambda m: edit_json(m / "model_index.json", vae=["diffusers", "utils"]), "model_index.json", "not a class"),
    "AutoModel for T5": (
        lambda m: edit_json(m / "model_index.json", text_encoder=["transformers", "AutoModel"]),
        "model_index.json", "not a T5EncoderModel"),
    "a scheduler that does not exist": (
        lambda m: edit_json(m / "model_index.json", scheduler=["diffusers", "NoSuchScheduler"]),
        "model_index.json", "no such class"),
    "a flow-matching scheduler": (
        lambda m: edit_json(m / "model_index.json", scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"]),
        "model_index.json", "does not fit PixArt"),
    "no sample_size": (
        lambda m: edit_json(m / "transformer/config.json", sample_size=DELETE), "transformer/config.json",
        "sample_size must be"),
    "sample_size a string": (
        lambda m: edit_json(m / "transformer/config.json", sample_size="32"), "transformer/config.json",
        "sample_size must be"),
    "T5's d_model a string": (
        lambda m: edit_json(m / "text_encoder/config.json", d_model="32"), "text_encoder/config.json",
        "d_model must be"),
    "no VAE blocks": (
        lambda m: edit_json(m / "vae/config.json", block_out_channels=[]), "vae/config.json", "block_out_channels"),
    "VAE blocks null": (
        lambda m: edit_json(m / "vae/config.json", block_out_channels=None), "vae/config.json",
        "block_out_channels"),
    "a header that is a list": (
        lambda m: write_safetensors(m / VAE_WEIGHTS, [1, 2]), VAE_WEIGHTS, "header is a JSON list"),
    "bad data_offsets": (
        lambda m: write_safetensors(m / VAE_WEIGHTS, {"w": {**F32_4, "data_offsets": [0, 3]}}, bytes(16)),
        VAE_WEIGHTS, "data_offsets [0, 3]"),
    "a string entry": (
        lambda m: write_safetensors(m / VAE_WEIGHTS, {"w": "F32"}), VAE_WEIGHTS, "no valid dtype and shape"),
    "an index whose weight_map is a list": (
        lambda m: (m / "transformer/diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"weight_map": ["diffusion_pytorch_model.safetensors"]})),
        "transformer/diffusion_pytorch_model.safetensors.index.json", "weight_map must be"),
    "the VAE's weights replaced by the DiT's": (
        lambda m: shutil.copy(m / "transformer/diffusion_pytorch_model.safetensors", m / VAE_WEIGHTS), "vae",
        "weights do not fit config.json"),
    "a billion DiT layers": (
        lambda m: edit_json(m / "transformer/config.json", num_layers=10**9), "transformer",
        "num_layers 1000000000 asks for 1000000000 blocks, the weights files hold 2"),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_a_broken_model_folder_is_refused_before_any_weights_load(model_copy, broken):
    breaks, culprit, says = BROKEN[broken]
    breaks(model_copy)
    with pytest.raises(ModelError) as refused:
        resolve_model(str(model_copy))
    assert f"{model_copy / culprit}" in str(refused.value) and says in str(refused.value)


def test_every_problem_of_a_folder_is_named_at_once_and_the_cli_exits_2(model_copy, tmp_path, capsys):
    for broken in ("AutoModel for T5", "no VAE blocks", "bad data_offsets", "a billion DiT layers"):
        BROKEN[broken][0](model_copy)
    started = time.perf_counter()
    code = main(["generate", "x", "--model", str(model_copy), "--out", str(tmp_path / "run"), "--device", "cpu",
                 "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "4 problems in the model folder" in err
    for culprit in ("model_index.json", "vae/config.json", VAE_WEIGHTS, "transformer: cannot load transformer"):
        assert str(model_copy / culprit) in err
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - started < 60, "the billion layers were not built"


def test_a_transformer_config_with_null_additional_conditions_loads(model_copy):
    edit_json(model_copy / "transformer/config.json", use_additional_conditions=None)
    assert resolve_model(str(model_copy)).configs["transformer"]["use_additional_conditions"] is None


# -- the tokenizer ---------------------------------------------------------------------------------------------------

def test_an_empty_tokenizer_folder_is_refused(model_copy):
    shutil.rmtree(model_copy / "tokenizer")
    (model_copy / "tokenizer").mkdir()
    with pytest.raises(ModelError, match="no tokenizer files"):
        resolve_model(str(model_copy))


def test_an_unreadable_tokenizer_is_refused(model_copy):
    (model_copy / "tokenizer" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="tokenizer.json: cannot be read as JSON"):
        resolve_model(str(model_copy))


def test_a_tokenizer_that_is_not_the_text_encoders_is_refused(model_copy):
    """transformers' stand-in from a folder without a vocabulary has 104 tokens: every word unknown."""
    shutil.rmtree(model_copy / "tokenizer")
    T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0)], extra_ids=100).save_pretrained(
        model_copy / "tokenizer")
    with pytest.raises(ModelError, match="104 tokens, the text encoder has 1024"):
        resolve_model(str(model_copy))


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(model_copy):
    edit_json(model_copy / "text_encoder/config.json", vocab_size=256)
    with pytest.raises(ModelError, match="more than the text encoder's vocab_size 256"):
        resolve_model(str(model_copy))


def sentencepiece_model(pieces: int) -> bytes:
    """A sentencepiece ModelProto in protobuf wire format: `pieces` entries of field 1, then a trainer spec."""
    piece = b"\x0a\x03\xe2\x96\x81" + b"\x15\x00\x00\x00\x00"  # piece "▁", score 0.0
    return (b"\x0a" + bytes([len(piece)]) + piece) * pieces + b"\x12\x02\x08\x01"


def test_a_sentencepiece_tokenizer_is_counted_with_its_extra_ids(tmp_path):
    (tmp_path / "spiece.model").write_bytes(sentencepiece_model(500))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 100}))
    assert check_tokenizer(tmp_path, vocab_size=640) == 600
    with pytest.raises(ModelError, match="spiece.model: 600 tokens, the text encoder has 32128"):
        check_tokenizer(tmp_path, vocab_size=32128)
    (tmp_path / "spiece.model").write_bytes(b"\xff" * 20)
    with pytest.raises(ModelError, match="cannot be read as a sentencepiece model"):
        check_tokenizer(tmp_path, vocab_size=640)


# -- safetensors headers ---------------------------------------------------------------------------------------------

def test_a_header_is_read_as_the_format_defines_it(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"__metadata__": {"format": "pt"}, "w": {**F32_4, "data_offsets": [0, 16]}}, bytes(16))
    (stored,) = read_safetensors(path).values()
    assert (stored.dtype, stored.shape, stored.nbytes) == (torch.float32, (4,), 16)
    write_safetensors(path, {"w": {**F32_4, "data_offsets": [0, 16]}}, bytes(15))
    with pytest.raises(ModelError, match="truncated"):
        read_safetensors(path)
    write_safetensors(path, {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16))
    with pytest.raises(ModelError, match="no valid dtype and shape"):
        read_safetensors(path)


# -- the identity hash -----------------------------------------------------------------------------------------------

def test_a_change_anywhere_in_a_weights_file_changes_the_identity(model_copy):
    before = resolve_model(str(model_copy)).identity
    weights = model_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    after = resolve_model(str(model_copy)).identity
    assert after["transformer"] != before["transformer"]
    assert {c: v for c, v in after.items() if c != "transformer"} == {
        c: v for c, v in before.items() if c != "transformer"}


def test_a_whole_file_hash_is_read_once_and_again_after_a_change(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "HASH_CACHE_MIN", 0)
    reads = []
    real = models._sha256
    monkeypatch.setattr(models, "_sha256", lambda path: reads.append(path) or real(path))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = file_sha256(weights)
    assert file_sha256(weights) == first and len(reads) == 1, "the second call reads the cache"
    assert list((Path(os.environ["XDG_CACHE_HOME"]) / "pixart-lowvram" / "file-hashes").iterdir())
    weights.write_bytes(b"b" * 1000)  # same size; a new mtime
    assert file_sha256(weights) != first and len(reads) == 2


def test_a_plan_can_read_a_model_without_reading_its_weights(tiny_model, monkeypatch):
    monkeypatch.setattr(models, "file_sha256", lambda path: pytest.fail(f"read {path}"))
    info = resolve_model(tiny_model, hash_weights=False)
    assert info.identity == {} and models.component_sizes(info, torch.float16).transformer > 0


def test_a_file_in_the_hugging_face_cache_takes_the_hubs_sha256(tmp_path, monkeypatch):
    """The hub cache's snapshot files link to blobs/<etag>; an LFS file's etag is its sha256."""
    sha = "0123456789abcdef" * 4
    blob = tmp_path / "models--a--b" / "blobs" / sha
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"weights")
    snapshot = tmp_path / "models--a--b" / "snapshots" / "main" / "transformer"
    snapshot.mkdir(parents=True)
    (snapshot / "w.safetensors").symlink_to(Path("../../../blobs") / sha)
    monkeypatch.setattr(models, "_sha256", lambda path: pytest.fail("read the file"))
    assert file_sha256(snapshot / "w.safetensors") == sha
