"""LoRAs in the queue, on the tiny model on the CPU in float32: the images equal those of peft applying the same
adapter to the same transformer (unmerged), for peft's adapter folder and for the flat files ComfyUI loads, with
the transformer resident or streamed; a scale of 0 is no LoRA; mixed queues load the transformer once per LoRA
set; keys follow a LoRA's content and scale; and every LoRA that cannot be merged is refused before anything
loads, naming the job, the field and the file."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from conftest import max_diff, pixels
from test_streaming import override_plan
from pixart_lowvram import denoise, models
from pixart_lowvram.cli import main
from pixart_lowvram.errors import QueueError
from pixart_lowvram.generate import Settings, plan_queue, run_queue
from pixart_lowvram.items import assign_keys, expand
from pixart_lowvram.jobs import Job, LoraSpec, jobs_from_options, parse_queue
from pixart_lowvram.lora import LoraSet, read_lora
from pixart_lowvram.models import load_transformer, resolve_model
from pixart_lowvram.placement import StagePlan

CPU32 = dict(device="cpu", dtype="float32", embed_cache=None)
JOB = dict(prompt="a lighthouse at dusk, ink drawing", negative_prompt="blurry", seed=11, steps=2, width=256,
           height=256, cfg=4.5)
# every linear and convolution of PixArt's transformer, as the PixArt LoRA training scripts target them
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj", "proj_out", "linear",
           "linear_1", "linear_2"]


def make_adapter(model: str, folder: Path, *, seed: int = 1, r: int = 4, alpha: float = 8, shared_a: bool = False,
                 **config) -> Path:
    """A peft LoRA adapter for the model's transformer, random A and B, saved as PixArt LoRA training saves it
    (get_peft_model + save_pretrained). shared_a: to_q, to_k and to_v (attn1), and to_k and to_v (attn2), share
    one A, so that the original PixArt layout's fused projections can hold the same update."""
    transformer = PixArtTransformer2DModel.from_pretrained(model, subfolder="transformer")
    torch.manual_seed(seed)
    peft_model = get_peft_model(transformer, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS,
                                                        init_lora_weights=False, **config))
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if isinstance(module, LoraLayer):
                module.lora_B["default"].weight.mul_(0.3)  # an update of a tuned style's size, not a new model
        if shared_a:
            for block in peft_model.base_model.model.transformer_blocks:
                for attn, names in ((block.attn1, ("to_k", "to_v")), (block.attn2, ("to_v",))):
                    source = attn.to_q if attn is block.attn1 else attn.to_k
                    for name in names:
                        getattr(attn, name).lora_A["default"].weight.copy_(source.lora_A["default"].weight)
    peft_model.save_pretrained(folder)
    return folder


def peft_image(model: str, adapters: list[tuple[Path, float]], job: dict = JOB, **usage):
    """The plain diffusers pipeline's image with peft applying the adapters, unmerged, each at its scale."""
    pipe = PixArtAlphaPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for n, (folder, scale) in enumerate(adapters):
        name = f"a{n}"
        if n == 0:
            wrapped = PeftModel.from_pretrained(pipe.transformer, folder, adapter_name=name)
        else:
            wrapped.load_adapter(folder, adapter_name=name)
        names.append((name, scale))
    if adapters:
        wrapped.base_model.set_adapter([name for name, _ in names])
        for module in pipe.transformer.modules():
            if isinstance(module, LoraLayer):
                for name, scale in names:
                    module.set_scale(name, scale)
    image = pipe(job["prompt"], negative_prompt=job["negative_prompt"], width=job["width"], height=job["height"],
                 guidance_scale=job["cfg"], num_inference_steps=job["steps"],
                 generator=torch.Generator("cpu").manual_seed(job["seed"]), **usage).images[0]
    import numpy as np

    return np.asarray(image)


def our_image(model: str, lora: list[tuple[str, float]], out: Path, job: dict = JOB):
    jobs = [Job(index=1, lora=tuple(LoraSpec(str(p), s) for p, s in lora), **job)]
    result = run_queue(jobs, out, Settings(model=model, **CPU32))
    return pixels(result.images[result.items[0].id]), result


