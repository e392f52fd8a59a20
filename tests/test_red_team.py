"""The run folder and the queue against a careless user and a hostile folder: nothing finished is lost, nothing
outside the tool's own files is touched, every limit is a clear error, every failure has its exit code."""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image, PngImagePlugin

from conftest import max_diff, pixels, reference_image
from pixart_lowvram import generate, jobs as jobs_module
from pixart_lowvram.cli import main
from pixart_lowvram.errors import Interrupted, QueueError, RunFolderError
from pixart_lowvram.generate import Settings, run_queue
from pixart_lowvram.items import prompt_folder_name
from pixart_lowvram.jobs import MAX_IMAGES, MAX_PROMPT, load_queue, parse_queue
from pixart_lowvram.reporting import Reporter
from pixart_lowvram.run import MANIFEST, RunFolder, manifest_problem

CPU32 = dict(device="cpu", dtype="float32")


def queue(*jobs: str, steps: int = 2) -> list:
    return parse_queue(f"[defaults]\nsteps = {steps}\n" + "".join(f"[[jobs]]\n{j}\n" for j in jobs), "toml")


class Notes(Reporter):
    """Keeps what the library tells the user."""

    def __init__(self):
        self.messages: list[str] = []

    def info(self, message: str) -> None:
        self.messages.append(message)


def seeds(result) -> list[int]:
    return [it.seed for it in result.items]


def cli(*args: str, tiny_model: str | None = None) -> int:
    model = ["--model", tiny_model] if tiny_model else []
    return main([*args, *model, "--device", "cpu", "-q"])


# -- 1. a new image never replaces one made from other parameters -------------------------------------------------

