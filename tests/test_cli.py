"""The command line, as a user types it: exit codes, messages without tracebacks, the summary table."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pixart_lowvram import resolve
from pixart_lowvram.cli import main


def test_run_a_queue_file_prints_a_summary_and_says_where_the_images_are(tiny_model, tmp_path, capsys):
    queue = tmp_path / "q.toml"
    queue.write_text('[defaults]\nsteps = 2\n[[jobs]]\nprompt = "a lighthouse"\nseed = 1\nname = "light"\n')
    code = main(["run", str(queue), "--model", tiny_model, "--out", str(tmp_path / "run"), "--device", "cpu", "-q"])
    out = capsys.readouterr().out
    assert code == 0
    for stage in ("encode", "denoise", "decode"):
        assert stage in out
    assert "1/1 images in" in out and str(tmp_path / "run" / "images") in out
    assert (tmp_path / "run" / "images" / "light.png").is_file()


def test_generate_makes_count_images_with_consecutive_seeds(tiny_model, tmp_path):
    code = main(["generate", "a red kite", "--seed", "10", "--count", "2", "--steps", "2", "--model", tiny_model,
                 "--out", str(tmp_path / "run"), "--device", "cpu", "-q"])
    assert code == 0
    items = json.loads((tmp_path / "run" / "run.json").read_text())["items"]
    assert [i["seed"] for i in items] == [10, 11]


def test_a_bad_queue_is_reported_whole_before_any_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(resolve, "resolve_model", lambda *a: pytest.fail("the model was touched"))
    queue = tmp_path / "q.json"
    queue.write_text(json.dumps({"jobs": [{"prompt": ""}, {"prompt": "ok", "stepz": 3}, {"prompt": "x", "width": 100}]}))
    code = main(["run", str(queue), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "job 1" in err and "'prompt'" in err
    assert "job 2" in err and "did you mean 'steps'" in err
    assert "job 3" in err and "'width'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    code = main(["generate", "x", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "no such model folder" in capsys.readouterr().err


def test_help_teaches_with_examples():
    result = subprocess.run([sys.executable, "-m", "pixart_lowvram.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "examples:" in result.stdout and "pixart-lowvram demo" in result.stdout
    result = subprocess.run([sys.executable, "-m", "pixart_lowvram.cli", "run", "--help"], capture_output=True,
                            text=True)
    assert "[[jobs]]" in result.stdout and "--vram-budget" in result.stdout


def test_demo_runs_offline_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu", "-q"]) == 0
    assert "5/5 images in" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "demo" / "images").iterdir())
    assert names == ["oppenheimer.png", "pirate-ship.png", "supercar-1.png", "supercar-2.png", "supercar-3.png"]
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 3


def test_the_command_ends_the_process_with_mains_code_once_its_output_is_out(tiny_model, tmp_path):
    """console_main (the installed command) runs main, flushes what it printed and ends the process at once with
    main's code: no line after it runs (Python's teardown of the libraries is skipped)."""
    queue = tmp_path / "q.toml"
    queue.write_text('[[jobs]]\nprompt = "a lighthouse"\n')
    script = ("import sys\nfrom pixart_lowvram import cli\n"
              f"sys.argv = ['pixart-lowvram', 'plan', {str(queue)!r}, '--model', {tiny_model!r}, '--device', 'cpu']\n"
              "cli.console_main()\nprint('not reached')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "decode" in result.stdout and "not reached" not in result.stdout  # the plan, printed and flushed
    bad = subprocess.run([sys.executable, "-c", script.replace("'plan'", "'plan', '--vram-budget', 'lots'")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--vram-budget" in bad.stderr


def test_plan_reads_configs_and_headers_only_and_never_touches_the_gpu(tiny_model, tmp_path, capsys, monkeypatch):
    """`plan` on a machine with a GPU: the plan for the budget, without starting CUDA, loading or hashing weights."""
    import torch

    from pixart_lowvram import generate, models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as if on a GPU machine
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: pytest.fail("CUDA was started"))
    monkeypatch.setattr(models, "file_sha256", lambda *a: pytest.fail("a weights file was hashed"))
    for stage in ("encode_texts", "denoise_items", "decode_items"):
        monkeypatch.setattr(generate, stage, lambda *a, **k: pytest.fail("a stage ran"))
    queue = tmp_path / "q.toml"
    queue.write_text('[[jobs]]\nprompt = "a fox"\nwidth = 256\nheight = 256\n')
    assert main(["plan", str(queue), "--model", tiny_model, "--vram-budget", "1.5GiB"]) == 0
    out, err = capsys.readouterr()
    assert "plan for VRAM budget 1.50 GiB" in out and "encode" in out and "decode" in out
    assert not (tmp_path / "runs").exists()


def test_plan_without_a_gpu_says_the_budget_is_for_a_gpu(tiny_model, tmp_path, capsys):
    queue = tmp_path / "q.toml"
    queue.write_text('[[jobs]]\nprompt = "a fox"\n')
    assert main(["plan", str(queue), "--model", tiny_model, "--device", "cpu", "--vram-budget", "100MiB"]) == 2
    err = capsys.readouterr().err
    assert "planned for a GPU with this budget; on this machine the run would use the CPU" in err
    assert "a VRAM budget of 0.10 GiB is too small to denoise" in err and "Traceback" not in err
    assert main(["plan", str(queue), "--model", tiny_model, "--device", "cpu", "--vram-budget", "1GiB"]) == 0
    out, err = capsys.readouterr()
    assert "plan for VRAM budget 1.00 GiB" in out and "the run would use the CPU" in err


def test_plan_of_a_hub_model_reads_its_headers_from_the_hub_without_downloading_weights(tiny_model, tmp_path,
                                                                                        monkeypatch):
    """A hub id whose weights are not in the cache: `plan` fetches configs, tokenizer and index files, and reads
    each weights file's safetensors header from the hub (range requests), never a weight. The plan equals the
    plan of the same model as a local folder. (The hub is played by the tiny model's folder.)"""
    import shutil
    from pathlib import Path

    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError
    from huggingface_hub.utils._safetensors import SafetensorsFileMetadata, TensorInfo

    from pixart_lowvram.generate import Settings, plan_queue
    from pixart_lowvram.jobs import jobs_from_options
    from pixart_lowvram.models import SAFETENSORS_DTYPES, read_safetensors

    hub = Path(tiny_model)
    files = sorted(p.relative_to(hub).as_posix() for p in hub.rglob("*") if p.is_file())
    fetched = []

    def snapshot_download(repo_id, allow_patterns, local_files_only=False, **kwargs):
        import fnmatch

        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        snapshot = tmp_path / "hf-cache" / repo_id.replace("/", "--")
        for name in files:
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                fetched.append(name)
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(hub / name, snapshot / name)
        return str(snapshot)

    def parse_safetensors_file_metadata(self, repo_id, filename, **kwargs):
        names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
        return SafetensorsFileMetadata(metadata={}, tensors={
            key: TensorInfo(dtype=names[s.dtype], shape=list(s.shape), data_offsets=(0, s.nbytes))
            for key, s in read_safetensors(hub / filename).items()})

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **k: files)
    monkeypatch.setattr(huggingface_hub.HfApi, "parse_safetensors_file_metadata", parse_safetensors_file_metadata)
    jobs = jobs_from_options("a fox", width=256, height=256)
    settings = dict(device="cpu", vram_budget="1GiB")
    remote = plan_queue(jobs, Settings(model="someone/tiny-pixart", **settings))
    assert fetched and not [name for name in fetched if name.endswith(".safetensors")], "weights were downloaded"
    assert remote == plan_queue(jobs, Settings(model=tiny_model, **settings))


def test_every_wrong_option_is_reported_together_before_the_model_is_touched(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(resolve, "resolve_model", lambda *a, **k: pytest.fail("the model was touched"))
    code = main(["generate", "a fox", "--device", "tpu", "--encode-batch", "0", "--vram-budget", "lots",
                 "--upcast", "unet", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "4 problems, nothing was loaded" in err
    assert "--device 'tpu'" in err and "encode batch must be a positive integer" in err
    assert "--vram-budget 'lots'" in err and "--upcast unet" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_bad_queue_and_a_bad_option_are_reported_together(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(resolve, "resolve_model", lambda *a, **k: pytest.fail("the model was touched"))
    queue = tmp_path / "q.json"
    queue.write_text(json.dumps({"jobs": [{"prompt": "ok", "stepz": 3}]}))
    code = main(["run", str(queue), "--dtype", "float32", "--denoise-batch", "0", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "2 problems, nothing was loaded" in err
    assert "did you mean 'steps'" in err and "denoise batch must be a positive integer" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
