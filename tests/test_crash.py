"""Killed at any moment (SIGKILL, a power cut) in any stage, the same command run again finishes the queue, and
every image equals the one an uninterrupted run makes. A half-written file is never taken for a finished one.

Each case runs the real command line in a child process (tests/crash_child.py) that SIGKILLs itself at a chosen
point of one stage, then runs the same command again in a fresh process, and compares every PNG pixel for pixel
with those of one uninterrupted run of the same queue: the tiny model on the CPU in float32, so the same kernels
every time and exactly the same pixels.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixart_lowvram.generate import Settings, run_queue
from pixart_lowvram.jobs import load_queue
from pixart_lowvram.run import RunFolder

CHILD = Path(__file__).with_name("crash_child.py")

QUEUE = """\
[defaults]
steps = 2

[[jobs]]
name = "kite"
prompt = "a red kite over the sea"
seed = 11

[[jobs]]
name = "boat"
prompt = "a blue boat"
negative_prompt = "fog"
seed = 12
width = 256
height = 192

[[jobs]]
name = "lighthouse"            # no seed: drawn at random, recorded in run.json, reused by a rerun
prompt = "a lighthouse at dusk"
width = 192
height = 256

[[jobs]]
name = "kite-again"            # the same prompt again: encoded once
prompt = "a red kite over the sea"
seed = 13
cfg = 1

[[jobs]]
name = "map"
prompt = "an old map of the harbour"
seed = 14
steps = 3
"""
NAMES = ["kite", "boat", "lighthouse", "kite-again", "map"]
DRAWN = "lighthouse"
SEEDED = [name for name in NAMES if name != DRAWN]
TOTAL = {"encode": 6, "denoise": 5, "decode": 5}  # texts (with "" and "fog", the negatives), latents, images
STAGES = list(TOTAL)
# The killed run and the reference draw the lighthouse's seed from random.Random(DRAW_SEED); the rerun draws from
# the system's entropy, so it makes the reference image only if it reuses the seed the killed run recorded.
DRAW_SEED = 4242

# The order each stage works in, to read the kill points below:
#   encode   texts in queue order: "a red kite over the sea", "" (negative), "a blue boat", "fog",
#            "a lighthouse at dusk", "an old map of the harbour"
#   denoise  sorted by size, steps and cfg, one image at a time: lighthouse (192x256), boat (256x192),
#            kite-again (cfg 1), kite, map (3 steps); the transformer runs once per step
#   decode   queue order: kite, boat, lighthouse, kite-again, map
KILLS = [
    # stage,    where the child is killed,  N, artifacts of the stage finished when killed
    ("encode", "temp-half", 3, 2),  # half of the 3rd embedding in its temporary file
    ("encode", "renamed", 2, 2),  # right after the 2nd embedding is renamed into place
    ("encode", "compute", 1, 0),  # inside T5's forward
    ("encode", "manifest-half", 1, 6),  # writing run.json at the end of the stage, half of it in the temp file
    ("denoise", "temp-whole", 2, 1),  # the 2nd latent's whole temporary file written, not yet renamed
    ("denoise", "renamed", 3, 3),
    ("denoise", "compute", 4, 1),  # inside the transformer's forward, step 2 of the 2nd image
    ("denoise", "torn", 4, 3),  # half the 4th latent straight at its final name (a writer without a temp file)
    ("denoise", "manifest-whole", 1, 5),  # run.json's whole temporary file written, not yet renamed
    ("decode", "temp-half", 2, 1),
    ("decode", "renamed", 4, 4),
    ("decode", "compute", 3, 2),  # inside vae.decode of the 3rd image
    ("decode", "manifest-torn", 1, 5),  # half of run.json written over the old one: the drawn seed is lost
]


# -- running the command line in child processes ---------------------------------------------------------------
class Children:
    """Runs `crash_child.py` in fresh processes, one process per run. Processes are started ahead of their turn
    and import torch and diffusers while earlier runs work; each reads its arguments only when its turn comes."""

    def __init__(self, cwd: Path, ahead: int = 2):
        self.cwd = cwd
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.ahead = ahead
        self.spares: list[subprocess.Popen] = []

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(CHILD), "--stdin"], cwd=self.cwd, env=self.env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def run(self, args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
        proc = self.spares.pop(0) if self.spares else self._start()
        self.spares += [self._start() for _ in range(self.ahead - len(self.spares))]
        try:
            out, err = proc.communicate(json.dumps(args) + "\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    def close(self) -> None:
        for proc in self.spares:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    runner = Children(tmp_path_factory.mktemp("children"))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def queue(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("queue") / "queue.toml"
    path.write_text(QUEUE)
    return path


def command(queue: Path, model: str, out: Path) -> list[str]:
    """The command the user runs, and runs again after the crash. XDG_CACHE_HOME: the library's cache folder
    (embeddings shared across runs) is the test's own, never the user's ~/.cache nor another test's."""
    return ["--env", f"XDG_CACHE_HOME={out.parent / 'cache'}", "--",
            "run", str(queue), "--model", model, "--out", str(out), "--device", "cpu", "-q"]


