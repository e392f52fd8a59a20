"""One queue over several processes (`--gpus cpu:N` and torchrun: gloo ranks on the CPU, as CI can run them): the
work divided by cost, the same way again for what a rerun has left; every image equal to the one-process run's;
one run folder with one manifest; a rank killed mid-run stops the others cleanly and the same command finishes
the queue; one run per folder however many processes it has; bad --gpus values refused before anything loads."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import max_diff, pixels
from pixart_lowvram import launch, resolve
from pixart_lowvram.cli import main
from pixart_lowvram.errors import Interrupted, OutOfMemory, RankFailed
from pixart_lowvram.generate import Settings, image_work, run_queue
from pixart_lowvram.items import binned_sizes
from pixart_lowvram.jobs import parse_queue
from pixart_lowvram.models import resolve_model
from pixart_lowvram.reporting import Bar, Reporter
from pixart_lowvram.share import DECODE_STEPS, Work, divide_images, divide_inits, divide_texts, total_cost
from pixart_lowvram.team import Member, Team

CHILD = Path(__file__).with_name("crash_child.py")
CPU32 = dict(device="cpu", dtype="float32")

# Sizes, steps and texts of several kinds: two images share a prompt (encoded once), one a negative prompt.
QUEUE = """\
[defaults]
steps = 2
width = 128
height = 128

[[jobs]]
name = "kite"
prompt = "a red kite over the sea"
seed = 11
count = 3

[[jobs]]
name = "boat"
prompt = "a blue boat"
negative_prompt = "fog"
seed = 12
width = 192
steps = 3

[[jobs]]
name = "kite-again"
prompt = "a red kite over the sea"
seed = 13
cfg = 1

[[jobs]]
name = "map"
prompt = "an old map of the harbour"
seed = 14
height = 96
"""
NAMES = ["kite-1", "kite-2", "kite-3", "boat", "kite-again", "map"]
TEXTS = 5  # the three prompts, "" and "fog"


# -- dividing the work: pure ------------------------------------------------------------------------------------
def works(n: int, seed: int = 0, sets: int = 1) -> list[Work]:
    """`n` images of three sizes and four step counts (0: decode only), in `sets` LoRA sets; images of one size and
    step count share a batch group, as denoise.group_key makes them."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        side, steps = rng.choice([64, 128, 256]), rng.choice([0, 2, 20, 30])
        out.append(Work(f"key-{rng.random():.12f}", side * side, steps, lora=f"set-{rng.randrange(sets)}" if steps else "",
                        group=f"{side}-{steps}" if steps else ""))
    return out


def key(i: int) -> str:
    """An image key as the run makes them: a hash, in no order related to the queue's."""
    return hashlib.sha256(str(i).encode()).hexdigest()[:24]


def loads(work: list[Work], shares: list[list[int]]) -> int:
    """Transformer loads in all: each rank loads it once per LoRA set among the images it denoises."""
    return len({(rank, work[i].lora) for rank, share in enumerate(shares) for i in share if work[i].steps})


def group_parts(work: list[Work], shares: list[list[int]]) -> int:
    """Batch groups as the ranks run them: a group on two ranks counts twice (each may end in a partial batch)."""
    return len({(rank, work[i].lora, work[i].group) for rank, share in enumerate(shares) for i in share
                if work[i].steps})


def assert_within_one_image_of_even(work: list[Work], shares: list[list[int]]) -> None:
    costs = [total_cost(work, share) for share in shares]
    largest = max((w.cost for w in work), default=0)
    assert all(abs(cost * len(shares) - sum(costs)) <= largest * len(shares) for cost in costs), costs


def longest_first(work: list[Work], ranks: int) -> list[list[int]]:
    """The division by cost alone (what share.py did before LoRA sets counted): the costliest image to the rank with
    the least so far. Here to compare with."""
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(work)), key=lambda i: (-work[i].cost, work[i].key)):
        min(shares, key=lambda share: (total_cost(work, share), shares.index(share))).append(i)
    return shares


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("sets", [1, 5])
def test_images_are_divided_by_cost_so_the_ranks_finish_together(ranks, sets):
    work = works(50, sets=sets)
    shares = divide_images(work, ranks)
    assert sorted(i for share in shares for i in share) == list(range(50)), "every image once"
    assert_within_one_image_of_even(work, shares)
    assert loads(work, shares) <= sets + ranks - 1


def test_the_division_depends_on_the_images_alone_not_on_their_order():
    """A rerun may list what is left in another order (an edited queue): each image goes to the same rank."""
    work = works(40, seed=1, sets=3)
    shuffled = work[:]
    random.Random(2).shuffle(shuffled)

    def rank_of_key(w: list[Work]) -> dict[str, int]:
        return {w[i].key: rank for rank, share in enumerate(divide_images(w, 4)) for i in share}

    assert rank_of_key(work) == rank_of_key(shuffled)
    assert divide_images(work, 4) == divide_images(work, 4)


def test_equal_images_are_dealt_evenly_and_a_decode_costs_less_than_a_whole_image():
    same = [Work(f"k{i:02d}", 1024 * 1024, 20) for i in range(64)]
    assert [len(s) for s in divide_images(same, 8)] == [8] * 8
    assert [len(s) for s in divide_images(same[:6], 8)] == [1] * 6 + [0] * 2, "more ranks than images"
    assert Work("a", 100, 0).cost == 100 * DECODE_STEPS < Work("a", 100, 2).cost


def test_each_lora_set_stays_on_as_few_ranks_as_balance_allows():
    """Four LoRA sets of 16 equal images over four ranks: each rank gets one set whole, so the transformer is loaded
    four times in all; longest-first dealt each set's images over every rank (16 loads)."""
    work = [Work(key(i), 1024 * 1024, 20, lora=f"set-{i % 4}", group="1024-20") for i in range(64)]
    shares = divide_images(work, 4)
    assert [sorted({work[i].lora for i in share}) for share in shares] == [[f"set-{k}"] for k in range(4)]
    assert loads(work, longest_first(work, 4)) == 16
    # three sets of 10 over four ranks: each stretch of 7.5 images meets two sets at most, 6 = 3 + 4 - 1 loads
    work = [Work(key(i), 1024 * 1024, 20, lora=f"set-{i % 3}", group="1024-20") for i in range(30)]
    shares = divide_images(work, 4)
    assert sorted(len(s) for s in shares) == [7, 7, 8, 8]
    assert loads(work, shares) == 6 < loads(work, longest_first(work, 4))