STREAMED = dict(denoise=StagePlan("denoise", "streamed", estimate=0, ahead=1, resident_blocks=0))


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    """A peft adapter on every linear and convolution, rsLoRA and per-module ranks and alphas included."""
    return make_adapter(tiny_model, tmp_path_factory.mktemp("lora") / "ink", r=4, alpha=6,
                        rank_pattern={"attn2.to_q": 2, "ff.net.2": 3},
                        alpha_pattern={"transformer_blocks.1.attn1.to_k": 2.5, "proj_out": 1})


@pytest.fixture(scope="module")
def peft_reference(tiny_model, adapter):
    return peft_image(tiny_model, [(adapter, 0.7)])


@pytest.mark.parametrize("placement", ["resident", "streamed"])
def test_a_peft_adapter_folder_makes_the_image_peft_makes(tiny_model, adapter, peft_reference, tmp_path, monkeypatch,
                                                          placement):
    if placement == "streamed":
        override_plan(monkeypatch, **STREAMED)
    ours, _ = our_image(tiny_model, [(adapter, 0.7)], tmp_path / "run")
    plain = peft_image(tiny_model, [])
    assert max_diff(ours, peft_reference) <= 1
    assert max_diff(plain, peft_reference) > 10  # the LoRA changes the image: the comparison means something


def test_rslora_and_patterns_are_applied_as_peft_applies_them(tiny_model, tmp_path):
    """Merged weights equal peft's own merge, weight by weight, for rsLoRA with per-module ranks and alphas."""
    folder = make_adapter(tiny_model, tmp_path / "rs", r=4, alpha=3, use_rslora=True, rank_pattern={"to_out.0": 2})
    info = resolve_model(tiny_model, hash_weights=False)
    lora = read_lora(folder, info.headers["transformer"], hash_files=False)
    ours = load_transformer(info, torch.float32, torch.device("cpu"), lora=LoraSet.of([(lora, 1.5)]))
    base = PixArtTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    peft_model = PeftModel.from_pretrained(base, folder)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", 1.5)
    theirs = peft_model.merge_and_unload()
    expected = dict(theirs.named_parameters())
    changed = 0
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(param, dict(base.named_parameters()).get(name, param))
    assert changed >= 20


# -- the flat files ComfyUI loads ----------------------------------------------------------------------------------

ORIGINAL = {"attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "attn.proj": ("attn1.to_out.0",),
            "cross_attn.q_linear": ("attn2.to_q",), "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
            "cross_attn.proj": ("attn2.to_out.0",), "mlp.fc1": ("ff.net.0.proj",), "mlp.fc2": ("ff.net.2",)}
ORIGINAL_BASIC = {"x_embedder.proj": "pos_embed.proj", "y_embedder.y_proj.fc1": "caption_projection.linear_1",
                  "y_embedder.y_proj.fc2": "caption_projection.linear_2",
                  "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
                  "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
                  "t_block.1": "adaln_single.linear", "final_layer.linear": "proj_out"}


