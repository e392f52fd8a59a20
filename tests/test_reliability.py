"""When things go wrong: Ctrl-C, foreign or damaged artifacts, an edited queue, broken model folders, out of
memory, a full disk. Finished work always survives, and the message says what to do."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from pixart_lowvram import generate, run
from pixart_lowvram.cli import main
from pixart_lowvram.errors import Interrupted
from pixart_lowvram.generate import Settings, run_queue
from pixart_lowvram.jobs import parse_queue
from pixart_lowvram.reporting import Bar, Reporter

CPU32 = dict(device="cpu", dtype="float32")


def queue(*jobs: str, steps: int = 2) -> list:
    return parse_queue(f"[defaults]\nsteps = {steps}\n" + "".join(f"[[jobs]]\n{j}\n" for j in jobs), "toml")


# -- Ctrl-C ------------------------------------------------------------------------------------------------------

class StopAfterFirstImageStep(Reporter):
    """Asks the run to stop as soon as denoising has started (as a Ctrl-C would)."""

    def __init__(self, stop: threading.Event):
        self.stop = stop

    def bar(self, desc, total, unit="it", transient=False):
        stop = self.stop

        class StopBar(Bar):
            def update(self, n=1):
                if desc == "denoise":
                    stop.set()

        return StopBar()


def test_a_stop_request_ends_the_run_at_the_next_safe_point(tiny_model, tmp_path):
    jobs = queue(*(f'prompt = "p{i}"\nseed = {i}' for i in range(4)))
    stop = threading.Event()
    with pytest.raises(Interrupted, match="run the same command again|Run the same command again"):
        run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, **CPU32), StopAfterFirstImageStep(stop), stop)
    # The image in progress was finished and saved; nothing after it was started.
    assert len(list((tmp_path / "run" / "latents").glob("*.safetensors"))) == 1
    assert list((tmp_path / "run" / "images").iterdir()) == []
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["encode", "denoise"]
    assert [s["items"] for s in manifest["stages"]] == [5, 1], "the stopped stage counts what it wrote"

    resumed = run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, **CPU32))
    assert resumed.made == {"denoise": 3, "decode": 4}


def test_ctrl_c_exits_130_and_says_how_to_resume(tiny_model, tmp_path):
    q = tmp_path / "q.toml"
    q.write_text("[defaults]\nsteps = 40\n" + "".join(f'[[jobs]]\nprompt = "p{i}"\nseed = {i}\n' for i in range(30)))
    cmd = [sys.executable, "-m", "pixart_lowvram.cli", "run", str(q), "--model", tiny_model,
           "--out", str(tmp_path / "run"), "--device", "cpu", "-q"]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    latents = tmp_path / "run" / "latents"
    deadline = time.monotonic() + 120
    while not (latents.is_dir() and any(latents.glob("*.safetensors"))):
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "run the same command again" in err.lower() and "Traceback" not in err
    made = len(list(latents.glob("*.safetensors")))
    assert 1 <= made < 30
    stages = {s["name"]: s["items"] for s in json.loads((tmp_path / "run" / "run.json").read_text())["stages"]}
    assert stages["denoise"] == made, "run.json counts the latents the stopped stage wrote"
    assert subprocess.run(cmd, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode == 0
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 30


# -- artifacts that are not what they claim ---------------------------------------------------------------------

def test_foreign_or_misshapen_artifacts_are_redone(tiny_model, tmp_path):
    jobs = queue('prompt = "a"\nseed = 1\nname = "a"', 'prompt = "b"\nseed = 2\nname = "b"')
    settings = Settings(model=tiny_model, embed_cache=None, **CPU32)  # no shared copy to restore from
    first = run_queue(jobs, tmp_path / "run", settings)
    a, b = first.items
    folder = run.RunFolder(tmp_path / "run")

    # An embedding of another text under a's name (and a's latent lost, so it is needed): its key says so.
    shutil.copy(folder.embed_path(b.prompt_key), folder.embed_path(a.prompt_key))
    folder.latent_path(a.latent_key).unlink()
    # A latent with the right key but the wrong shape.
    folder.write_tensors(folder.latent_path(b.latent_key), {"latents": torch.zeros(4, 8, 8)}, b.latent_key)
    for item in first.items:
        first.images[item.id].unlink()
    again = run_queue(jobs, tmp_path / "run", settings)
    assert again.made == {"encode": 1, "denoise": 2, "decode": 2}
    assert load_file(str(folder.embed_path(a.prompt_key)))["embeds"].shape == (120, 32)


def test_an_image_made_with_other_settings_is_redone(tiny_model, tmp_path):
    jobs = queue('prompt = "a"\nseed = 1\nname = "a"')
    run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, **CPU32))
    edited = queue('prompt = "a"\nseed = 1\nname = "a"\ncfg = 7')
    result = run_queue(edited, tmp_path / "run", Settings(model=tiny_model, **CPU32))
    assert result.made == {"denoise": 1, "decode": 1}  # other parameters: made again
    # the first image is kept; the new one takes the next free name
    assert result.images["a~2"] == tmp_path / "run" / "images" / "a~2.png"
    assert (tmp_path / "run" / "images" / "a.png").is_file()


def test_an_edited_queue_adds_redoes_and_leaves_removed_images_alone(tiny_model, tmp_path):
    settings = Settings(model=tiny_model, **CPU32)
    run_queue(queue('prompt = "kept"\nseed = 1\nname = "kept"', 'prompt = "edited"\nseed = 2\nname = "edited"',
                    'prompt = "removed"\nseed = 3\nname = "removed"'), tmp_path / "run", settings)
    result = run_queue(queue('prompt = "kept"\nseed = 1\nname = "kept"',
                             'prompt = "edited, now in colour"\nseed = 2\nname = "edited"',
                             'prompt = "new"\nseed = 4\nname = "new"'), tmp_path / "run", settings)
    assert result.made == {"encode": 2, "denoise": 2, "decode": 2}
    # the edited job's new image is edited~2.png: its first image, made from other parameters, is kept
    assert [it.id for it in result.items] == ["kept", "edited~2", "new"]
    assert [p.name for p in result.left_alone] == ["edited.png", "removed.png"]
    assert (tmp_path / "run" / "images" / "removed.png").is_file()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["left_alone"] == ["images/edited.png",
                                                                                      "images/removed.png"]


# -- model folders ----------------------------------------------------------------------------------------------

@pytest.fixture
def model_copy(tiny_model, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_model, path)
    return path


def model_error(model, tmp_path, capsys, *extra) -> str:
    code = main(["generate", "x", "--model", str(model), "--out", str(tmp_path / "run"), "--device", "cpu", "-q",
                 *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_a_missing_component_folder_is_named(model_copy, tmp_path, capsys):
    shutil.rmtree(model_copy / "vae")
    assert f"{model_copy / 'vae'}: component folder missing" in model_error(model_copy, tmp_path, capsys)


def test_truncated_weights_are_named_before_anything_loads(model_copy, tmp_path, capsys):
    weights = model_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    err = model_error(model_copy, tmp_path, capsys)
    assert f"{weights}: truncated" in err
    assert not (tmp_path / "run").exists()


def test_weights_that_do_not_match_the_config_are_a_clear_error(model_copy, tmp_path, capsys):
    config = json.loads((model_copy / "transformer" / "config.json").read_text())
    config["attention_head_dim"] *= 2
    (model_copy / "transformer" / "config.json").write_text(json.dumps(config))
    err = model_error(model_copy, tmp_path, capsys)
    assert f"{model_copy / 'transformer'}: cannot load transformer" in err


def test_a_folder_that_is_not_a_pixart_model_is_refused(model_copy, tmp_path, capsys):
    index = json.loads((model_copy / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (model_copy / "model_index.json").write_text(json.dumps(index))
    assert "not a PixArt one" in model_error(model_copy, tmp_path, capsys)


def test_pickled_weights_are_refused_unless_asked_for(model_copy, tmp_path, capsys):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_copy / "vae")
    shutil.rmtree(model_copy / "vae")
    vae.save_pretrained(model_copy / "vae", safe_serialization=False)
    assert list((model_copy / "vae").glob("*.bin"))
    err = model_error(model_copy, tmp_path, capsys)
    assert "no .safetensors weights" in err and "--allow-pickle" in err

    code = main(["generate", "x", "--steps", "2", "--model", str(model_copy), "--out", str(tmp_path / "run"),
                 "--device", "cpu", "-q", "--allow-pickle"])
    assert code == 0


# -- out of memory, a full disk, where files go -----------------------------------------------------------------

def test_out_of_memory_keeps_finished_work_and_exits_3(tiny_model, tmp_path, capsys, monkeypatch):
    real = generate.decode_items

    def decode_then_run_out(info, items, **kw):
        real(info, items[:1], **kw)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(generate, "decode_items", decode_then_run_out)
    q = tmp_path / "q.toml"
    q.write_text('[defaults]\nsteps = 2\n[[jobs]]\nprompt = "a"\nseed = 1\ncount = 3\n')
    code = main(["run", str(q), "--model", tiny_model, "--out", str(tmp_path / "run"), "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 3
    assert "ran out of memory in stage decode" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    assert len(list((tmp_path / "run" / "latents").glob("*.safetensors"))) == 3
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 1
    stages = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]
    assert [(s["name"], s["items"]) for s in stages] == [("encode", 2), ("denoise", 3), ("decode", 1)]

    monkeypatch.setattr(generate, "decode_items", real)
    assert main(["run", str(q), "--model", tiny_model, "--out", str(tmp_path / "run"), "--device", "cpu", "-q"]) == 0
    assert "made" in capsys.readouterr().out


@pytest.mark.parametrize("gone", ["embeds", "latents"])
def test_an_artifact_deleted_between_stages_is_named_and_the_same_command_remakes_it(tiny_model, tmp_path, capsys,
                                                                                      monkeypatch, gone):
    """An embedding removed after encode wrote it, or latents after denoise: the next stage's read names the file
    (exit code 1, no traceback), what was finished stays, and the same command makes what is missing."""
    stage = {"embeds": "denoise_items", "latents": "decode_items"}[gone]
    real = getattr(generate, stage)

    def remove_then_run(ctx, items, **kw):
        victim = sorted((tmp_path / "run" / gone).glob("*.safetensors"))[0]
        victim.unlink()
        return real(ctx, items, **kw)

    monkeypatch.setattr(generate, stage, remove_then_run)
    q = tmp_path / "q.toml"
    q.write_text('[defaults]\nsteps = 2\n[[jobs]]\nprompt = "a"\nseed = 1\ncount = 2\n')
    command = ["run", str(q), "--model", tiny_model, "--out", str(tmp_path / "run"), "--device", "cpu", "-q",
               "--no-embed-cache"]
    assert main(command) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run' / gone}" in err and "gone or unreadable" in err, err
    assert "run the same command again" in err and "Traceback" not in err
    monkeypatch.setattr(generate, stage, real)
    assert main(command) == 0
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 2


def test_a_full_disk_is_a_clear_error_and_keeps_what_was_written(tiny_model, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run, "save", full)  # every safetensors artifact goes through it
    code = main(["generate", "x", "--steps", "2", "--model", tiny_model, "--out", str(tmp_path / "run"),
                 "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "the disk is full" in err and "Traceback" not in err
    assert not [p for p in (tmp_path / "run").rglob("*.tmp")]


def test_an_unusable_output_folder_is_reported_before_models_load(tiny_model, tmp_path, capsys, monkeypatch):
    from pixart_lowvram import encode

    monkeypatch.setattr(encode, "load_text_encoder", lambda *a: pytest.fail("a model was loaded"))
    (tmp_path / "file").write_text("")
    code = main(["generate", "x", "--model", tiny_model, "--out", str(tmp_path / "file" / "run"), "--device", "cpu"])
    assert code == 1 and "cannot create the run folder" in capsys.readouterr().err


def test_nothing_is_written_outside_the_run_folder(tiny_model, tmp_path):
    jobs = queue('prompt = "../../../escape/evil"\nseed = 1', 'prompt = "/etc/passwd"\nseed = 2',
                 'prompt = "C:\\\\Windows\\\\x"\nseed = 3')
    before = set(tmp_path.iterdir())
    run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, **CPU32))
    assert set(tmp_path.iterdir()) - before == {tmp_path / "run"}
    images = sorted(p.name for p in (tmp_path / "run" / "images").iterdir())
    assert images == ["001-escape-evil.png", "002-etc-passwd.png", "003-c-windows-x.png"]


def test_two_runs_cannot_share_a_folder(tiny_model, tmp_path):
    from pixart_lowvram.errors import RunFolderError

    with run.RunFolder(tmp_path / "run"):
        with pytest.raises(RunFolderError, match="another pixart-lowvram run"):
            run_queue(queue('prompt = "a"'), tmp_path / "run", Settings(model=tiny_model, **CPU32))


def test_an_embedding_cache_that_cannot_be_written_leaves_no_partial_file(tmp_path, monkeypatch):
    """A full disk while storing a cached embedding costs a later run an encode, and leaves nothing behind."""
    import errno

    from pixart_lowvram.run import EmbeddingCache

    source = tmp_path / "embed.safetensors"
    source.write_bytes(b"x" * 1000)
    cache = EmbeddingCache(tmp_path / "cache")
    real_replace = os.replace

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    cache.store("k", source)
    monkeypatch.setattr(os, "replace", real_replace)
    assert list((tmp_path / "cache").iterdir()) == []
    cache.store("k", source)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k.safetensors"]