def test_generate_twice_with_other_seeds_keeps_both_images_and_says_where_each_went(tiny_model, tmp_path, capsys,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("generate", "a fox", "--seed", "1", "--steps", "2", tiny_model=tiny_model) == 0
    first = capsys.readouterr().out
    assert cli("generate", "a fox", "--seed", "2", "--steps", "2", tiny_model=tiny_model) == 0
    second = capsys.readouterr().out
    images = tmp_path / "runs" / "a-fox" / "images"
    assert sorted(p.name for p in images.iterdir()) == ["001-a-fox.png", "001-a-fox~2.png"]
    assert "runs/a-fox/images/001-a-fox.png" in first and "runs/a-fox/images/001-a-fox~2.png" in second
    with Image.open(images / "001-a-fox.png") as im:
        assert "Seed: 1," in im.text["parameters"]  # the first image is the first seed's, untouched


def test_generate_gives_prompts_folders_of_their_own():
    assert prompt_folder_name("a lighthouse at dusk") == "a-lighthouse-at-dusk"
    # no letters or digits at all, or the same first 40 characters: a short hash of the whole prompt tells them apart
    assert prompt_folder_name("🦊🌙") != prompt_folder_name("🐙") and prompt_folder_name("🦊🌙").startswith("prompt-")
    long = "a very long prompt that starts the same way as another one, "
    assert prompt_folder_name(long + "red") != prompt_folder_name(long + "blue")


def test_a_file_of_the_users_in_images_is_never_replaced(tiny_model, tmp_path):
    folder = tmp_path / "run"
    run_queue(queue('prompt = "a"\nseed = 1\nname = "fox"'), folder, Settings(model=tiny_model, **CPU32))
    (folder / "images" / "cat.png").write_bytes(b"my own cat")
    notes = Notes()
    result = run_queue(queue('prompt = "a"\nseed = 1\nname = "fox"', 'prompt = "b"\nseed = 2\nname = "cat"'),
                       folder, Settings(model=tiny_model, **CPU32), reporter=notes)
    assert (folder / "images" / "cat.png").read_bytes() == b"my own cat"
    assert result.images["cat~2"].is_file() and result.made["decode"] == 1
    assert any("cat.png holds an image made from other parameters" in m for m in notes.messages)


# -- 2. a damaged run.json loses no drawn seed ---------------------------------------------------------------------

def test_a_damaged_manifest_keeps_the_drawn_seeds_from_the_finished_images(tiny_model, tmp_path):
    folder = tmp_path / "run"
    jobs = queue('prompt = "a drawn seed"\ncount = 2')
    first = run_queue(jobs, folder, Settings(model=tiny_model, **CPU32))
    (folder / MANIFEST).write_text('{"version": 1, "drawn_seeds": {')  # torn
    notes = Notes()
    again = run_queue(jobs, folder, Settings(model=tiny_model, **CPU32), reporter=notes)
    assert seeds(again) == seeds(first)
    assert again.made == {} and [s.skipped for s in again.stages] == [True, True, True]
    assert any("run.json was damaged" in m and "2 drawn seed(s) were recovered" in m for m in notes.messages)
    assert json.loads((folder / MANIFEST).read_text())["drawn_seeds"]  # written anew, with the seeds


def test_a_damaged_manifest_before_any_image_keeps_the_seeds_the_latents_record(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    jobs = queue('prompt = "a drawn seed"\ncount = 2')

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    real = generate.decode_items
    monkeypatch.setattr(generate, "decode_items", stopped)  # stopped after denoise: latents, no images yet
    with pytest.raises(Interrupted):
        run_queue(jobs, folder, Settings(model=tiny_model, **CPU32))
    drawn = [item["seed"] for item in json.loads((folder / MANIFEST).read_text())["items"]]
    (folder / MANIFEST).write_text("{")
    monkeypatch.setattr(generate, "decode_items", real)
    again = run_queue(jobs, folder, Settings(model=tiny_model, **CPU32))
    assert seeds(again) == drawn and again.made == {"decode": 2}


def test_an_image_whose_seed_cannot_be_recovered_is_kept_and_the_new_one_named_apart(tiny_model, tmp_path):
    folder = tmp_path / "run"
    jobs = queue('prompt = "a drawn seed"')
    first = run_queue(jobs, folder, Settings(model=tiny_model, **CPU32))
    png = first.images[first.items[0].id]
    with Image.open(png) as im:  # an image that records its key but not where its seed came from
        meta = json.loads(im.text["pixart_lowvram"])
        meta.pop("seed_slot")
        info = PngImagePlugin.PngInfo()
        info.add_text("pixart_lowvram", json.dumps(meta))
        im.save(png, pnginfo=info)
    before = png.read_bytes()
    for latent in (folder / "latents").iterdir():  # nor does any other file record it
        latent.unlink()
    (folder / MANIFEST).write_text("not json")
    again = run_queue(jobs, folder, Settings(model=tiny_model, **CPU32))
    assert png.read_bytes() == before
    assert again.items[0].id == first.items[0].id + "~2" and again.images[again.items[0].id].is_file()


# -- 3. the lock ---------------------------------------------------------------------------------------------------

def test_a_planted_lock_link_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(target)
    with pytest.raises(RunFolderError, match="symbolic link"):
        RunFolder(tmp_path / "run").open()
    assert target.read_text() == "keep me"


def test_an_existing_lock_file_is_not_truncated(tmp_path):
    with RunFolder(tmp_path / "run"):
        pass
    (tmp_path / "run" / ".lock").write_text("pid 42")
    with RunFolder(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").read_text() == "pid 42"


# -- 4. only the tool's own files are removed or replaced --------------------------------------------------------

def test_a_folder_of_the_users_own_files_is_refused_untouched(tiny_model, tmp_path, capsys):
    mine = tmp_path / "photos"
    (mine / "images").mkdir(parents=True)
    files = {mine / "run.json": '{"my": "settings"}', mine / ".draft.tmp": "draft",
             mine / "images" / "fox.png": "fox", mine / "images" / ".vacation.png.tmp": "vacation"}
    for path, text in files.items():
        path.write_text(text)
    code = cli("generate", "x", "--steps", "2", "--out", str(mine), tiny_model=tiny_model)
    err = capsys.readouterr().err
    assert code == 2 and "not an empty folder nor a pixart-lowvram run folder" in err and "Traceback" not in err
    assert {path: path.read_text() for path in files} == files
    assert sorted(p.name for p in mine.iterdir()) == [".draft.tmp", "images", "run.json"]


def test_a_run_removes_only_its_own_temporaries_and_never_through_a_linked_folder(tmp_path):
    with RunFolder(tmp_path / "run") as folder:
        folder.write_manifest({"version": 1, "items": []})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run" / "embeds").rmdir()
    (tmp_path / "run" / "embeds").symlink_to(elsewhere)
    kept = [tmp_path / "run" / ".draft.tmp", tmp_path / "run" / "images" / ".vacation.png.tmp",
            elsewhere / ".x.safetensors.pixart-lowvram-abc123.tmp"]
    ours = tmp_path / "run" / "latents" / ".k.safetensors.pixart-lowvram-x1y2z3.tmp"
    for path in [*kept, ours]:
        path.write_text("")
    with RunFolder(tmp_path / "run"):
        pass
    assert all(path.exists() for path in kept) and not ours.exists()


# -- 5. limits ------------------------------------------------------------------------------------------------------

def test_a_queue_of_too_many_images_is_refused_before_anything_else():
    text = "".join(f'[[jobs]]\nprompt = "p{i}"\ncount = 10000\n' for i in range(MAX_IMAGES // 10000 + 1))
    with pytest.raises(QueueError, match=f"asks for {MAX_IMAGES + 10000} images; one queue makes at most"):
        parse_queue(text, "toml")


def test_a_queue_linked_to_an_endless_device_is_refused_at_once(tmp_path):
    (tmp_path / "q.toml").symlink_to("/dev/zero")
    start = time.perf_counter()
    with pytest.raises(QueueError, match="not a regular file"):
        load_queue(tmp_path / "q.toml")
    assert time.perf_counter() - start < 1


def test_a_queue_file_past_the_size_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs_module, "MAX_QUEUE_BYTES", 2**20)
    (tmp_path / "q.jsonl").write_text('{"prompt": "a"}\n' * 70_000)  # 1.1 MB
    with pytest.raises(QueueError, match="larger than 1 MiB"):
        load_queue(tmp_path / "q.jsonl")


def test_a_prompt_past_the_limit_names_its_job_and_field():
    with pytest.raises(QueueError) as caught:
        parse_queue(f'[[jobs]]\nprompt = "ok"\n[[jobs]]\nname = "long"\nprompt = "{"a." * MAX_PROMPT}"\n', "toml")
    assert f"job 2 ('long'), field 'prompt': must be at most {MAX_PROMPT} characters" in str(caught.value)


def test_a_prompt_at_the_limit_is_cleaned_quickly_and_drawn_as_the_reference_draws_it(tiny_model, reference_pipeline,
                                                                                       tmp_path):
    from diffusers import PixArtAlphaPipeline

    worst = "a." * (MAX_PROMPT // 2)  # the slowest text for the reference's caption cleaning we know of
    start = time.perf_counter()
    PixArtAlphaPipeline.__new__(PixArtAlphaPipeline)._clean_caption(worst)
    assert time.perf_counter() - start < 2
    prompt = ("a lighthouse at dusk, " * 400)[:MAX_PROMPT]
    result = run_queue(queue(f'prompt = "{prompt}"\nseed = 3'), tmp_path / "run", Settings(model=tiny_model, **CPU32))
    expected = reference_image(reference_pipeline, prompt=prompt, steps=2, seed=3)
    assert max_diff(pixels(result.images[result.items[0].id]), expected) <= 1


def test_a_long_prompt_among_others_is_named_once_not_logged_with_every_texts_padding(tiny_model, reference_pipeline,
                                                                                     tmp_path):
    """The reference pipeline logs, for a group of texts with one past T5's limit, the cut tail of every text in it,
    padding included: 10,000 '<pad>' for one 400-word prompt among four. The stage says which texts fill the limit,
    and the images are the reference's all the same."""
    long = " ".join(f"word{i}" for i in range(400))
    jobs = queue(f'prompt = "{long}"\nseed = 3', 'prompt = "a red fox"\nseed = 4', 'prompt = "a boat"\nseed = 5')
    notes, logged = Notes(), []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    pipeline_log = logging.getLogger("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha")
    pipeline_log.addHandler(handler)
    try:
        result = run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, embed_cache=None, **CPU32), notes)
    finally:
        pipeline_log.removeHandler(handler)
    assert not [m for m in logged if "<pad>" in m]
    assert [m for m in notes.messages if "tokens T5 reads" in m] == [
        "1 text(s) reach the 120 tokens T5 reads; anything after them is left out, as the reference pipeline leaves "
        "it: 'word0 word1 word2 word3 word4 word5 wor…'"]
    expected = reference_image(reference_pipeline, prompt=long, steps=2, seed=3)
    assert max_diff(pixels(result.images[result.items[0].id]), expected) <= 1


def test_a_manifest_linked_to_an_endless_device_is_not_read(tiny_model, tmp_path):
    folder = tmp_path / "run"
    run_queue(queue('prompt = "a"\nseed = 1'), folder, Settings(model=tiny_model, **CPU32))
    (folder / MANIFEST).unlink()
    (folder / MANIFEST).symlink_to("/dev/zero")
    earlier = RunFolder(folder).previous_run()
    assert earlier.manifest == {} and "not a regular file" in earlier.damage


# -- 6. values read back from run.json are checked like the queue's ---------------------------------------------

def test_a_manifest_seed_that_is_not_a_number_is_not_trusted(tiny_model, tmp_path):
    assert "drawn_seeds" in manifest_problem({"version": 1, "drawn_seeds": {"slot-0": [True]}})
    assert manifest_problem({"version": 1, "drawn_seeds": {"slot-0": [7]}, "items": []}) is None
    folder = tmp_path / "run"
    jobs = queue('prompt = "a drawn seed"')
    first = run_queue(jobs, folder, Settings(model=tiny_model, **CPU32))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["drawn_seeds"] = {slot: [True] for slot in manifest["drawn_seeds"]}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    again = run_queue(jobs, folder, Settings(model=tiny_model, **CPU32))
    assert seeds(again) == seeds(first) and again.made == {}  # recovered from the image


# -- 7. a name the user gave is theirs ----------------------------------------------------------------------------

def test_a_made_up_id_yields_to_a_name_the_user_gave(tiny_model, tmp_path):
    result = run_queue(queue('prompt = "cat"\nseed = 1', 'prompt = "dog"\nseed = 2\nname = "001-cat"'),
                       tmp_path / "run", Settings(model=tiny_model, **CPU32))
    assert [it.id for it in result.items] == ["001-cat~2", "001-cat"]
    with Image.open(result.images["001-cat"]) as im:
        assert im.text["parameters"].startswith("dog")


def test_a_name_that_another_jobs_images_would_take_is_refused_naming_both():
    with pytest.raises(QueueError) as caught:
        parse_queue('[[jobs]]\nprompt = "a"\nname = "x"\ncount = 2\n[[jobs]]\nprompt = "b"\nname = "X-2"\n', "toml")
    assert "job 2 ('X-2'), field 'name': name 'X-2' is also the file name of image 2 of job 1 ('x', count 2)" in str(
        caught.value)
    parse_queue('[[jobs]]\nprompt = "a"\nname = "x"\ncount = 2\n[[jobs]]\nprompt = "b"\nname = "x-3"\n', "toml")


# -- 8. --force makes the same images again; --new-seeds draws again --------------------------------------------

def test_force_redoes_the_same_images_and_new_seeds_draws_new_ones_beside_them(tiny_model, tmp_path):
    folder = tmp_path / "run"
    jobs = queue('prompt = "a drawn seed"\nname = "drawn"')
    first = run_queue(jobs, folder, Settings(model=tiny_model, **CPU32))
    forced = run_queue(jobs, folder, Settings(model=tiny_model, force=True, **CPU32))
    assert seeds(forced) == seeds(first) and forced.made["decode"] == 1 and forced.items[0].id == "drawn"
    fresh = run_queue(jobs, folder, Settings(model=tiny_model, new_seeds=True, **CPU32))
    assert seeds(fresh) != seeds(first) and fresh.items[0].id == "drawn~2"
    assert (folder / "images" / "drawn.png").is_file()
    assert seeds(run_queue(jobs, folder, Settings(model=tiny_model, **CPU32))) == seeds(fresh)  # remembered


# -- 9. exit codes ------------------------------------------------------------------------------------------------

def test_every_exit_code_comes_with_a_message_and_no_traceback(tiny_model, tmp_path, capsys, monkeypatch):
    good = tmp_path / "good.toml"
    good.write_text('[defaults]\nsteps = 2\n[[jobs]]\nprompt = "a"\nseed = 1\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[[jobs]]\nprompt = ""\n')

    def run(queue, out) -> tuple[int, str]:
        code = cli("run", str(queue), "--out", str(tmp_path / out), tiny_model=tiny_model)
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return code, err

    assert run(good, "ok")[0] == 0
    with RunFolder(tmp_path / "ok"):  # another run holds it
        assert run(good, "ok") == (1, f"error: {tmp_path / 'ok'}: another pixart-lowvram run is using this folder\n")
    assert run(bad, "bad")[0] == 2

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(generate, "denoise_items", out_of_memory)
    code, err = run(good, "oom")
    assert code == 3 and "ran out of memory in stage denoise" in err

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "denoise_items", ctrl_c)
    code, err = run(good, "stopped")
    assert code == 130 and "stopped during denoise" in err


def test_a_run_folder_that_cannot_be_written_exits_1(tiny_model, tmp_path, capsys, monkeypatch):
    from pixart_lowvram import run

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run.tempfile, "NamedTemporaryFile", read_only)  # how a read-only folder answers
    assert cli("generate", "x", "--out", str(tmp_path / "run"), tiny_model=tiny_model) == 1
    assert "not writable (Permission denied)" in capsys.readouterr().err


def test_help_lists_every_exit_code():
    result = subprocess.run([sys.executable, "-m", "pixart_lowvram.cli", "--help"], capture_output=True, text=True)
    text = " ".join(result.stdout.split())
    for code in ("0 done", "1 the run folder could not be used or written", "2 bad input", "3 out of GPU memory",
                 "4 some images not made", "130 interrupted"):
        assert code in text


def test_ctrl_c_while_the_libraries_load_exits_130_without_a_traceback():
    """Importing the command loads no heavy library, and a Ctrl-C while main loads them is handled like any
    other: here the interrupt lands on torch's import."""
    script = (
        "import sys\n"
        "from pixart_lowvram import cli\n"
        "assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules), 'the CLI imported a heavy library'\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['pixart-lowvram', 'plan', 'q.toml', '--device', 'cpu']\n"
        "sys.exit(cli.console_main())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and "interrupted" in result.stderr


# -- 11. artifacts follow the umask --------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_artifacts_and_folders_follow_the_umask(tmp_path, umask, file_mode, folder_mode):
    old = os.umask(umask)
    try:
        with RunFolder(tmp_path / "run") as folder:
            folder.write_tensors(folder.embed_path("k"), {"embeds": torch.zeros(2)}, "k")
            folder.write_png(folder.images / "x.png", Image.new("RGB", (8, 8)), {"pixart_lowvram": "{}"})
            folder.write_manifest({"version": 1, "items": []})
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for path in (run / "run.json", run / "embeds" / "k.safetensors", run / "images" / "x.png"):
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    for path in (run, run / "images"):
        assert stat.S_IMODE(path.stat().st_mode) == folder_mode, path


# -- 12. messages that name the right thing ------------------------------------------------------------------------

def test_images_being_a_file_names_it(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("")
    (tmp_path / "run" / "images").write_text("")
    with pytest.raises(RunFolderError, match=f"{tmp_path / 'run' / 'images'}: is a file, not a folder"):
        RunFolder(tmp_path / "run").open()


def test_a_name_with_a_non_ascii_letter_is_told_why():
    with pytest.raises(QueueError, match="only ASCII letters"):
        parse_queue('[[jobs]]\nprompt = "a"\nname = "é"\n', "toml")


def test_model_on_a_file_says_it_is_a_file(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert cli("generate", "x", "--model", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "r")) == 2
    assert "is a file; --model takes a model folder" in capsys.readouterr().err


def test_a_damaged_demo_model_is_built_again(tmp_path):
    from pixart_lowvram.demo import demo_model
    from pixart_lowvram.models import resolve_model

    model = demo_model(tmp_path, Reporter())
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    notes = Notes()
    assert demo_model(tmp_path, notes) == model
    resolve_model(str(model))  # whole again
    assert any("is damaged" in m and "building it again" in m for m in notes.messages)


# -- 10. plan with a budget on a machine without a GPU --------------------------------------------------------------

def test_plan_with_a_budget_and_no_gpu_shows_the_plan_on_such_a_gpu_and_says_why(tiny_model, tmp_path, capsys):
    q = tmp_path / "q.toml"
    q.write_text('[[jobs]]\nprompt = "a"\n')
    assert main(["plan", str(q), "--model", tiny_model, "--device", "cpu", "--vram-budget", "2GiB"]) == 0
    out, err = capsys.readouterr()
    assert "plan for VRAM budget 2" in out and "unconstrained" not in out
    assert "planned for a GPU with this budget" in err and "the run would use the CPU" in err


def test_a_long_queue_keeps_one_short_manifest_line_per_image(tiny_model, tmp_path):
    import threading

    jobs = queue('prompt = "a lighthouse"\ncount = 2000')
    stop = threading.Event()
    stop.set()  # stops as the first stage starts: the manifest is written by then
    with pytest.raises(Interrupted):
        run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, **CPU32), stop=stop)
    text = (tmp_path / "run" / MANIFEST).read_text()
    item_lines = [line for line in text.splitlines() if line.startswith('    {"id": ')]
    assert len(item_lines) == 2000 and len(json.loads(text)["items"]) == 2000
    assert max(len(line) for line in item_lines) < 800