def flat_file(adapter: Path, layout: str, out: Path, *, alpha: bool = True) -> Path:
    """The peft adapter's updates written in one of the flat layouts ComfyUI reads for PixArt (comfy/lora.py and
    comfy/utils.py's pixart_to_diffusers; OneTrainer's as ComfyUI_ExtraModels reads it). Without `alpha`, B is
    scaled by alpha / r instead, as a file without alphas is read at scale 1."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    factor = config["lora_alpha"] / config["r"]
    peft = load_file(adapter / "adapter_model.safetensors")
    modules = {k[len("base_model.model."):-len(".lora_A.weight")] for k in peft if k.endswith(".lora_A.weight")}

    def pair(module):
        return (peft[f"base_model.model.{module}.lora_A.weight"],
                peft[f"base_model.model.{module}.lora_B.weight"] * (1 if alpha else factor))

    tensors = {}

    def put(name, down, up, down_suffix=".lora_down.weight", up_suffix=".lora_up.weight"):
        tensors[name + down_suffix], tensors[name + up_suffix] = down.contiguous(), up.contiguous()
        if alpha:
            tensors[name + ".alpha"] = torch.tensor(float(config["lora_alpha"]))

    if layout in ("diffusers", "base_model"):
        prefix = "transformer." if layout == "diffusers" else "base_model.model."
        for module in modules:
            put(prefix + module, *pair(module), ".lora_A.weight", ".lora_B.weight")
    elif layout == "onetrainer":
        for module in modules:
            put("lora_transformer_" + module.replace(".", "_"), *pair(module))
    else:  # the original PixArt names: fused projections stack their modules' B rows over one shared A
        blocks = sorted({int(m.split(".")[1]) for m in modules if m.startswith("transformer_blocks.")})
        names = {f"blocks.{i}.{ref}": [f"transformer_blocks.{i}.{p}" for p in parts]
                 for i in blocks for ref, parts in ORIGINAL.items()}
        names.update({ref: [module] for ref, module in ORIGINAL_BASIC.items()})
        for ref, parts in names.items():
            downs, ups = zip(*(pair(p) for p in parts))
            assert all(torch.equal(d, downs[0]) for d in downs)
            name = "lora_unet_" + ref.replace(".", "_") if layout == "kohya" else "diffusion_model." + ref
            put(name, downs[0], torch.cat(ups))
    save_file(tensors, out)
    return out


@pytest.fixture(scope="module")
def shared_adapter(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("lora") / "shared", seed=3, r=4, alpha=8, shared_a=True)


@pytest.fixture(scope="module")
def shared_reference(tiny_model, shared_adapter):
    return peft_image(tiny_model, [(shared_adapter, 0.8)])


@pytest.mark.parametrize(("layout", "placement"), [("kohya", "resident"), ("kohya", "streamed"),
                                                   ("diffusers", "resident"), ("diffusers", "streamed")])
def test_a_comfyui_lora_file_makes_the_image_peft_makes(tiny_model, shared_adapter, shared_reference, tmp_path,
                                                        monkeypatch, layout, placement):
    if placement == "streamed":
        override_plan(monkeypatch, **STREAMED)
    path = flat_file(shared_adapter, layout, tmp_path / "ink.safetensors")
    ours, _ = our_image(tiny_model, [(path, 0.8)], tmp_path / "run")
    assert max_diff(ours, shared_reference) <= 1


@pytest.mark.parametrize(("layout", "alpha"), [("kohya", True), ("original", True), ("diffusers", False),
                                               ("base_model", True), ("onetrainer", True), ("onetrainer", False)])
def test_every_flat_layout_merges_what_the_peft_folder_merges(tiny_model, shared_adapter, tmp_path, layout, alpha):
    """Each layout's update equals the peft folder's, weight by weight (a file without alphas reads at scale 1)."""
    info = resolve_model(tiny_model, hash_weights=False)
    headers = info.headers["transformer"]
    folder = read_lora(shared_adapter, headers, hash_files=False)
    flat = read_lora(flat_file(shared_adapter, layout, tmp_path / "x.safetensors", alpha=alpha), headers,
                     hash_files=False)
    assert flat.format == {"kohya": "original", "base_model": "diffusers"}.get(layout, layout)
    cpu = torch.device("cpu")
    want = load_transformer(info, torch.float32, cpu, lora=LoraSet.of([(folder, 0.8)])).state_dict()
    got = load_transformer(info, torch.float32, cpu, lora=LoraSet.of([(flat, 0.8)])).state_dict()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=2e-6, msg=name)


def diffusers_file(model: str, adapter: Path, out: Path, writer: str, *, keys: str = "peft") -> Path:
    """The peft adapter's LoRA as diffusers' own writers save it: `save_lora_weights` (keys behind `transformer.`;
    PixArt's pipelines have no LoRA mixin, and every transformer pipeline's writes the same layout: Sana's here) or
    the model's `save_lora_adapter` (bare keys; PixArt's transformer lacks the mixin, its method is called on it).
    Both keep the adapter's LoraConfig in the header's lora_adapter_metadata. keys="converted": the attention
    pairs renamed lora.down / lora.up by convert_state_dict_to_diffusers, as diffusers' UNet training scripts save
    them."""
    from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin
    from diffusers.loaders.peft import PeftAdapterMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    transformer = PixArtTransformer2DModel.from_pretrained(model, subfolder="transformer")
    wrapped = PeftModel.from_pretrained(transformer, adapter).base_model.model
    if writer == "save_lora_adapter":
        PeftAdapterMixin.save_lora_adapter(wrapped, out)
    else:
        layers = get_peft_model_state_dict(wrapped)
        if keys == "converted":
            layers = convert_state_dict_to_diffusers(layers)
        SanaLoraLoaderMixin.save_lora_weights(out, transformer_lora_layers=layers,
                                              transformer_lora_adapter_metadata=wrapped.peft_config["default"].to_dict())
    return out / "pytorch_lora_weights.safetensors"


def test_in_float16_the_streamed_and_resident_merges_are_the_same_weights(tiny_model, adapter):
    """Both placements merge in float32 and cast once: bit for bit the same float16 weights."""
    info = resolve_model(tiny_model, hash_weights=False)
    lora = LoraSet.of([(read_lora(adapter, info.headers["transformer"], hash_files=False), 0.7)])
    resident = load_transformer(info, torch.float16, torch.device("cpu"), lora=lora)
    streamed, streamer = models.load_transformer_streamed(Path(tiny_model) / "transformer", torch.float16,
                                                          torch.device("cpu"), ahead=1, resident=1, lora=lora)
    try:
        flat = streamer.flat[0][0]
        layout = streamer.flat[0][1]
        views = {name: flat[o:o + n].view(dt).view(shape) for name, (o, n, dt, shape)
                 in zip(streamer.params[0], layout)}
        reference = dict(resident.named_parameters())
        for name, tensor in views.items():
            assert torch.equal(tensor, reference[name]), name
        for name, param in streamed.named_parameters():
            if not param.is_meta:
                assert torch.equal(param, reference[name]), name
    finally:
        streamer.close()


def test_blocks_read_at_every_step_come_from_a_scratch_file_of_merged_weights(tiny_model, adapter, tmp_path,
                                                                              monkeypatch):
    """Where RAM cannot hold the blocks, the merged ones are written once to a temporary file in the run folder
    and streamed from there: the same latents, and the file is gone after the stage."""
    override_plan(monkeypatch, **STREAMED)
    jobs = [Job(index=1, lora=(LoraSpec(str(adapter), 0.7),), **JOB)]
    held = run_queue(jobs, tmp_path / "held", Settings(model=tiny_model, **CPU32))
    scratch = []
    real = models._spill_computed
    monkeypatch.setattr(models, "_spill_computed", lambda *a: scratch.append(real(*a)) or scratch[-1])
    monkeypatch.setattr(denoise, "available_ram", lambda: 1000)
    short = run_queue(jobs, tmp_path / "short", Settings(model=tiny_model, **CPU32))
    assert len(scratch) == 1 and scratch[0].parent == tmp_path / "short" and not scratch[0].exists()
    key = held.items[0].latent_key
    assert key == short.items[0].latent_key
    assert torch.equal(load_file(tmp_path / "held" / "latents" / f"{key}.safetensors")["latents"],
                       load_file(tmp_path / "short" / "latents" / f"{key}.safetensors")["latents"])


def test_a_folder_diffusers_wrote_from_another_config_takes_a_lora_too(tmp_path):
    """A transformer of diffusers' own PixArt test config (not our preset): its LoRA image is peft's."""
    from test_foreign_configs import CASES, save_folder

    _, transformer, vae, size, _, _ = CASES["diffusers-alpha-test"]
    folder = save_folder(tmp_path / "model", transformer=transformer, vae=vae)
    adapter = make_adapter(folder, tmp_path / "lora", r=2, alpha=4)
    job = dict(JOB, width=8, height=8)
    ours, _ = our_image(folder, [(adapter, 1.0)], tmp_path / "run", job)
    expected = peft_image(folder, [(adapter, 1.0)], job, use_resolution_binning=False)
    assert max_diff(ours, expected) <= 1 and max_diff(expected, peft_image(folder, [], job,
                                                                           use_resolution_binning=False)) > 2


# -- sets, keys and groups --------------------------------------------------------------------------------------

def test_a_scale_of_zero_is_no_lora(tiny_model, adapter, tmp_path):
    """Scale 0 merges nothing: the latent's key and the image are those of no LoRA, so nothing is redone."""
    plain, first = our_image(tiny_model, [], tmp_path / "run")
    zero, again = our_image(tiny_model, [(adapter, 0.0)], tmp_path / "run")
    assert again.items[0].latent_key == first.items[0].latent_key
    assert again.made == {} and [s.skipped for s in again.stages] == [True, True, True]
    assert max_diff(zero, plain) == 0


