"""Values that overflow a component's 16-bit dtype: the stage that makes them notices, names the images, the
stage, the component and its dtype; the rest of the queue is made; the run ends with exit code 4; a rerun with the
fix (`--upcast COMPONENT`) redoes only those images."""
from __future__ import annotations

import json

from pixart_lowvram.cli import main
from pixart_lowvram.generate import Settings, run_queue
from pixart_lowvram.jobs import Job

# A guidance scale of 1000 drives the tiny model's latents past float16's 65504 in a few steps; 4.5 does not.
CALM = Job(index=1, prompt="a lighthouse at dusk", seed=1, cfg=4.5, steps=3, width=128, height=128, name="calm")
WILD = Job(index=2, prompt="a fox in the snow", seed=2, cfg=1000.0, steps=3, width=128, height=128, name="wild")


def queue_file(tmp_path) -> str:
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"jobs": [
        {k: getattr(job, k) for k in ("prompt", "seed", "cfg", "steps", "width", "height", "name")}
        for job in (CALM, WILD)]}))
    return str(path)


def test_an_overflow_is_named_the_rest_is_made_and_the_fix_redoes_only_it(tiny_model, tmp_path, capsys):
    args = ["run", queue_file(tmp_path), "--model", tiny_model, "--device", "cpu", "--dtype", "float16",
            "--out", str(tmp_path / "run"), "-q", "--no-embed-cache"]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert "1 image(s) not made: the transformer (float16) gave non-finite values in denoise for wild" in err
    assert "--upcast transformer" in err and "Traceback" not in err
    images = tmp_path / "run" / "images"
    assert (images / "calm.png").is_file() and not (images / "wild.png").exists()
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["non_finite"] == [{"stage": "denoise", "component": "transformer", "dtype": "float16",
                                       "items": ["wild"]}]
    calm_bytes = (images / "calm.png").read_bytes()

    result = run_queue([CALM, WILD], tmp_path / "run", Settings(model=tiny_model, device="cpu", dtype="float16",
                                                                embed_cache=None, upcast=("transformer", "vae")))
    assert result.made == {"denoise": 1, "decode": 1}, "only the failed image is redone, nothing is re-encoded"
    assert not result.failures and (images / "wild.png").is_file()
    assert (images / "calm.png").read_bytes() == calm_bytes
    assert main(args) == 0, "the next plain rerun finds everything made"


def test_the_upcast_components_are_checked_before_anything_loads(tiny_model, tmp_path, capsys):
    assert main(["run", queue_file(tmp_path), "--model", tiny_model, "--device", "cpu", "--upcast", "t5",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--upcast t5: not a component" in err and "text_encoder, transformer, vae" in err
    assert not (tmp_path / "run").exists()


def test_an_overflowing_text_encoder_is_named_in_encode(tiny_model, tmp_path):
    """T5's output beyond float16's range (its final norm scaled up, as fp16 T5 checkpoints can overflow inside):
    encode names the text encoder; with it upcast, its embeddings are kept in float32 and the overflow moves on
    to the DiT's float16 input, which denoise names in turn."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = next((model / "text_encoder").glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["encoder.final_layer_norm.weight"] *= 1e6
    save_file(tensors, weights, metadata={"format": "pt"})
    settings = dict(model=str(model), device="cpu", dtype="float16", embed_cache=None)
    first = run_queue([CALM], tmp_path / "run", Settings(**settings))
    assert [(f.stage, f.component, f.dtype, f.items) for f in first.failures] == [
        ("encode", "text_encoder", "float16", ("calm",))]
    assert not list((tmp_path / "run" / "embeds").iterdir()) and not first.images["calm"].exists()
    second = run_queue([CALM], tmp_path / "run", Settings(**settings, upcast=("text_encoder",)))
    assert second.made["encode"] == 2
    assert [(f.stage, f.component, f.dtype) for f in second.failures] == [("denoise", "transformer", "float16")]


def test_an_upcast_component_is_planned_at_float32(tiny_model):
    """The planner counts an upcast component at four bytes a weight, the others as the run's dtype."""
    from pixart_lowvram.generate import planned_sizes
    from pixart_lowvram.resolve import resolve

    def sizes(*upcast):
        return planned_sizes(resolve([CALM], Settings(model=tiny_model, device="cpu", dtype="float16",
                                                     upcast=upcast), hash_weights=False))

    plain, vae, dit = sizes(), sizes("vae"), sizes("transformer")
    assert vae.vae == 2 * plain.vae and vae.vae_dtype_bytes == 4 and vae.transformer == plain.transformer
    assert dit.transformer == 2 * plain.transformer and dit.transformer_block == 2 * plain.transformer_block
    assert dit.text_encoder == plain.text_encoder and dit.vae == plain.vae