def run_killed(children, cmd, kill: str) -> subprocess.CompletedProcess:
    done = children.run(["--kill", kill, "--draw-seed", str(DRAW_SEED), *cmd])
    assert done.returncode == -signal.SIGKILL, f"not killed at {kill} (exit {done.returncode}):\n{done.stderr}"
    return done


def run_again(children, cmd) -> subprocess.CompletedProcess:
    done = children.run(cmd)  # the same command, nothing injected
    assert done.returncode == 0, done.stderr
    assert f"{len(NAMES)}/{len(NAMES)} images in" in done.stdout
    return done


# -- what is in a run folder -------------------------------------------------------------------------------------
def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def manifest(run: Path) -> dict | None:
    """run.json if it is whole, else None."""
    try:
        return json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return None


def items(run: Path) -> dict[str, dict]:
    return {item["id"]: item for item in manifest(run)["items"]}


FOLDER = {"encode": "embeds", "denoise": "latents", "decode": "images"}


def at_final_names(run: Path, stage: str) -> int:
    return sum(1 for p in (run / FOLDER[stage]).iterdir() if not p.name.startswith("."))


def temp_files(run: Path) -> list[Path]:
    return sorted(run.rglob("*.tmp"))


def whole(artifact: Path) -> bool:
    """A safetensors artifact the library would take as finished: readable, and made by its own key."""
    return RunFolder(artifact.parent.parent).read_tensors(artifact, artifact.stem, {}) is not None


def made_by_last_run(run: Path) -> dict[str, int]:
    return {s["name"]: s["items"] for s in manifest(run)["stages"] if not s["skipped"]}