def test_a_batch_group_is_split_only_where_balance_needs_it():
    """Eight 1024² and eight 512² images over two ranks: one rank takes five large ones, the other three and every
    small one, so only the large group is split; longest-first split both."""
    work = ([Work(f"a{i}", 1024 * 1024, 20, group="1024") for i in range(8)] +
            [Work(f"b{i}", 512 * 512, 20, group="512") for i in range(8)])
    shares = divide_images(work, 2)
    assert sorted(sorted(work[i].group for i in share) for share in shares) == sorted([
        ["1024"] * 3 + ["512"] * 8, ["1024"] * 5])
    assert [total_cost(work, s) for s in shares] == [total_cost(work, s) for s in longest_first(work, 2)]
    assert group_parts(work, shares) == 3 < group_parts(work, longest_first(work, 2)) == 4


def test_images_to_decode_only_load_no_transformer_and_fill_in():
    """Images whose latents are made need no transformer: they go where they even out the ranks, whatever their set.
    Three images to denoise (23 steps' cost each, decode included) and six to decode (3 each) over two ranks: one
    rank denoises two, the other one and decodes the six (46 against 41)."""
    work = [Work(f"k{i}", 1024 * 1024, 20, lora="set-a") for i in range(3)]
    work += [Work(f"d{i}", 1024 * 1024, 0, lora="set-b") for i in range(6)]
    shares = divide_images(work, 2)
    assert loads(work, shares) == 2
    assert sorted(sorted(work[i].key[0] for i in share) for share in shares) == [["d"] * 6 + ["k"], ["k", "k"]]
    assert sorted(total_cost(work, s) // (1024 * 1024) for s in shares) == [41, 46]


def test_the_division_compares_with_longest_first_on_mixed_queues():
    """On 300 queues of mixed sizes, steps and sets (fixed seeds): never more transformer loads than S + N - 1 and
    never more than longest-first's; with one set, never a busier rank than longest-first's; with at least 20
    images a rank, the busiest rank within 2% of longest-first's, and fewer group parts in all."""
    rng = random.Random(5)
    ratios, parts, parts_before = [], 0, 0
    for seed in range(300):
        sets, ranks, n = rng.choice([1, 1, 2, 3, 5, 8]), rng.choice([2, 3, 4, 8]), rng.choice([10, 30, 64, 200])
        work = works(n, seed=seed, sets=sets)
        shares, before = divide_images(work, ranks), longest_first(work, ranks)
        assert_within_one_image_of_even(work, shares)
        assert loads(work, shares) <= min(sets + ranks - 1, loads(work, before))
        busiest = max(total_cost(work, s) for s in shares) / max(total_cost(work, s) for s in before)
        if sets == 1 and all(w.steps for w in work):
            assert busiest <= 1
        if n >= 20 * ranks:
            ratios.append(busiest)
            parts, parts_before = parts + group_parts(work, shares), parts_before + group_parts(work, before)
    assert max(ratios) <= 1.02 and parts < parts_before


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4096), st.integers(0, 50), st.integers(0, 3), st.integers(0, 2)),
                max_size=40), st.integers(1, 8), st.randoms(use_true_random=False))
def test_any_queue_is_divided_whole_near_even_and_keeps_sets_together(images, ranks, rng):
    """Any work list: each image once; each rank within one image's cost of an even share; at most S + N - 1 (set,
    rank) pairs and a batch group only on the ranks of its set; the same division for the same images in any
    order; one set and nothing to decode only: a busiest rank no busier than longest-first's."""
    work = [Work(f"k{i}", pixels, steps, lora=f"s{s}", group=f"g{g}")
            for i, (pixels, steps, s, g) in enumerate(images)]
    shares = divide_images(work, ranks)
    assert sorted(i for share in shares for i in share) == list(range(len(work)))
    assert_within_one_image_of_even(work, shares)
    denoised = [w for w in work if w.steps]
    sets = {w.lora for w in denoised}
    assert loads(work, shares) <= len(sets) + ranks - 1
    most_groups = max((len({w.group for w in denoised if w.lora == s}) for s in sets), default=0)
    assert group_parts(work, shares) <= len({(w.lora, w.group) for w in denoised}) + most_groups * (ranks - 1)
    shuffled = work[:]
    rng.shuffle(shuffled)
    again = divide_images(shuffled, ranks)
    assert ({w.key: r for r, share in enumerate(shares) for w in (work[i] for i in share)} ==
            {w.key: r for r, share in enumerate(again) for w in (shuffled[i] for i in share)})
    if len(sets) <= 1 and len(denoised) == len(work) and work:
        before = longest_first(work, ranks)
        assert max(total_cost(work, s) for s in shares) <= max(total_cost(work, s) for s in before)


def test_each_text_goes_to_one_rank():
    keys = [f"t{i}" for i in range(11)] + ["t3"]
    shares = divide_texts(keys, 4)
    assert sorted(k for share in shares for k in share) == sorted(set(keys))
    assert [len(s) for s in shares] == [3, 3, 3, 2]
    assert divide_texts(list(reversed(keys)), 4) == shares


def test_each_init_image_goes_to_one_rank_by_its_pixels_first_to_ranks_with_fewer_texts():
    inits = [(f"i{i}", 1024 * 1024) for i in range(5)] + [("big", 2048 * 2048), ("small", 256 * 256)]
    # texts dealt 3, 3, 2, 2: the largest picture to the first rank with fewer texts (2), the next (equal ones in
    # key order) to the other rank with fewer (3), then to the ranks with the fewest pixels so far
    shares = divide_inits(inits, [3, 3, 2, 2])
    keys = [[inits[i][0] for i in share] for share in shares]
    assert keys == [["i1", "i4"], ["i2", "small"], ["big"], ["i0", "i3"]]
    pixels = [sum(inits[i][1] for i in share) for share in shares]
    assert max(pixels) - min(pixels) <= max(p for _, p in inits)
    reordered = list(reversed(inits))
    assert [sorted(reordered[i][0] for i in share) for share in divide_inits(reordered, [3, 3, 2, 2])] == [
        sorted(k) for k in keys], "a rerun that lists them in another order divides them alike"
    assert divide_inits([], [1, 0]) == [[], []]


