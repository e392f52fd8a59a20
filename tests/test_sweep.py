"""bench/sweep.py's design covers what the budget promise is checked on: every queue length, batch, size, kind and
budget the issue names, each queue with exactly the texts its case says (the sweep itself runs on a GPU)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import sweep  # noqa: E402


def distinct_texts(lines: list[dict]) -> int:
    return len({t for line in lines for t in (line["prompt"], line.get("negative_prompt", ""))})


def test_each_encode_case_queues_exactly_its_texts():
    for case in sweep.cases():
        if case.until == "encode":
            assert distinct_texts(sweep.queue_lines(case)) == case.texts, case.name


def test_the_cases_cover_the_grid():
    cases = sweep.cases()
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    assert {c.texts for c in cases if c.until == "encode"} == {1, 4, 32, 33, 100, 500}
    assert {c.encode_batch for c in cases} == {1, 8, 32}
    assert {c.denoise_batch for c in cases if c.group == "denoise-batch" and c.budget is None} == {1, 2, 4, 8}
    assert {(c.width, c.height) for c in cases} >= {(512, 512), (1024, 1024), (2048, 512), (512, 2048),
                                                   (2048, 2048), (4096, 1024), (1024, 4096)}
    assert {c.preset for c in cases} == {"xl", "xl-512", "xl-sigma", "xl-sigma-2k", "xl-lcm", "xl-dmd"}
    assert {c.budget for c in cases} >= {"1.5GiB", "2GiB", "3GiB", "4GiB", "6GiB", "8GiB"}
    assert {c.host_budget for c in cases if c.group == "host"} == {"8GiB", "16GiB", "32GiB"}


def test_a_stage_over_its_budget_is_a_broken_promise_in_the_summary():
    case = sweep.Case("encode-33-texts", "encode-texts", "xl", texts=33, until="encode")
    row = {"case": sweep.dataclasses.asdict(case), "returncode": 0, "vram_budget": int(1.5 * 2**30),
           "host_budget": None, "process_rss": 0,
           "plan": {"encode": {"placement": "streamed", "estimate": int(1.6 * 2**30), "ahead": 0, "batch": 1,
                               "group": 32}},
           "stages": [{"name": "encode", "seconds": 2.0, "nvml_peak": int(1.56 * 2**30), "torch_peak": 1,
                       "over_budget": ["GPU 1.56 GiB (NVML) over the 1.50 GiB budget"]}]}
    assert sweep.summary([row]) == ["encode-33-texts encode: GPU 1.56 GiB (NVML) over the 1.50 GiB budget "
                                    "(NVML 1.56, estimate 1.60, budget 1.50 GiB)"]
    assert "**NO**" in sweep.tables([row])
    row["stages"][0].update(nvml_peak=int(1.4 * 2**30), over_budget=[])
    assert sweep.summary([row]) == [] and "| yes |" in sweep.tables([row])