def keyed(info, jobs, loras):
    items, _ = expand(jobs, info.defaults, {})
    assign_keys(items, info, torch.float32, loras=loras)
    return items


def test_keys_follow_a_loras_content_and_scale_not_its_place_in_the_list(tiny_model, adapter, shared_adapter,
                                                                         tmp_path):
    from pixart_lowvram.resolve import check_loras

    info = resolve_model(tiny_model)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in adapter.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    a, b = str(adapter), str(shared_adapter)
    jobs = [Job(index=1, **JOB), Job(index=2, lora=(LoraSpec(a, 0.5),), **JOB),
            Job(index=3, lora=(LoraSpec(a, 0.6),), **JOB), Job(index=4, lora=(LoraSpec(str(copy), 0.5),), **JOB),
            Job(index=5, lora=(LoraSpec(a, 0.5), LoraSpec(b, 1.0)), **JOB),
            Job(index=6, lora=(LoraSpec(b, 1.0), LoraSpec(a, 0.5)), **JOB)]
    loras = check_loras(jobs, info)
    items = keyed(info, jobs, loras)
    latents = [it.latent_key for it in items]
    assert len({it.prompt_key for it in items}) == 1  # the embeddings are the same for all
    assert latents[0] == keyed(info, [jobs[0]], {})[0].latent_key  # no LoRA: the key it always had
    assert len({latents[0], latents[1], latents[2], latents[4]}) == 4  # a LoRA, its scale: other latents
    assert latents[3] == latents[1]  # the same bytes under another path: the same latent
    assert latents[5] == latents[4]  # the order a job lists its LoRAs in does not count
    for f in Path(b).iterdir():  # another adapter's bytes under the same path
        (copy / f.name).write_bytes(f.read_bytes())
    assert keyed(info, [jobs[3]], check_loras([jobs[3]], info))[0].latent_key != latents[1]  # new content: new key


