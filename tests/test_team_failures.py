"""A run over several processes (`--gpus cpu:N`, gloo ranks on the CPU) meeting what goes wrong from outside: Ctrl-C
in a terminal (it reaches every process of the run) at any moment, the libraries still loading included; a rank
that dies or fails in each stage; the run folder given in odd ways. Each ends without hanging, with the exit code
the README promises and one message, keeps what was finished, and the same command resumes it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import max_diff, pixels
from test_multigpu import CPU32, child
from pixart_lowvram.generate import Settings, run_queue
from pixart_lowvram.jobs import parse_queue

QUEUE = """\
[defaults]
steps = 2
width = 64
height = 64

[[jobs]]
name = "kite"
prompt = "a red kite"
seed = 1
count = 2
"""


def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "XDG_CACHE_HOME": str(tmp_path / "cache")}


def session_children(leader: int) -> list[int]:
    """The live processes of `leader`'s session other than itself (zombies left for init to reap are not)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == leader:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == leader:  # state, ..., session id
            found.append(int(entry.name))
    return found


def ctrl_c_when(command: list[str], tmp_path: Path, ready, within: float):
    """Start `command` in a session of its own, as a terminal gives a command, with Ctrl-C handled as Python's
    default does whatever the test's own process ignores; once `ready()` holds (checked until `within` seconds),
    send Ctrl-C to its whole group. Returns the process, ended, and its stderr."""
    first = subprocess.Popen(command, cwd=tmp_path, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                                                 signal.SIG_DFL))
    try:
        deadline = time.monotonic() + within
        while not ready(first):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        os.killpg(first.pid, signal.SIGINT)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.communicate()
    return first, err