# -- the ranks' store protocol, two ranks as threads of one process ------------------------------------------------
@pytest.fixture
def pair():
    """Ranks 0 and 1 of a team over one TCPStore (no process group: the store alone carries what the stages say)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    members = [Member(0, "cpu", "here"), Member(1, "cpu", "here")]
    return [Team(rank, 2, dist.PrefixStore("t/", store), members) for rank in (0, 1)]


def in_thread(fn):
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, out


def test_ranks_that_arrive_apart_exchange_what_they_bring(pair):
    zero, one = pair
    thread, out = in_thread(lambda: zero.exchange("encoded", ["a"], threading.Event()))
    time.sleep(0.5)  # rank 0 waits for rank 1
    assert thread.is_alive()
    assert one.exchange("encoded", [], threading.Event()) == [["a"], []]
    thread.join(10)
    assert out["value"] == [["a"], []]


def test_a_rank_that_stops_the_team_frees_those_waiting_and_names_itself(pair):
    zero, one = pair
    thread, out = in_thread(lambda: zero.exchange("encoded", [], threading.Event()))
    one.stop_all(OutOfMemory("the GPU ran out of memory in stage encode"))
    thread.join(10)
    assert isinstance(out["error"], RankFailed) and "stopped because rank 1 (cpu) did" in str(out["error"])
    cause = zero.cause()
    assert cause.exit_code == 3 and str(cause) == "rank 1 (cpu): the GPU ran out of memory in stage encode"
    zero.stop_all(Interrupted("later"))  # the first to stop the team stays the one named
    assert zero.stopper() == 1


def test_rank_0_gathers_every_record_and_leaves_out_a_rank_that_died(pair, monkeypatch):
    zero, one = pair
    one.post({"images": 3})
    assert zero.collect({"images": 2}, threading.Event()) == {0: {"images": 2}, 1: {"images": 3}}
    zero.store.delete_key("record/1")
    zero.dead[1] = -9  # what the launcher's watch of its workers sets
    zero.store.compare_set("stop", "", "1")
    assert zero.collect({"images": 2}, threading.Event()) == {0: {"images": 2}}
    assert "rank 1 (cpu) ended unexpectedly (killed by signal 9)" in str(zero.cause())


def test_a_wait_on_a_rank_that_makes_no_progress_ends(pair, monkeypatch):
    import pixart_lowvram.team as team_module

    zero, _ = pair
    monkeypatch.setattr(team_module, "STALL_SECONDS", 0.5)
    with pytest.raises(RankFailed, match="rank 1 \\(cpu\\): no progress for"):
        zero.exchange("encoded", [], threading.Event())
    zero.store.add("progress/denoise", 1)  # progress anywhere keeps a wait going
    stall = team_module._Stall(zero)
    time.sleep(0.3)
    zero.store.add("progress/denoise", 1)
    stall.check(lambda: [1])
    time.sleep(0.3)
    stall.check(lambda: [1])


# -- rank 0's run.json: the others' images as they tell them -------------------------------------------------------
def test_rank_0_takes_the_images_another_process_made_from_its_word_and_reads_one_changed_since(tmp_path,
                                                                                                monkeypatch):
    """Two RunFolder objects on one folder, as two ranks have them: one writes images, the other learns them from
    its record (`known_pngs`) and counts them done without decoding a file, until a file changes."""
    import json as json_module

    from PIL import Image

    import pixart_lowvram.run as run_module
    from pixart_lowvram.run import RunFolder

    writer, reader = RunFolder(tmp_path), RunFolder(tmp_path)
    writer.images.mkdir(parents=True)
    picture = Image.new("RGB", (8, 8), (200, 10, 10))
    for name in ("a", "b"):
        writer.write_png(writer.images / f"{name}.png", picture, {"pixart_lowvram": json_module.dumps({"key": name})})
    told = writer.known_pngs()
    assert set(told) == {"a.png", "b.png"}

    reads: list[str] = []
    real = run_module._read_png_meta
    monkeypatch.setattr(run_module, "_read_png_meta", lambda path: reads.append(path.name) or real(path))
    assert reader.png_key(reader.images / "a.png", read=False) is None, "not known yet: not read either"
    reader.learn_pngs(pickle.loads(pickle.dumps(told)))  # as it travels in a record
    assert reader.png_key(reader.images / "a.png", read=False) == "a"
    assert reads == []
    # b.png replaced (another key) after the writer told of it: the word no longer fits the file, which is read.
    time.sleep(0.01)
    writer.write_png(writer.images / "b.png", picture, {"pixart_lowvram": json_module.dumps({"key": "b2"})})
    assert reader.png_key(reader.images / "b.png", read=False) is None
    assert reader.png_key(reader.images / "b.png") == "b2" and reads == ["b.png"]


# -- bad input: before anything starts ---------------------------------------------------------------------------
@pytest.mark.parametrize("gpus, says", [
    ("cpu:0", "cpu:N takes a number of processes from 1"),
    ("cpu:two", "cpu:N takes a number"),
    ("0,1", "this torch sees no CUDA GPU"),  # the CI machine has none
    ("all", "this torch sees no CUDA GPU"),
])
def test_bad_gpus_values_are_refused_before_any_model_loads(gpus, says, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(resolve, "resolve_model", lambda *a, **k: pytest.fail("the model was touched"))
    queue = tmp_path / "q.toml"
    queue.write_text(QUEUE)
    code = main(["run", str(queue), "--out", str(tmp_path / "run"), "--gpus", gpus])
    err = capsys.readouterr().err
    assert code == 2
    assert "--gpus" in err and says in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_gpus_problems_are_told_with_the_queue_and_the_options(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(resolve, "resolve_model", lambda *a, **k: pytest.fail("the model was touched"))
    queue = tmp_path / "q.json"
    queue.write_text(json.dumps([{"prompt": ""}]))
    code = main(["run", str(queue), "--out", str(tmp_path / "run"), "--gpus", "cpu:2", "--device", "cpu",
                 "--vram-budget", "lots"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'prompt'" in err and "leave --device out" in err and "--vram-budget 'lots'" in err


def test_under_torchrun_gpus_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(resolve, "resolve_model", lambda *a, **k: pytest.fail("the model was touched"))
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    queue = tmp_path / "q.toml"
    queue.write_text(QUEUE)
    code = main(["run", str(queue), "--out", str(tmp_path / "run"), "--gpus", "cpu:2"])
    assert code == 2
    assert "torchrun already started this process as rank 1 of 2" in capsys.readouterr().err


# -- whole runs: several processes on the CPU --------------------------------------------------------------------
@pytest.fixture(scope="module")
def queue(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("queue") / "queue.toml"
    path.write_text(QUEUE)
    return path


@pytest.fixture(scope="module")
def one_process(queue, tiny_model, tmp_path_factory) -> dict[str, object]:
    """The queue made by one process: the images every run over several must equal."""
    run = tmp_path_factory.mktemp("one") / "run"
    result = run_queue(parse_queue(queue.read_text(), "toml"), run, Settings(model=tiny_model, **CPU32))
    return {item.id: pixels(result.images[item.id]) for item in result.items}


def manifest(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def assert_same_images(run: Path, one_process: dict) -> None:
    """Within 1/255: ranks on the CPU run torch on fewer threads each, which may round a sum differently."""
    assert sorted(p.name for p in (run / "images").glob("*.png")) == sorted(f"{n}.png" for n in NAMES)
    for name in NAMES:
        assert max_diff(pixels(run / "images" / f"{name}.png"), one_process[name]) <= 1, name


def made(run: Path) -> dict[str, int]:
    return {s["name"]: s["items"] for s in manifest(run)["stages"] if not s["skipped"]}


def test_two_processes_make_the_one_process_images_into_one_run_folder(queue, tiny_model, one_process, tmp_path,
                                                                       capsys):
    run = tmp_path / "run"
    code = main(["run", str(queue), "--model", tiny_model, "--out", str(run), "--gpus", "cpu:2", "-q"])
    out = capsys.readouterr().out
    assert code == 0
    assert_same_images(run, one_process)
    data = manifest(run)
    # One manifest, rank 0's, with each rank's part; every text encoded once, every image made once.
    assert [r["rank"] for r in data["ranks"]] == [0, 1] and all(r["missing"] is None for r in data["ranks"])
    assert made(run) == {"encode": TEXTS, "denoise": len(NAMES), "decode": len(NAMES)}
    assert sum(r["made"].get("encode", 0) for r in data["ranks"]) == TEXTS
    assert sorted(r["images"] for r in data["ranks"]) == [3, 3]
    assert {item["rank"] for item in data["items"]} == {0, 1} and all(item["done"] for item in data["items"])
    assert list(run.rglob("*.tmp")) == []
    # The summary: a row per process and stage, the stage over all of them, how long each waited.
    for row in ("encode   0 (cpu)", "encode   1 (cpu)", "decode       all", "waiting for the others"):
        assert row in out, out
    assert f"{len(NAMES)}/{len(NAMES)} images in" in out
    assert_timelines(data, standby=True)

    # A run folder like any other: one process resumes it with nothing left to do.
    again = run_queue(parse_queue(queue.read_text(), "toml"), run, Settings(model=tiny_model, **CPU32))
    assert all(s.skipped for s in again.stages)


# What each process's timeline holds, in the order the steps happen (a worker has no "workers started",
# "records collected" or "run.json written"; rank 0 no "record posted"). Every process has imported the libraries
# before the processes meet: a worker that imported them after would hold every rank at the first collective.
RANK_STEPS = ["process start", "launch", "imported", "store reached", "team joined", "run entered", "resolved", "share received",
              "plans gathered", "encode start", "encode loaded", "encode end", "encoded", "denoise start",
              "denoise loaded", "denoise end", "decode start", "decode loaded", "decode end", "work end"]


def assert_timelines(data: dict, standby: bool = False) -> None:
    """Each rank's steps in order, and what ties the processes together: a worker starts after rank 0 launches it,
    nobody passes the barrier after encode before every rank has encoded, rank 0 collects every record after it is
    posted, and writes run.json last."""
    zero, one = (r["timeline"] for r in data["ranks"])
    assert data["timeline"] == zero
    for timeline, last in ((zero, ["records collected", "run.json written"]), (one, ["record posted"])):
        steps = [step for step in RANK_STEPS + last if step in timeline]
        assert steps == RANK_STEPS + last, set(RANK_STEPS + last) - set(timeline)
        times = [timeline[step] for step in steps]
        assert times == sorted(times), list(zip(steps, times))
    assert zero["launch"] <= zero["workers started"] <= zero["store reached"]
    assert one["process start"] <= zero["store reached"]
    if standby:  # the command starts the others before it imports torch and checks the queue (standby.py)
        assert one["process start"] < zero["launch"]
    else:
        assert zero["launch"] <= one["process start"]
    assert min(zero["encoded"], one["encoded"]) >= max(zero["encode end"], one["encode end"])
    assert one["record posted"] <= zero["records collected"]


def test_one_process_keeps_its_timeline_in_run_json(queue, tiny_model, tmp_path):
    run = tmp_path / "run"
    result = run_queue(parse_queue(queue.read_text(), "toml"), run, Settings(model=tiny_model, **CPU32))
    ended = time.time()
    steps = ["process start", "run entered", "resolved", "planned"] + [
        f"{stage} {moment}" for stage in ("encode", "denoise", "decode") for moment in ("start", "loaded", "end")]
    assert list(result.timeline) == steps
    times = list(result.timeline.values())
    assert times == sorted(times) and times[-1] <= ended
    assert manifest(run)["timeline"] == result.timeline
    # The next run of the folder has its own: nothing to make, no stage started.
    again = run_queue(parse_queue(queue.read_text(), "toml"), run, Settings(model=tiny_model, **CPU32))
    assert list(again.timeline) == ["process start", "run entered", "resolved", "planned"]
    assert again.timeline["run entered"] > ended


def test_a_process_knows_when_it_started():
    before = time.time()
    child = subprocess.run([sys.executable, "-c", "import time; t = time.time(); from pixart_lowvram.memory import "
                            "process_start; print(process_start(), t)"], capture_output=True, text=True, check=True)
    started, first_line = map(float, child.stdout.split())
    # the kernel's clock ticks are 10 ms: the start is known to that, and the interpreter takes longer to start
    assert before - 0.02 <= started <= first_line


@pytest.mark.parametrize("ranks", [4, 8])
def test_many_processes_share_the_queue_as_the_division_says_into_one_manifest(ranks, queue, tiny_model, one_process,
                                                                              tmp_path):
    run = tmp_path / "run"
    jobs = parse_queue(queue.read_text(), "toml")
    result = launch.run(jobs, run, Settings(model=tiny_model, dtype="float32"), Reporter(), threading.Event(),
                        gpus=f"cpu:{ranks}")
    assert_same_images(run, one_process)
    data = manifest(run)
    assert len(data["ranks"]) == ranks == len(result.ranks)
    # Each image went where the division of what was left says (all of it: a fresh folder), each text to one rank.
    info = resolve_model(tiny_model, hash_weights=False)
    entries = data["items"]
    assert [e["id"] for e in entries] == [it.id for it in result.items]
    work = [image_work(it, size, {}, True) for it, size in zip(result.items, binned_sizes(info, result.items))]
    expected = {entries[i]["id"]: rank for rank, share in enumerate(divide_images(work, ranks)) for i in share}
    assert {e["id"]: e["rank"] for e in entries} == expected
    texts = [len(share) for share in divide_texts([e["prompt_key"] for e in entries] +
                                                  [e["negative_key"] for e in entries], ranks)]
    assert [r["texts"] for r in data["ranks"]] == texts
    assert [r["made"].get("encode", 0) for r in data["ranks"]] == texts
    assert made(run) == {"encode": TEXTS, "denoise": len(NAMES), "decode": len(NAMES)}
    idle = [r for r in data["ranks"] if r["images"] == 0]
    assert len(idle) == max(0, ranks - len(NAMES))
    assert all(not r["made"].get("denoise") for r in idle)


def child(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(CHILD), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_a_rank_killed_mid_run_stops_the_run_and_the_same_command_finishes_it(queue, tiny_model, one_process,
                                                                              tmp_path):
    run = tmp_path / "run"
    command = ["--", "run", str(queue), "--model", tiny_model, "--out", str(run), "--gpus", "cpu:2", "-q"]
    env = ["--env", f"XDG_CACHE_HOME={tmp_path / 'cache'}"]
    killed = child([*env, "--kill", "denoise:compute:3", "--rank", "1", *command], tmp_path)

    # Rank 1 died inside its second image's denoising: rank 0 noticed, stopped at its next safe point, wrote
    # run.json, named the rank that died and how, and ended with code 5.
    assert killed.returncode == 5, killed.stderr
    assert "rank 1 (cpu) ended unexpectedly (killed by signal 9) during denoise" in killed.stderr
    assert "run the same command again" in killed.stderr and "Traceback" not in killed.stderr
    data = manifest(run)
    assert [r["missing"] for r in data["ranks"]] == [None, "it ended unexpectedly"]
    latents_before = len(list((run / "latents").glob("*.safetensors")))
    assert 1 <= latents_before < len(NAMES)
    # Rank 0 stopped part way through denoise: its record counts the latents it wrote, not 0.
    mine = {e["latents"] for e in data["items"] if e.get("rank") == 0 and (run / e["latents"]).is_file()}
    denoised = {s["name"]: s for s in data["ranks"][0]["stages"]}["denoise"]
    assert data["ranks"][0]["made"]["denoise"] == denoised["items"] == len(mine) >= 1
    assert list((run / "embeds").glob("*.safetensors")), "encode had finished: kept"

    again = child([*env, *command], tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_images(run, one_process)
    # Only what was missing was made, divided afresh between the two ranks.
    assert made(run)["denoise"] == len(NAMES) - latents_before
    assert "encode" not in made(run)


def test_a_rank_that_fails_stops_the_run_with_its_own_error(queue, tiny_model, tmp_path):
    run = tmp_path / "run"
    done = child(["--env", f"XDG_CACHE_HOME={tmp_path / 'cache'}", "--kill", "decode:full:1", "--rank", "1", "--",
                  "run", str(queue), "--model", tiny_model, "--out", str(run), "--gpus", "cpu:2", "-q"], tmp_path)
    # Rank 1 found the disk full at its first image: the run ends with that error's exit code and message, naming
    # the rank; rank 0 stopped too, and wrote run.json with both ranks' figures.
    assert done.returncode == 1, done.stderr
    assert "error: rank 1 (cpu): " in done.stderr and "the disk is full" in done.stderr
    assert "Traceback" not in done.stderr
    data = manifest(run)
    assert [r["missing"] for r in data["ranks"]] == [None, None]
    assert data["ranks"][1]["made"].get("decode", 0) == 0
    assert len(list((run / "latents").glob("*.safetensors"))) == len(NAMES), "what was finished is kept"


def test_a_run_of_several_processes_holds_the_folder_against_another_run(queue, tiny_model, one_process, tmp_path,
                                                                         capsys):
    """Under torchrun (the second launch form) on the CPU: the run is held inside rank 1's first denoising step
    while another run tries the folder; then it finishes."""
    run, gate = tmp_path / "run", tmp_path / "gate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(CHILD),
         "--kill", "denoise:wait:1", "--rank", "1", "--wait-for", str(gate), "--",
         "run", str(queue), "--model", tiny_model, "--out", str(run), "--device", "cpu", "-q"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not Path(f"{gate}.reached").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never reached its denoising"
            time.sleep(0.2)
        code = main(["run", str(queue), "--model", tiny_model, "--out", str(run), "--device", "cpu", "-q"])
        assert code == 1
        assert "another pixart-lowvram run is using this folder" in capsys.readouterr().err
        gate.touch()
        out, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGTERM)
            first.communicate()
    assert first.returncode == 0, err
    assert f"{len(NAMES)}/{len(NAMES)} images in" in out
    assert_same_images(run, one_process)
    assert [r["rank"] for r in manifest(run)["ranks"]] == [0, 1]


# -- a folder diffusers wrote, a queue of mixed jobs -------------------------------------------------------------
FOREIGN_QUEUE = """\
[defaults]
steps = 2