def test_a_mixed_queue_loads_the_transformer_once_per_lora_set(tiny_model, adapter, shared_adapter, tmp_path,
                                                               monkeypatch):
    a, b = str(adapter), str(shared_adapter)
    queue = parse_queue(json.dumps({"defaults": {k: v for k, v in JOB.items() if k not in ("prompt", "seed")},
                                    "jobs": [
        {"prompt": "a cat", "seed": 1, "lora": [{"path": a, "scale": 0.5}]},
        {"prompt": "a dog", "seed": 2},
        {"prompt": "a cat", "seed": 3, "lora": [{"path": b}, {"path": a, "scale": 0.5}]},
        {"prompt": "a cow", "seed": 4, "lora": [{"path": a, "scale": 0.5}]},
        {"prompt": "a cat", "seed": 5, "lora": [{"path": a, "scale": 0.5}, {"path": b, "scale": 1}]},
        {"prompt": "a dog", "seed": 6, "lora": [{"path": a, "scale": 0}]}]}), "json")
    loads = []
    real = denoise.load_transformer
    monkeypatch.setattr(denoise, "load_transformer", lambda *args, lora: loads.append(
        sorted((str(f.path), s) for f, s in lora.entries)) or real(*args, lora=lora))
    result = run_queue(queue, tmp_path / "mixed", Settings(model=tiny_model, **CPU32))
    assert loads[0] == [] and sorted(loads[1:]) == [[(a, 0.5)], [(a, 0.5), (b, 1.0)]]  # no LoRA first; each set once
    assert result.made["denoise"] == 6
    # each image is the one its job makes alone
    alone = run_queue([queue[2]], tmp_path / "alone", Settings(model=tiny_model, **CPU32))
    assert max_diff(pixels(alone.images[alone.items[0].id]), pixels(result.images[result.items[2].id])) == 0