def test_ctrl_c_while_the_other_processes_load_the_libraries_is_one_message_and_130(tiny_model, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the command, and the fork server that is still importing
    torch and diffusers for the workers (or a worker on standby). The command ends with 130 and its one message; no
    other process prints a KeyboardInterrupt traceback, and none is left behind."""
    queue = tmp_path / "q.toml"
    queue.write_text(QUEUE)
    command = [sys.executable, "-m", "pixart_lowvram.cli", "run", str(queue), "--model", tiny_model, "--out",
               str(tmp_path / "run"), "--gpus", "cpu:2", "-q"]
    def importing(first) -> bool:
        """The others have started (the fork server is importing: a command line names it), and are into the imports."""
        if any(b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
               for pid in session_children(first.pid) if Path(f"/proc/{pid}/cmdline").exists()):
            time.sleep(0.3)
            return True
        return False

    first, err = ctrl_c_when(command, tmp_path, importing, within=60)
    assert first.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted; finished work is kept" in err
    deadline = time.monotonic() + 20
    while session_children(first.pid):  # the fork server and the resource tracker end once the command is gone
        assert time.monotonic() < deadline, session_children(first.pid)
        time.sleep(0.1)


def one_process_images(tiny_model: str, queue: Path, tmp_path: Path) -> dict[str, object]:
    result = run_queue(parse_queue(queue.read_text(), "toml"), tmp_path / "one", Settings(model=tiny_model, **CPU32))
    return {item.id: pixels(result.images[item.id]) for item in result.items}


def assert_same_images(run: Path, one: dict[str, object]) -> None:
    """The same pixels as one process makes (text-to-image: the ranks' share of the cores rounds nothing otherwise)."""
    assert sorted(p.stem for p in (run / "images").glob("*.png")) == sorted(one)
    for name, image in one.items():
        assert max_diff(pixels(run / "images" / f"{name}.png"), image) == 0, name


def test_rank_0_killed_leaves_the_others_to_end_on_their_own_in_one_line_each(tiny_model, tmp_path):
    """The command's own process (rank 0) killed outright in its denoising (the OOM killer's likeliest choice): the
    other ends by itself at once (the test's wait for its output to close is bounded), saying so in one line, with
    no C++ stack trace from the calls it made to the store that went with rank 0; the same command resumes."""
    queue = tmp_path / "q.toml"
    queue.write_text(QUEUE.replace("count = 2", "count = 4"))
    run = tmp_path / "run"
    command = ["--", "run", str(queue), "--model", tiny_model, "--out", str(run), "--gpus", "cpu:2", "-q",
               "--dtype", "float32"]
    cache = ["--env", f"XDG_CACHE_HOME={tmp_path / 'cache'}"]
    killed = child([*cache, "--kill", "denoise:compute:2", "--rank", "0", *command], tmp_path, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    lines = [line for line in killed.stderr.splitlines() if line.strip()]
    # One line, naming the lost contact wherever rank 1 noticed it (a call to the store, or its team thread, which
    # stops its stage); none where rank 1 had finished its share and ended before rank 0 died (a loaded machine)
    assert all(line.startswith("error: rank 1 (cpu): lost contact") and "run the same command again" in line
               for line in lines) and len(lines) <= 1, killed.stderr
    assert list((run / "embeds").glob("*.safetensors")), "what was encoded is kept"
    again = child([*cache, *command], tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    assert_same_images(run, one_process_images(tiny_model, queue, tmp_path))


@pytest.mark.parametrize("point, named", [
    ("decode:load:1", "during decode"),  # loading the VAE, its denoising done
    ("encode:barrier:1", "during the wait for the others after encoding"),
])
def test_a_rank_killed_between_its_steps_is_named_where_it_was(point, named, tiny_model, tmp_path):
    """Rank 1 killed while it loads a stage's component, or while it waits for the others after encoding: the run
    ends with exit code 5 naming where it was (not the stage it finished before), and the same command finishes."""
    queue = tmp_path / "q.toml"
    queue.write_text(QUEUE)
    run = tmp_path / "run"
    command = ["--", "run", str(queue), "--model", tiny_model, "--out", str(run), "--gpus", "cpu:2", "-q",
               "--dtype", "float32"]
    cache = ["--env", f"XDG_CACHE_HOME={tmp_path / 'cache'}"]
    killed = child([*cache, "--kill", point, "--rank", "1", *command], tmp_path, timeout=120)
    assert killed.returncode == 5, killed.stderr
    assert f"error: rank 1 (cpu) ended unexpectedly (killed by signal 9) {named};" in killed.stderr
    if point.endswith("barrier:1"):
        assert len(list((run / "embeds").glob("*.safetensors"))) == 2, "both texts encoded, by one rank each"
        again = child([*cache, *command], tmp_path, timeout=120)
        assert again.returncode == 0, again.stderr
        assert "encode" not in {s["name"] for s in json.loads((run / "run.json").read_text())["stages"]
                                if not s["skipped"]}
        assert_same_images(run, one_process_images(tiny_model, queue, tmp_path))


def test_ctrl_c_under_torchrun_is_told_once_by_rank_0(tiny_model, tmp_path):
    """Under torchrun a terminal's Ctrl-C reaches every rank (and torchrun, which passes it on): rank 0 alone says it
    is stopping, and what was finished is kept for the same command to resume. (torchrun's own exit code and report
    follow: they are torchrun's.)"""
    queue = tmp_path / "q.toml"
    queue.write_text(QUEUE.replace("steps = 2", "steps = 30").replace("count = 2", "count = 6"))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "pixart_lowvram.cli", "run", str(queue), "--model", tiny_model, "--out", str(run), "--device", "cpu",
               "--dtype", "float32", "-q"]
    # denoising, some images finished
    first, err = ctrl_c_when(command, tmp_path, lambda _: list((run / "latents").glob("*.safetensors")), within=120)
    assert err.count("stopping after the current step is saved") == 1, err
    # torchrun passes the Ctrl-C on, a second one: rank 0 may stop at once, wherever it is
    assert "finished work is kept" in err and "run the same command again" in err.lower(), err
    made = len(list((run / "latents").glob("*.safetensors")))
    assert 1 <= made < 6 and not list(run.rglob("*.tmp"))


def test_under_torchrun_a_rank_killed_is_named_by_rank_0_which_stops_soon(tiny_model, tmp_path):
    """Under torchrun nobody tells rank 0 that rank 1 died: torchrun asks it to stop (SIGTERM). Rank 0 finds rank 1
    silent (its team thread no longer ticks) instead of waiting GRACE_SECONDS for its record, and ends the run naming
    it, with exit code 5, before torchrun's own deadline (30 s) would kill it."""
    queue = tmp_path / "q.toml"
    queue.write_text(QUEUE.replace("steps = 2", "steps = 10").replace("count = 2", "count = 4"))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).with_name("crash_child.py")), "--kill", "denoise:compute:3", "--rank", "1", "--",
               "run", str(queue), "--model", tiny_model, "--out", str(run), "--device", "cpu", "--dtype", "float32",
               "-q"]
    done = subprocess.run(command, cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "error: rank 1 (cpu) ended unexpectedly (it stopped answering) during denoise" in done.stderr, done.stderr
    assert "exitcode  : 5" in done.stderr  # rank 0's, in torchrun's report
    data = json.loads((run / "run.json").read_text())
    assert [r["missing"] for r in data["ranks"]] == [None, "it ended unexpectedly"]