[[jobs]]
name = "wide"
prompt = "a harbour at dawn"
width = 64
height = 48
seed = 3

[[jobs]]
name = "tall-euler"
prompt = "a harbour at dawn"
negative_prompt = "fog, rain"
width = 48
height = 64
steps = 3
sampler = "euler-a"
seed = 4

[[jobs]]
name = "unguided"
prompt = "ein Leuchtturm, 灯台, 🌊"
cfg = 1
seed = 5

[[jobs]]
name = "drawn-seed"
prompt = "a map of an island"
count = 2

[[jobs]]
name = "ddim"
prompt = "a map of an island"
sampler = "ddim"
steps = 4
width = 64
height = 64
seed = 6
"""


def test_two_processes_on_a_folder_diffusers_wrote_make_the_one_process_images(tmp_path):
    """A PixArt-Σ folder from diffusers' own `save_pretrained` (its test transformer at sample size 32 with bins,
    a 4-block VAE), jobs of three sizes, four samplers, guidance off, drawn seeds and texts shared between jobs:
    two processes make what one makes, each text encoded once, keeping the seeds a run folder drew."""
    from test_foreign_configs import SIGMA, save_folder, small_vae  # noqa: PLC0415

    folder = save_folder(tmp_path / "sigma", pipeline=SIGMA, transformer={"sample_size": 32}, vae=small_vae(4))
    queue = tmp_path / "q.toml"
    queue.write_text(FOREIGN_QUEUE)
    one = run_queue(parse_queue(queue.read_text(), "toml"), tmp_path / "one", Settings(model=folder, **CPU32))
    run = tmp_path / "two"
    run.mkdir()
    # the seeds one process drew, kept by its run.json as a rerun in its folder would keep them
    (run / "run.json").write_text((tmp_path / "one" / "run.json").read_text())
    assert main(["run", str(queue), "--model", folder, "--out", str(run), "--gpus", "cpu:2", "-q",
                 "--dtype", "float32", "--no-embed-cache"]) == 0
    data = manifest(run)
    names = sorted(item.id for item in one.items)
    assert sorted(item["id"] for item in data["items"]) == names and len(names) == 6
    for item in one.items:
        assert max_diff(pixels(run / "images" / f"{item.id}.png"), pixels(one.images[item.id])) <= 1, item.id
    seeds = {item["id"]: item["seed"] for item in data["items"]}
    assert seeds == {item.id: item.seed for item in one.items}  # the drawn ones as run.json kept them
    texts = {"a harbour at dawn", "fog, rain", "ein Leuchtturm, 灯台, 🌊", "a map of an island", ""}
    assert sum(r["made"].get("encode", 0) for r in data["ranks"]) == len(texts)
    assert {item["rank"] for item in data["items"]} == {0, 1}


def test_a_wrong_queue_stops_the_command_and_the_processes_started_for_it(tmp_path, capsys, monkeypatch):
    """The others start before the queue is read (standby.py); a queue that is wrong still stops the command with
    its problems, and the processes started for it are ended with it, having loaded nothing."""
    from pixart_lowvram import standby  # noqa: PLC0415

    started = []
    real = standby.start
    monkeypatch.setattr(standby, "start", lambda gpus: started.append(real(gpus)) or started[-1])
    queue = tmp_path / "q.toml"
    queue.write_text('[[jobs]]\nprompt = "a kite"\nsteps = "many"\n')
    code = main(["run", str(queue), "--out", str(tmp_path / "run"), "--gpus", "cpu:3", "-q"])
    assert code == 2
    assert "steps" in capsys.readouterr().err
    processes = started[0].processes
    assert len(processes) == 2
    assert not any(p.is_alive() for p in processes)  # ended with the command, not left to finish their imports
    assert not (tmp_path / "run").exists()


def test_the_command_reaches_the_start_of_the_others_without_importing_torch():
    """standby.start runs once the command line is parsed: parsing it must not import torch (1 to 2 s), or the
    others would start that much later."""
    script = ("import sys\n"
              "from pixart_lowvram import cli, standby\n"
              "args = cli.build_parser().parse_args(['run', 'q.toml', '--gpus', '0,1', '--model', 'm'])\n"
              "assert standby.planned_processes(args.gpus) == (2, True)\n"
              "assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules), sorted(sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("gpus, planned", [("0,1", (2, True)), ("3, 1 ,2", (3, True)), ("cpu:4", (4, False)),
                                           ("all", None), ("0", None), ("cpu:1", None), ("0,0", None),
                                           ("cpu:x", None), ("1,a", None), (None, None)])
def test_only_a_known_number_of_processes_is_started_ahead(gpus, planned, monkeypatch):
    from pixart_lowvram.standby import planned_processes  # noqa: PLC0415

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert planned_processes(gpus) == planned
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert planned_processes(gpus) is None  # torchrun started this process: it starts none


def test_two_processes_make_lora_and_image_to_image_jobs_as_one_process_does(tiny_model, tmp_path, capsys):
    """A queue of LoRA sets and init images over two processes: each rank merges the sets its share needs, each
    init image is encoded by one rank though both ranks' images need it, and every image is the one-process run's."""
    from test_img2img import write_image  # noqa: PLC0415
    from test_lora import make_adapter  # noqa: PLC0415

    adapter = str(make_adapter(tiny_model, tmp_path / "adapter"))
    picture = write_image(tmp_path / "init.png", 300, 200, 1)
    other = write_image(tmp_path / "other.png", 200, 260, 2)
    queue = tmp_path / "q.json"
    queue.write_text(json.dumps({"defaults": {"steps": 3, "width": 128, "height": 128}, "jobs": [
        {"name": "styled", "prompt": "a cat", "seed": 1, "lora": [{"path": adapter, "scale": 0.7}]},
        {"name": "plain", "prompt": "a cat", "seed": 2},
        {"name": "from-picture", "prompt": "a dog", "seed": 3, "init_image": picture, "strength": 0.6, "count": 3},
        {"name": "styled-picture", "prompt": "a dog", "seed": 4, "init_image": picture, "strength": 0.9,
         "lora": [{"path": adapter, "scale": 0.7}]},
        {"name": "other-picture", "prompt": "a dog", "seed": 6, "init_image": other, "strength": 0.7},
        {"name": "styled-2", "prompt": "a cow", "seed": 5, "lora": [{"path": adapter, "scale": 0.7}], "count": 2}]}))
    one = run_queue(parse_queue(queue.read_text(), "json"), tmp_path / "one", Settings(model=tiny_model, **CPU32))
    run = tmp_path / "two"
    assert main(["run", str(queue), "--model", tiny_model, "--out", str(run), "--gpus", "cpu:2",
                 "--dtype", "float32", "--no-embed-cache"]) == 0
    out = capsys.readouterr().out
    data = manifest(run)
    assert {item["rank"] for item in data["items"]} == {0, 1}
    needs = {}  # init key -> the ranks whose images need it
    for item in data["items"]:
        if item.get("init_key"):
            needs.setdefault(item["init_key"], set()).add(item["rank"])
    assert len(needs) == 2 and {0, 1} in needs.values(), needs  # one picture's images on both ranks
    # each init image encoded once, by one rank, before either denoised
    assert [r["inits"] for r in data["ranks"]] == [1, 1]
    assert [r["made"].get("vae-encode", 0) for r in data["ranks"]] == [1, 1]
    assert {s["name"]: s["items"] for s in data["stages"]}["vae-encode"] == len(needs)
    for r in data["ranks"]:
        timeline = r["timeline"]
        assert timeline["encode end"] <= timeline["vae-encode start"] <= timeline["vae-encode end"] <= \
            timeline["encoded"] <= timeline["denoise start"]
        assert "vae-encode" in r["plan"]
    # the summary: the stage's row per process and over both, and what each was given to encode
    rows = [line.split() for line in out.splitlines()]
    for row in (["vae-encode", "0", "(cpu)", "1"], ["vae-encode", "1", "(cpu)", "1"], ["vae-encode", "all", "2"],
                ["process", "images", "texts", "init", "images"]):
        assert row in [cells[:len(row)] for cells in rows], out
    for item in one.items:
        assert max_diff(pixels(run / "images" / f"{item.id}.png"), pixels(one.images[item.id])) <= 1, item.id


def test_three_processes_load_the_transformer_once_per_lora_set_they_meet(tiny_model, tmp_path, capsys):
    """Four LoRA sets (none, and one adapter at three scales) of three images each over three processes: each rank's
    stretch of four images meets two sets, so the transformer is loaded 6 = 4 + 3 - 1 times in all, as each rank's
    denoise record counts (longest-first, dealing the twelve images in key order, took more). Every image is the
    one-process run's."""
    from test_lora import make_adapter  # noqa: PLC0415

    adapter = str(make_adapter(tiny_model, tmp_path / "adapter"))
    sets = [[], [{"path": adapter, "scale": 0.5}], [{"path": adapter, "scale": 0.8}], [{"path": adapter, "scale": 1}]]
    queue = tmp_path / "q.json"
    queue.write_text(json.dumps({"defaults": {"steps": 2, "width": 64, "height": 64}, "jobs": [
        {"name": f"set{k}", "prompt": f"a lighthouse, style {k}", "seed": 10 * k, "count": 3, "lora": lora}
        for k, lora in enumerate(sets)]}))
    one = run_queue(parse_queue(queue.read_text(), "json"), tmp_path / "one", Settings(model=tiny_model, **CPU32))
    assert [s.loads for s in one.stages if s.name == "denoise"] == [4]
    run = tmp_path / "three"
    assert main(["run", str(queue), "--model", tiny_model, "--out", str(run), "--gpus", "cpu:3", "-q",
                 "--dtype", "float32", "--no-embed-cache"]) == 0
    out = capsys.readouterr().out
    data = manifest(run)
    met = [{json.dumps(item["lora"]) for item in data["items"] if item["rank"] == r} for r in range(3)]
    denoise = [next(s for s in r["stages"] if s["name"] == "denoise") for r in data["ranks"]]
    assert [s["loads"] for s in denoise] == [len(sets_met) for sets_met in met] == [2, 2, 2]
    assert [s["items"] for s in denoise] == [4, 4, 4]
    assert next(s for s in data["stages"] if s["name"] == "denoise")["loads"] == 6
    assert "(1st of 6)" in out, out  # the summary's denoise row over all the processes
    before = [Work(item["image_key"], 64 * 64, 2, lora=json.dumps(item["lora"])) for item in data["items"]]
    assert loads(before, longest_first(before, 3)) > 6
    for item in one.items:
        assert max_diff(pixels(run / "images" / f"{item.id}.png"), pixels(one.images[item.id])) <= 1, item.id