def test_changing_a_scale_redoes_only_the_images_it_changes(tiny_model, adapter, tmp_path):
    a = str(adapter)
    text = ('[defaults]\nsteps = 2\nwidth = 256\nheight = 256\n'
            '[[jobs]]\nname = "plain"\nprompt = "a cat"\nseed = 1\n'
            '[[jobs]]\nname = "inked"\nprompt = "a cat"\nseed = 1\nlora = [{ path = "%s", scale = %s }]\n')
    first = run_queue(parse_queue(text % (a, 0.5), "toml"), tmp_path / "run", Settings(model=tiny_model, **CPU32))
    assert first.made == {"encode": 2, "denoise": 2, "decode": 2}  # "a cat" and the empty negative prompt
    second = run_queue(parse_queue(text % (a, 0.9), "toml"), tmp_path / "run", Settings(model=tiny_model, **CPU32))
    assert second.made == {"denoise": 1, "decode": 1}  # the embeddings and the plain image are kept
    assert second.images["plain"] == first.images["plain"]
    # the earlier image is kept: the new one takes the next free name, as any edited job's does
    assert list(second.images) == ["plain", "inked~2"] and first.images["inked"].is_file()
    assert max_diff(pixels(second.images["inked~2"]), pixels(first.images["inked"])) > 0


# -- what is refused, before anything loads --------------------------------------------------------------------------

def plan_problem(model: str, lora: list[dict], tmp_path: Path) -> str:
    queue = tmp_path / "queue.json"
    queue.write_text(json.dumps([{"prompt": "a cat", "name": "cat", "lora": lora}]))
    with pytest.raises(QueueError) as caught:
        from pixart_lowvram.jobs import load_queue

        plan_queue(load_queue(queue), Settings(model=model, **CPU32))
    text = str(caught.value)
    assert "job 1 ('cat'), field 'lora'" in text
    return text


def test_a_missing_file_and_a_relative_path(tiny_model, adapter, tmp_path):
    assert "nowhere.safetensors: no such file" in plan_problem(tiny_model, [{"path": "nowhere.safetensors"}], tmp_path)
    (tmp_path / "styles").mkdir()
    (tmp_path / "styles" / "ink").symlink_to(adapter)
    queue = tmp_path / "queue.toml"
    queue.write_text('[[jobs]]\nprompt = "a cat"\nlora = [{ path = "styles/ink", scale = 0.7 }]\n')
    from pixart_lowvram.jobs import load_queue

    jobs = load_queue(queue)  # the path is the queue file's, not the current folder's
    assert jobs[0].lora == (LoraSpec(str(tmp_path / "styles" / "ink"), 0.7),)
    plan_queue(jobs, Settings(model=tiny_model, **CPU32))


def test_keys_not_understood_are_named_with_the_file(tiny_model, tmp_path):
    path = tmp_path / "loha.safetensors"
    save_file({"lora_unet_blocks_0_attn_qkv.hada_w1_a": torch.zeros(2, 2),
               "lora_unet_blocks_0_attn_qkv.hada_w1_b": torch.zeros(2, 2)}, path)
    text = plan_problem(tiny_model, [{"path": str(path)}], tmp_path)
    assert str(path) in text and "lora_unet_blocks_0_attn_qkv.hada_w1_a" in text and "LoHa" in text