@pytest.fixture(scope="module")
def reference(children, queue, tiny_model, tmp_path_factory) -> dict:
    """One uninterrupted run of the queue: every image, and the seed it drew for the job without one."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = children.run(["--draw-seed", str(DRAW_SEED), *command(queue, tiny_model, run)])
    assert done.returncode == 0, done.stderr
    assert made_by_last_run(run) == TOTAL
    return {"run": run, "images": {name: pixels(run / "images" / f"{name}.png") for name in NAMES},
            "drawn_seed": items(run)[DRAWN]["seed"]}


def assert_finished_like_the_reference(run: Path, reference: dict, names: list[str]) -> None:
    assert sorted(p.name for p in (run / "images").glob("*.png")) == sorted(f"{n}.png" for n in NAMES)
    assert all(item["done"] for item in items(run).values())
    for name in names:
        assert np.array_equal(pixels(run / "images" / f"{name}.png"), reference["images"][name]), name


# -- the tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, where, n, finished", KILLS,
                         ids=[f"{stage}-{where}-{n}" for stage, where, n, _ in KILLS])
def test_killed_anywhere_the_same_command_finishes_with_the_same_images(
        stage, where, n, finished, children, queue, tiny_model, reference, tmp_path):
    run = tmp_path / "run"
    cmd = command(queue, tiny_model, run)
    run_killed(children, cmd, f"{stage}:{where}:{n}")

    # Killed where we meant: earlier stages finished, this one part-way, later ones not started.
    before, after = STAGES[:STAGES.index(stage)], STAGES[STAGES.index(stage) + 1:]
    assert [at_final_names(run, s) for s in before] == [TOTAL[s] for s in before]
    assert at_final_names(run, stage) == finished + (where == "torn"), "only a finished file has its final name"
    assert [at_final_names(run, s) for s in after] == [0 for _ in after]
    stray = temp_files(run)
    if where.endswith(("half", "whole")):
        expected_folder = run if where.startswith("manifest") else run / FOLDER[stage]
        assert [p.parent for p in stray] == [expected_folder], stray  # the half-written file the kill left
    else:
        assert stray == []
    manifest_survives = where != "manifest-torn"  # run.json is written atomically: the old one stays whole
    if manifest_survives:
        assert items(run)[DRAWN]["seed"] == reference["drawn_seed"]

    # The lighthouse's latents and image record the seed drawn for it, once finished
    seed_recorded = any(reference["drawn_seed"] in seeds for seeds in RunFolder(run).recover_drawn_seeds().values())
    run_again(children, cmd)
    assert temp_files(run) == [], "the rerun removed the temporaries the kill left"

    if manifest_survives:
        assert items(run)[DRAWN]["seed"] == reference["drawn_seed"], "the rerun reuses the recorded seed"
        assert_finished_like_the_reference(run, reference, NAMES)
        # Exactly what was not finished is made again: nothing finished is redone, nothing half-made is kept.
        redo = {s: TOTAL[s] for s in after} | {stage: TOTAL[stage] - finished}
        assert made_by_last_run(run) == {s: k for s, k in redo.items() if k}
    elif seed_recorded:
        # run.json is torn, but the lighthouse's finished latents or image record its drawn seed: read back
        assert items(run)[DRAWN]["seed"] == reference["drawn_seed"]
        assert_finished_like_the_reference(run, reference, NAMES)
    else:
        # Without run.json and before the lighthouse's latents exist, its drawn seed is lost: the rerun draws
        # another one and makes that image anew, so only the seeded images are compared.
        assert items(run)[DRAWN]["seed"] != reference["drawn_seed"]
        assert_finished_like_the_reference(run, reference, SEEDED)
        assert made_by_last_run(run) == {"denoise": 1, "decode": 1}


def test_after_a_power_cut_truncated_files_are_redone_and_a_garbled_manifest_is_rebuilt(
        children, queue, tiny_model, reference, tmp_path):
    run = tmp_path / "run"
    cmd = command(queue, tiny_model, run)
    run_killed(children, cmd, "decode:compute:3")  # kite and boat decoded; killed inside vae.decode of the 3rd
    jobs = items(run)  # the manifest written after denoise

    # What a disk can lose in a power cut: the tails of the newest files of each stage, and run.json.
    boat = run / "images" / "boat.png"  # the newest image: its second half lost
    boat.write_bytes(boat.read_bytes()[: boat.stat().st_size // 2])
    latent = run / jobs["map"]["latents"]  # the newest latent; map's image is not made yet
    latent.write_bytes(bytes(latent.stat().st_size))  # the size kept, the data zeros (delayed allocation)
    embed = run / "embeds" / f"{jobs['map']['prompt_key']}.safetensors"  # the newest embedding, needed to redo it
    embed.write_bytes(embed.read_bytes()[:5])
    (run / "run.json").write_bytes(b'{"version": 1, "items": [\x00\x00\x00\xff\xfe garbage')

    run_again(children, cmd)

    # The manifest was lost, but not the seed drawn for the lighthouse: its finished latents record it. Boat's
    # torn image shows it is ours: made again in place.
    assert_finished_like_the_reference(run, reference, NAMES)
    made = made_by_last_run(run)
    assert (made["denoise"], made["decode"]) == (1, 4)  # map's latent; every image not finished, boat's again
    assert whole(latent) and whole(embed)  # map's embedding made again (or taken from the embedding cache)
    lighthouse = items(run)[DRAWN]
    with Image.open(run / "images" / f"{DRAWN}.png") as im:
        assert json.loads(im.text["pixart_lowvram"])["seed"] == lighthouse["seed"] == reference["drawn_seed"]


# A run.json that parses, with version 1, but with fields of the wrong type is rebuilt like an unreadable one, not
# used as it is (expand's drawn_seeds.get, removed_images' items + [...]) to die with a Python traceback.
@pytest.mark.parametrize("garbage", ['{"version": 1, "drawn_seeds": []}', '{"version": 1, "items": {}}',
                                     '{"version": 1, "items": [1, 2]}', '{"version": 1, "drawn_seeds": null}'])
def test_a_manifest_of_the_wrong_shape_is_rebuilt_too(garbage, queue, tiny_model, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    (run / "run.json").write_text(garbage)
    result = run_queue(load_queue(queue), run, Settings(model=tiny_model, device="cpu", dtype="float32"))
    assert all(item["done"] for item in items(run).values())
    for name in NAMES:  # the lighthouse's drawn seed is read back from its image, which records it
        assert np.array_equal(pixels(result.images[name]), reference["images"][name]), name


@pytest.mark.parametrize("lost", [1, 12, 20])
def test_a_png_that_lost_its_last_bytes_is_not_taken_for_finished(reference, tmp_path, lost):
    """PIL stops reading a PNG once it has the pixels: losing the IEND chunk (12 bytes), the last CRC and the zlib
    checksum goes unnoticed by Image.load(), so the library must check the file's end itself."""
    whole_png = reference["run"] / "images" / "map.png"
    key = items(reference["run"])["map"]["image_key"]
    folder = RunFolder(tmp_path)
    torn = tmp_path / "map.png"
    torn.write_bytes(whole_png.read_bytes()[:-lost])
    assert folder.png_is_done(whole_png, key)
    assert not folder.png_is_done(torn, key)


def test_a_png_checked_once_is_not_decoded_again_until_it_changes(reference, tmp_path, monkeypatch):
    """The manifest is written after every stage, with each image's state: a PNG this folder wrote or already
    checked is not decoded again, unless the file changed since (then it is checked afresh)."""
    key = items(reference["run"])["map"]["image_key"]
    png = tmp_path / "map.png"
    shutil.copy(reference["run"] / "images" / "map.png", png)
    folder = RunFolder(tmp_path)
    reads = []
    real = RunFolder._read_png_key
    monkeypatch.setattr(RunFolder, "_read_png_key", staticmethod(lambda path: reads.append(path) or real(path)))
    assert folder.png_is_done(png, key) and folder.png_is_done(png, key)
    assert len(reads) == 1
    png.write_bytes(png.read_bytes()[:-12])  # torn by someone else: its size and time change
    assert not folder.png_is_done(png, key)
    assert len(reads) == 2
    folder.write_png(png, Image.open(reference["run"] / "images" / "map.png"), {"pixart_lowvram": f'{{"key": "{key}"}}'})
    assert folder.png_is_done(png, key) and not folder.png_is_done(png, "another key")
    assert len(reads) == 2  # what it wrote, it knows
    png.unlink()
    assert not folder.png_is_done(png, key)