class Bars(Reporter):
    """Rank 0's console: how far each stage's bar, summed over the ranks, went, and its total."""

    def __init__(self):
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}

    def bar(self, desc: str, total: int | None, unit: str = "it", transient: bool = False) -> Bar:
        self.totals[desc], self.done[desc] = total, 0
        done = self.done

        class Counting(Bar):
            def update(self, n: int = 1) -> None:
                done[desc] += n

        return Counting()


def img2img_jobs(entries: list[dict], **defaults) -> list:
    return parse_queue(json.dumps({"defaults": {"steps": 2, "width": 128, "height": 128, **defaults},
                                   "jobs": entries}), "json")


def test_an_init_image_an_earlier_run_encoded_is_encoded_by_no_rank(tiny_model, tmp_path):
    """A folder where an earlier run encoded one picture: two processes resume it with a sweep over both pictures;
    the other picture is encoded by one rank, the one already encoded by none (its file untouched), the vae-encode
    bar counts what is left, and the images are those of one process."""
    from test_img2img import write_image  # noqa: PLC0415

    harbour = write_image(tmp_path / "harbour.png", 300, 200, 1)
    field = write_image(tmp_path / "field.png", 180, 260, 2)
    first = [{"name": "harbour", "prompt": "a harbour", "seed": 1, "init_image": harbour, "strength": 0.6}]
    rest = [{"name": "harbour-sweep", "prompt": "a harbour at night", "seed": 2, "init_image": harbour, "count": 4},
            {"name": "field", "prompt": "a field", "seed": 3, "init_image": field, "strength": 0.9, "count": 2},
            {"name": "boat", "prompt": "a boat", "seed": 4}]
    one = run_queue(img2img_jobs(first + rest), tmp_path / "one", Settings(model=tiny_model, **CPU32))
    run = tmp_path / "run"
    early = run_queue(img2img_jobs(first), run, Settings(model=tiny_model, **CPU32))
    encoding = run / "latents" / f"{early.items[0].init_key}.safetensors"
    before = encoding.stat()

    bars = Bars()
    result = launch.run(img2img_jobs(first + rest), run, Settings(model=tiny_model, **CPU32), bars,
                        threading.Event(), gpus="cpu:2")
    data = manifest(run)
    harbour_ranks = {e["rank"] for e in data["items"] if e.get("init_key") == early.items[0].init_key and "rank" in e}
    assert harbour_ranks == {0, 1}  # both ranks denoise images of the picture encoded before
    assert result.made["vae-encode"] == 1 and sorted(r.inits for r in result.ranks) == [0, 1]
    assert sorted(r.made.get("vae-encode", 0) for r in result.ranks) == [0, 1]
    assert result.made["denoise"] == len(one.items) - 1
    after = encoding.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert bars.totals["vae-encode"] == bars.done["vae-encode"] == 1
    for item in one.items:
        assert max_diff(pixels(result.images[item.id]), pixels(one.images[item.id])) <= 1, item.id