def test_a_text_encoder_lora_and_dora_are_refused(tiny_model, adapter, tmp_path):
    tensors = load_file(flat_file(adapter, "onetrainer", tmp_path / "ot.safetensors"))
    tensors["lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(2, 32)
    save_file(tensors, tmp_path / "te.safetensors")
    assert "text encoder" in plan_problem(tiny_model, [{"path": str(tmp_path / "te.safetensors")}], tmp_path)
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    assert "DoRA" in plan_problem(tiny_model, [{"path": str(dora)}], tmp_path)


def test_a_lora_for_another_model_and_a_rank_mismatch(tiny_model, tmp_path):
    wide = tmp_path / "wide.safetensors"  # made for a transformer 1152 wide: PixArt-XL's, not the tiny one's
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 1152),
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(1152, 4)}, wide)
    text = plan_problem(tiny_model, [{"path": str(wide)}], tmp_path)
    assert "another model" in text and "[1152, 1152]" in text
    deep = tmp_path / "deep.safetensors"  # a block this transformer does not have
    save_file({"lora_unet_blocks_27_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_blocks_27_mlp_fc1.lora_up.weight": torch.zeros(128, 4)}, deep)
    assert "lora_unet_blocks_27_mlp_fc1.lora_down.weight" in plan_problem(tiny_model, [{"path": str(deep)}], tmp_path)
    ranks = tmp_path / "ranks.safetensors"
    save_file({"transformer.proj_out.lora_A.weight": torch.zeros(4, 32),
               "transformer.proj_out.lora_B.weight": torch.zeros(32, 8)}, ranks)
    assert "rank mismatch" in plan_problem(tiny_model, [{"path": str(ranks)}], tmp_path)


@pytest.mark.parametrize(("entry", "message"), [
    ({"path": "x.safetensors", "scale": math.inf}, "scale must be a finite number"),
    ({"path": "x.safetensors", "scale": "0.5"}, "write 0.5 without quotes"),
    ({"scale": 1}, "has no path"),
    ({"path": "x.safetensors", "weight": 1}, "unknown key 'weight'"),
])
def test_bad_entries_are_queue_problems(entry, message):
    with pytest.raises(QueueError) as caught:
        parse_queue(json.dumps([{"prompt": "a cat", "lora": [entry]}]), "json")
    assert "field 'lora'" in str(caught.value) and message in str(caught.value)


def test_the_command_line_takes_path_and_scale(tiny_model, adapter, tmp_path, capsys):
    assert jobs_from_options("a cat", lora=[{"path": "a.safetensors", "scale": 0.5}])[0].lora == (
        LoraSpec("a.safetensors", 0.5),)
    code = main(["generate", "a cat", "--model", tiny_model, "--device", "cpu", "--out", str(tmp_path / "run"),
                 "--steps", "2", "--width", "256", "--height", "256", "--lora", f"{adapter}:nan", "-q"])
    assert code == 2 and "field 'lora': the entry's scale must be a finite number, not nan" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    code = main(["generate", "a cat", "--model", tiny_model, "--device", "cpu", "--out", str(tmp_path / "run"),
                 "--steps", "2", "--width", "256", "--height", "256", "--seed", "3", "--lora", f"{adapter}:0.7",
                 "--lora", str(adapter), "-q", "--no-embed-cache"])
    assert code == 0
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["items"][0]["lora"] == [{"path": str(adapter), "scale": 0.7}, {"path": str(adapter), "scale": 1.0}]


def test_defaults_give_every_job_a_lora_unless_it_names_its_own(tmp_path):
    queue = tmp_path / "q.toml"
    queue.write_text('[defaults]\nlora = [{ path = "ink.safetensors", scale = 0.8 }]\n'
                     '[[jobs]]\nprompt = "a"\n[[jobs]]\nprompt = "b"\nlora = []\n'
                     '[[jobs]]\nprompt = "c"\nlora = [{ path = "/abs/boat" }]\n')
    from pixart_lowvram.jobs import load_queue

    jobs = load_queue(queue)
    assert [j.lora for j in jobs] == [(LoraSpec(str(tmp_path / "ink.safetensors"), 0.8),), (),
                                      (LoraSpec("/abs/boat", 1.0),)]


