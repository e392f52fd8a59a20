"""bench/multigpu.py's queue and tables (the bench itself runs on GPUs; `--device cpu` checks its plumbing)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import multigpu  # noqa: E402

GiB = 1024**3


def test_the_queue_has_a_prompt_per_image_and_one_negative():
    lines = multigpu.queue_lines(64, 1024, 20)
    assert len({line["prompt"] for line in lines}) == 64 and len({line["seed"] for line in lines}) == 64
    assert {line["negative_prompt"] for line in lines} == {"blurry, low quality"}
    assert {(line["width"], line["height"], line["steps"]) for line in lines} == {(1024, 1024, 20)}


def test_with_loras_the_jobs_take_the_sets_in_turn():
    lines = multigpu.queue_lines(8, 1024, 20, Path("/tmp/adapter"), 3)
    assert [line["lora"] for line in lines[:4]] == [[{"path": "/tmp/adapter", "scale": scale}] for scale in
                                                     (0.5, 0.6, 0.7, 0.5)]
    assert "lora" not in multigpu.queue_lines(8, 1024, 20)[0]


def test_each_rank_waits_for_the_slowest_and_the_table_shows_every_gpu():
    manifest = {"settings": {"device": "cuda:0"}, "stages": [], "items": [], "ranks": [
        {"rank": 0, "device": "cuda:0", "images": 32, "seconds": 30.0, "waited": 0.5, "missing": None,
         "stages": [{"name": "denoise", "seconds": 20.0, "nvml_peak": int(1.38 * GiB), "torch_peak": GiB, "loads": 2}]},
        {"rank": 1, "device": "cuda:1", "images": 32, "seconds": 31.0, "waited": 0.2, "missing": None,
         "stages": [{"name": "denoise", "seconds": 21.0, "nvml_peak": int(1.40 * GiB), "torch_peak": GiB, "loads": 3}]}]}
    ranks = multigpu.rank_rows(manifest)
    assert [round(r["waited"], 1) for r in ranks] == [1.5, 0.2]
    result = {"command": "python bench/multigpu.py --out OUT", "gpus": 2, "gpu": "H200", "jobs": 64, "size": 1024,
              "steps": 20, "rows": [
                  {"budget": "1.5GiB", "gpus": 1, "wall_s": 100.0, "images_per_s": 0.64, "ranks": ranks[:1], "work_s": 88.0,
                   "sampled": [{"processes": 1, "together": int(1.4 * GiB), "one_process": 0}]},
                  {"budget": "1.5GiB", "gpus": 2, "wall_s": 55.0, "images_per_s": 1.16, "ratio": 1.81, "work_s": 45.0,
                   "work_ratio": 1.96,
                   "of_ideal": 0.91, "max_diff_vs_one": 0, "ranks": ranks,
                   "sampled": [{"processes": 1, "together": int(1.4 * GiB), "one_process": 0}] * 2}]}
    table = multigpu.markdown(result)
    assert ("| 1.5GiB | 2 | share.py | 55.0 | 1.160 | 1.81 | 0.91 | 45.0 (1.96) | - | 1.38, 1.40 | 1.5, 0.2 | 5 (2, 3) "
            "| 0 |") in table
    assert "| 1.5GiB | 2 | share.py | 1 | cuda:1 | 32 | - | 21.0 | 3 | - | 31.0 | 1, 1.40 |" in table
    assert table.endswith("Processes on a GPU that was not theirs: none seen.\n")
    result["rows"][0]["stray"] = [1]
    assert "1.5GiB on 1 GPU(s): GPU 1" in multigpu.markdown(result)


def test_the_timeline_puts_every_process_on_rank_0s_clock_with_what_the_bench_saw():
    t0 = 1_700_000_000.0
    manifest = {"ranks": [
        {"rank": 0, "timeline": {"process start": t0, "launch": t0 + 1, "encode start": t0 + 6, "encode end": t0 + 9,
                                 "decode end": t0 + 40, "records collected": t0 + 42.5}},
        {"rank": 1, "timeline": {"process start": t0 + 1.2, "launch": t0 + 3, "encode start": t0 + 6.5,
                                 "encode end": t0 + 9.5, "decode end": t0 + 41, "record posted": t0 + 41.1}}]}
    outside = {"launched": t0 - 0.01, "ended": t0 + 44}
    sampled = [{"last_seen": t0 + 43.9}, {"last_seen": t0 + 41.3}]
    timeline = multigpu.timelines(manifest, outside, sampled)
    assert timeline[1] == {"process start": 1.2, "launch": 3.0, "encode start": 6.5, "encode end": 9.5,
                           "decode end": 41.0, "record posted": 41.1, "GPU given back": 41.3}
    assert timeline[0]["launched"] == -0.01 and timeline[0]["ended"] == 44.0
    # before the first stage anywhere, the stages (first start to last end), after them to the command's end
    assert multigpu.phases(timeline) == {"before": 6.01, "stages": 35.0, "after": 3.0}
    one = {"budget": "none", "gpus": 1, "timeline": [{"process start": 0.0, "encode start": 4.0, "ended": 60.0}]}
    two = {"budget": "none", "gpus": 2, "timeline": timeline}
    table = "\n".join(multigpu.timeline_tables([one, two]))
    assert "| step | 1 GPU | 2 GPUs, rank 0 | 2 GPUs, rank 1 |" in table
    assert "| encode start | 4.00 | 6.00 | 6.50 |" in table
    assert "| record posted |  |  | 41.10 |" in table
    lines = table.splitlines()
    steps = [line.split(" | ")[0].removeprefix("| ") for line in lines if line.startswith("| ") and "---" not in line]
    assert steps == ["step", "launched", "process start", "launch", "encode start", "encode end", "decode end",
                     "record posted", "records collected", "GPU given back", "ended"]