def test_a_picture_one_rank_finds_non_finite_loses_its_images_on_every_rank(tmp_path, capsys):
    """A folder diffusers wrote (a 2-block VAE, sample size 8: no bins) whose VAE encoder overflows float16 on a
    picture with contrast and not on a flat grey one (its first convolution's weights scaled by 1e5). Over two
    processes the contrasted picture is encoded by one rank; the images of it on the other rank are lost too, as
    one process loses them: the same non-finite record, the same images made, exit code 4. With --upcast vae only
    that picture is encoded again, by one rank."""
    from PIL import Image  # noqa: PLC0415
    from safetensors.torch import load_file, save_file  # noqa: PLC0415
    from test_foreign_configs import save_folder, small_vae  # noqa: PLC0415
    from test_img2img import write_image  # noqa: PLC0415

    folder = save_folder(tmp_path / "model", vae=small_vae(2))
    # the weights file alone rewritten (a config saved again would name its folder: keys, and so the division,
    # would change with the test's temporary path)
    weights = Path(folder) / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["encoder.conv_in.weight"] *= 1e5
    save_file(tensors, weights, metadata={"format": "pt"})
    wild = write_image(tmp_path / "wild.png", 40, 40, 1)
    grey = str(tmp_path / "grey.png")
    Image.new("RGB", (40, 40), (128, 128, 128)).save(grey)
    queue = tmp_path / "q.json"
    queue.write_text(json.dumps({"defaults": {"steps": 4, "width": 32, "height": 32, "strength": 0.5}, "jobs": [
        {"name": "wild", "prompt": "a storm", "seed": 1, "init_image": wild, "count": 3},
        {"name": "wild-more", "prompt": "a storm", "seed": 2, "init_image": wild, "strength": 1.0},
        {"name": "grey", "prompt": "a calm sea", "seed": 3, "init_image": grey, "count": 2},
        {"name": "text", "prompt": "a calm sea", "seed": 4}]}))
    half = dict(model=folder, device="cpu", dtype="float16", embed_cache=None)
    one = run_queue(parse_queue(queue.read_text(), "json"), tmp_path / "one", Settings(**half))
    lost = {"wild-1", "wild-2", "wild-3", "wild-more"}
    assert [(f.stage, f.component, f.dtype, set(f.items)) for f in one.failures] == [
        ("vae-encode", "vae", "float16", lost)]

    run = tmp_path / "two"
    command = ["run", str(queue), "--model", folder, "--out", str(run), "--gpus", "cpu:2", "-q",
               "--dtype", "float16", "--no-embed-cache"]
    assert main(command) == 4
    assert "4 image(s) not made: the vae (float16) gave non-finite values in vae-encode" in capsys.readouterr().err
    data = manifest(run)
    ranks = {e["id"]: e["rank"] for e in data["items"]}
    assert {ranks[name] for name in lost} == {0, 1}  # the lost images were on both ranks
    # each picture encoded by one rank (the texts are 2 + 1: the first picture went to the rank with fewer); the
    # wild one's encoding not written
    assert [r["inits"] for r in data["ranks"]] == [1, 1]
    assert sum(r["made"].get("vae-encode", 0) for r in data["ranks"]) == 1
    assert [(f["stage"], set(f["items"])) for f in data["non_finite"]] == [("vae-encode", lost)]
    for r in data["ranks"]:  # each rank names the images of its own share that it lost
        assert {name for f in r["failures"] for name in f["items"]} == {n for n in lost if ranks[n] == r["rank"]}
    made = sorted(p.name for p in (run / "images").glob("*.png"))
    assert made == sorted(f"{item.id}.png" for item in one.items if item.id not in lost)
    for item in one.items:
        if item.id not in lost:
            assert max_diff(pixels(run / "images" / f"{item.id}.png"), pixels(one.images[item.id])) <= 1, item.id

    assert main([*command, "--upcast", "vae"]) == 0
    data = manifest(run)
    assert sum(r["made"].get("vae-encode", 0) for r in data["ranks"]) == 1  # the wild picture alone, once
    assert sum(r["made"].get("denoise", 0) for r in data["ranks"]) == len(lost)
    assert all((run / "images" / f"{item.id}.png").is_file() for item in one.items)