@pytest.mark.parametrize(("change", "message"), [
    ({"r": 0}, "r must be more than 0, not 0"),
    ({"r": 0, "use_rslora": True}, "r must be more than 0, not 0"),
    ({"rank_pattern": {"attn2.to_q": 0}}, "rank_pattern gives 'attn2.to_q' rank 0"),
    ({"alpha_pattern": {"attn1.(to_k": 2}}, "alpha_pattern has 'attn1.(to_k', not a pattern peft can match"),
])
def test_an_adapter_config_peft_could_not_apply_is_refused_naming_it(tiny_model, adapter, change, message, tmp_path):
    """A rank of 0 (whose factor alpha / r divides by it) or a pattern that is no regular expression: a queue problem
    naming the config, not a crash after the queue was checked."""
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    text = plan_problem(tiny_model, [{"path": str(folder)}], tmp_path)
    assert f"{folder / 'adapter_config.json'}: {message}" in text


def test_a_peft_adapter_for_modules_this_transformer_lacks_is_refused_naming_one(tiny_model, adapter, tmp_path):
    """An adapter folder made for a deeper PixArt (or another model with peft): its modules are named, not a
    KeyError."""
    folder = tmp_path / "deeper"
    folder.mkdir()
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k.replace("transformer_blocks.1.", "transformer_blocks.27."): v for k, v in tensors.items()},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    text = plan_problem(tiny_model, [{"path": str(folder)}], tmp_path)
    assert "this transformer has no module transformer_blocks.27." in text and "a LoRA for another model?" in text


def test_a_lora_diffusers_saved_with_its_config_makes_the_image_peft_makes(tiny_model, adapter, peft_reference,
                                                                             tmp_path):
    """diffusers' save_lora_weights keeps the adapter's r, lora_alpha and patterns in the file's header, and
    diffusers loads it with them: so does this tool (ComfyUI ignores them and would add it at 1)."""
    path = diffusers_file(tiny_model, adapter, tmp_path / "saved", "save_lora_weights")
    ours, _ = our_image(tiny_model, [(path, 0.7)], tmp_path / "run")
    assert max_diff(ours, peft_reference) <= 1


@pytest.mark.parametrize(("writer", "keys"), [("save_lora_weights", "converted"), ("save_lora_adapter", "peft")])
def test_every_diffusers_layout_merges_what_the_peft_folder_merges(tiny_model, adapter, tmp_path, writer, keys):
    info = resolve_model(tiny_model, hash_weights=False)
    headers = info.headers["transformer"]
    folder = read_lora(adapter, headers, hash_files=False)
    saved = read_lora(diffusers_file(tiny_model, adapter, tmp_path / "saved", writer, keys=keys), headers,
                      hash_files=False)
    assert saved.format == "diffusers"
    cpu = torch.device("cpu")
    want = load_transformer(info, torch.float32, cpu, lora=LoraSet.of([(folder, 0.7)])).state_dict()
    got = load_transformer(info, torch.float32, cpu, lora=LoraSet.of([(saved, 0.7)])).state_dict()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=2e-6, msg=name)


def test_a_diffusers_lora_whose_config_cannot_be_applied_is_refused(tiny_model, adapter, tmp_path):
    """Its metadata is checked as an adapter_config.json is: a DoRA config is refused, not merged as plain LoRA."""
    from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin

    tensors = load_file(adapter / "adapter_model.safetensors")
    layers = {k[len("base_model.model."):]: v for k, v in tensors.items()}
    config = {**json.loads((adapter / "adapter_config.json").read_text()), "use_dora": True}
    SanaLoraLoaderMixin.save_lora_weights(tmp_path / "dora", transformer_lora_layers=layers,
                                          transformer_lora_adapter_metadata=config)
    text = plan_problem(tiny_model, [{"path": str(tmp_path / "dora" / "pytorch_lora_weights.safetensors")}], tmp_path)
    assert "(lora_adapter_metadata): a DoRA adapter" in text
