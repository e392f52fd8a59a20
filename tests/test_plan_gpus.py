"""`plan QUEUE --gpus ...`: how a run over several processes would divide the queue, told before it runs, loading
nothing and starting no process."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pixart_lowvram.cli import main


def division(out: str) -> dict[str, list[int]]:
    """The division line's per-rank counts: "12 (5 + 4 + 3) text(s) to encode" -> {"text(s) to encode": [5, 4, 3]}."""
    line = next(line for line in out.splitlines() if "to make over" in line)
    return {what: [int(n) for n in counts.split(" + ")]
            for counts, what in re.findall(r"\d+ \(([\d + ]+)\) ([a-z() ]+? to (?:encode|denoise|decode))", line)}


def loads(out: str) -> list[int]:
    """Each rank's transformer loads, from its "rank R (cpu): N transformer load(s)" line."""
    return [int(n) for n in re.findall(r"^rank \d+ \([^)]*\): (\d+) transformer load", out, re.M)]


@pytest.fixture
def mixed_queue(tiny_model, tmp_path) -> Path:
    """Mixed sizes and steps, one adapter at two scales beside no LoRA, and image-to-image jobs from two pictures."""
    from test_img2img import write_image  # noqa: PLC0415
    from test_lora import make_adapter  # noqa: PLC0415

    adapter = str(make_adapter(tiny_model, tmp_path / "adapter"))
    picture = write_image(tmp_path / "init.png", 300, 200, 1)
    other = write_image(tmp_path / "other.png", 180, 260, 2)
    queue = tmp_path / "q.json"
    queue.write_text(json.dumps({"defaults": {"steps": 2, "width": 64, "height": 64}, "jobs": [
        {"name": "small", "prompt": "a cat", "negative_prompt": "blurry", "seed": 1, "count": 4},
        {"name": "wide", "prompt": "a wide harbour", "seed": 2, "width": 128, "height": 64, "count": 2,
         "lora": [{"path": adapter, "scale": 0.7}]},
        {"name": "big", "prompt": "a tall tower", "seed": 3, "width": 128, "height": 128, "steps": 4,
         "lora": [{"path": adapter, "scale": 1.0}]},
        {"name": "from-picture", "prompt": "a dog", "seed": 4, "init_image": picture, "strength": 0.6, "count": 2},
        {"name": "other-picture", "prompt": "a cow", "seed": 5, "init_image": other, "strength": 0.9,
         "lora": [{"path": adapter, "scale": 0.7}]}]}))
    return queue


def test_plan_gpus_tells_each_rank_what_the_run_then_gives_it(tiny_model, mixed_queue, tmp_path, capsys):
    """`plan --gpus cpu:3` prints, per rank, the texts, init images, latents and images it would get and the LoRA
    sets it would load; a run of the same queue over three processes then gives each rank exactly those, and its
    own start says the same."""
    options = ["--model", tiny_model, "--gpus", "cpu:3", "--dtype", "float32", "--no-embed-cache"]
    assert main(["plan", str(mixed_queue), *options]) == 0
    planned = capsys.readouterr().out
    counts = division(planned)
    assert set(counts) == {"text(s) to encode", "init image(s) to encode", "latent(s) to denoise",
                           "image(s) to decode"}, planned
    assert "rank 0 (cpu): plan for" in planned and "10 image(s) in the queue, 10 to make over 3 processes" in planned
    assert len(loads(planned)) == 3, planned
    assert len(set(counts["text(s) to encode"])) == len(set(counts["image(s) to decode"])) == 2, planned  # uneven

    run = tmp_path / "run"
    assert not run.exists()  # plan wrote nothing
    assert main(["run", str(mixed_queue), *options, "--out", str(run)]) == 0
    said = capsys.readouterr()
    data = json.loads((run / "run.json").read_text())
    ranks = data["ranks"]
    assert counts["text(s) to encode"] == [r["texts"] for r in ranks]
    assert counts["init image(s) to encode"] == [r["inits"] for r in ranks]
    assert counts["image(s) to decode"] == counts["latent(s) to denoise"] == [r["images"] for r in ranks]
    denoise = [next(s for s in r["stages"] if s["name"] == "denoise") for r in ranks]
    assert loads(planned) == [s["loads"] for s in denoise]
    sets = [{json.dumps(it["lora"]) for it in data["items"] if it["rank"] == r} for r in range(3)]
    assert loads(planned) == [len(s) for s in sets]
    # the run's own start: the same division line and load lines (one function writes both)
    line = next(line for line in planned.splitlines() if "to make over" in line)
    assert line in said.err + said.out
    for load_line in [x for x in planned.splitlines() if "transformer load" in x]:
        assert load_line in said.err + said.out


def test_plan_gpus_with_a_bad_value_is_bad_input_before_anything_loads(tiny_model, tmp_path, capsys):
    queue = tmp_path / "q.json"
    queue.write_text(json.dumps({"jobs": [{"prompt": "a cat", "steps": 2}]}))
    for gpus, said in (("0,0", "a GPU named twice"), ("cpu:0", "cpu:N takes a number"), ("two", "not a list")):
        # a model folder that does not exist: the problem is told before the model is looked at
        assert main(["plan", str(queue), "--model", str(tmp_path / "absent"), "--gpus", gpus]) == 2
        captured = capsys.readouterr()
        assert said in captured.err and "--gpus" in captured.err and captured.out == "", captured
    assert main(["plan", str(queue), "--model", tiny_model, "--gpus", "cpu:2", "--device", "cpu"]) == 2
    assert "leave --device out" in capsys.readouterr().err


def test_plan_gpus_all_without_a_gpu_names_what_to_give_instead(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    queue = tmp_path / "q.json"
    queue.write_text(json.dumps({"jobs": [{"prompt": "a cat", "steps": 2}]}))
    assert main(["plan", str(queue), "--model", tiny_model, "--gpus", "all"]) == 2
    err = capsys.readouterr().err
    assert "sees no CUDA GPU" in err and "--gpus 0,1" in err and "cpu:N" in err, err
    # a list of GPUs is planned for all the same (for another machine's GPUs), saying on what
    assert main(["plan", str(queue), "--model", tiny_model, "--gpus", "0,1"]) == 0
    captured = capsys.readouterr()
    assert "this machine has no GPU" in captured.err and "over 2 processes" in captured.out