def test_every_rank_compiles_what_rank_0_decided_for_the_whole_queue(tiny_model, tmp_path, monkeypatch):
    """Which image sizes and batches are compiled is decided once, by rank 0, for all that is left, as one process
    would decide it, and every rank follows (compiled and eager images differ by float16 rounding: a rank deciding
    on its own share could make other images than one GPU makes). Here rank 0 decides to compile nothing although
    --compile on would compile every shape: the other rank, in a process of its own, compiles nothing either."""
    from pixart_lowvram import generate  # noqa: PLC0415

    decided: list[dict] = []

    def nothing(mode, device, calls):
        decided.append(dict(calls))
        return set()

    monkeypatch.setattr(generate, "shapes_to_compile", nothing)  # in this process only: rank 0
    queue = tmp_path / "q.json"
    queue.write_text(json.dumps({"defaults": {"steps": 2, "width": 64, "height": 64}, "jobs": [
        {"name": "a", "prompt": "a lighthouse", "seed": 1, "count": 3},
        {"name": "b", "prompt": "a harbour", "seed": 5, "width": 128, "count": 2}]}))
    run = tmp_path / "two"
    assert main(["run", str(queue), "--model", tiny_model, "--out", str(run), "--gpus", "cpu:2", "-q",
                 "--dtype", "float32", "--no-embed-cache", "--compile", "on"]) == 0
    assert len(decided) == 1 and sum(decided[0].values()) > 0  # once, over the whole queue's calls
    data = manifest(run)
    assert {item["rank"] for item in data["items"]} == {0, 1}
    denoise = [next(s for s in r["stages"] if s["name"] == "denoise") for r in data["ranks"]]
    assert [s["compile_seconds"] for s in denoise] == [None, None]
