"""Whatever a queue holds, the only outcomes are valid jobs or a QueueError with problems: never a crash."""
from __future__ import annotations

import json
import math
import re
from pathlib import PurePosixPath, PureWindowsPath

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixart_lowvram.errors import Problem, QueueError
from pixart_lowvram.jobs import (KNOWN_FIELDS, MAX_COUNT, MAX_SEED, MAX_SIDE, MAX_STEPS, SAMPLER_NAMES, Job,
                                 parse_queue, validate_document)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

tricky_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " ", "\0", "a\0b", "../x", "..", ".", "a/b", "a\\b", "C:\\x", "C:x", "/etc/passwd",
                     "pirate-ship", "Pirate-Ship", "-x", ".hidden", "1024", "4.5", "café", "\ud800", "x" * 101]),
)
numbers = st.one_of(
    st.integers(), st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, 1, 8, 1024, 4096, 4104,
                                                                                    MAX_SEED, MAX_SEED + 1, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1024.0, 4.5, -0.0, 1e308]),
)
leaves = st.one_of(st.none(), st.booleans(), numbers, tricky_text)
keys = st.one_of(st.sampled_from(KNOWN_FIELDS + ("defaults", "jobs", "job", "Prompt")), st.text(max_size=8))
json_like = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(keys, inner, max_size=5)), max_leaves=20)

# Jobs that are often valid, so that the checks on accepted jobs run as well.
good_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30).filter(str.strip)
good_values = {
    "negative_prompt": st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20),
    "width": st.integers(1, MAX_SIDE // 8).map(lambda n: n * 8),
    "height": st.sampled_from([8, 512, 1024, MAX_SIDE]),
    "seed": st.one_of(st.integers(0, 2**32), st.sampled_from([0, MAX_SEED, MAX_SEED - 3])),
    "cfg": st.one_of(st.floats(0, 20), st.integers(0, 20)),
    "steps": st.integers(1, 50),
    "count": st.integers(1, 5),
    "sampler": st.sampled_from(SAMPLER_NAMES + ("eulr", "DDIM", "")),
    "name": st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,10}", fullmatch=True),
}
good_job = st.fixed_dictionaries({"prompt": good_text}, optional=good_values)
good_doc = st.one_of(
    st.lists(good_job, min_size=1, max_size=4),
    st.fixed_dictionaries({"jobs": st.lists(good_job, min_size=1, max_size=4)},
                          optional={"defaults": st.fixed_dictionaries(
                              {}, optional={k: v for k, v in good_values.items() if k != "name"})}),
)
# ...and the same with any value in any field, and keys that are not fields.
plausible_values = {field: st.one_of(good, leaves) for field, good in good_values.items()}
plausible_job = st.fixed_dictionaries({"prompt": st.one_of(good_text, tricky_text, leaves)},
                                      optional={**plausible_values, "xtra": leaves, "sed": leaves})
plausible_doc = st.one_of(
    st.lists(plausible_job, max_size=4),
    st.fixed_dictionaries({"jobs": st.lists(plausible_job, max_size=4)},
                          optional={"defaults": st.fixed_dictionaries({}, optional=plausible_values)}),
)
documents = st.one_of(good_doc, plausible_doc, json_like, st.dictionaries(keys, json_like, max_size=3))

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


def check_job(job: Job) -> None:
    assert type(job.prompt) is str and job.prompt.strip() and "\0" not in job.prompt
    job.prompt.encode("utf-8")
    assert type(job.negative_prompt) is str and "\0" not in job.negative_prompt
    for side in (job.width, job.height):
        assert side is None or (type(side) is int and 8 <= side <= MAX_SIDE and side % 8 == 0)
    assert job.steps is None or (type(job.steps) is int and 1 <= job.steps <= MAX_STEPS)
    assert type(job.count) is int and 1 <= job.count <= MAX_COUNT
    assert job.cfg is None or (type(job.cfg) is float and math.isfinite(job.cfg) and job.cfg >= 0)
    assert job.sampler is None or job.sampler in SAMPLER_NAMES
    assert job.seed is None or (type(job.seed) is int and 0 <= job.seed and job.seed + job.count - 1 <= MAX_SEED)
    if job.name is not None:
        assert type(job.name) is str and SAFE_NAME.fullmatch(job.name)
        for flavour in (PurePosixPath, PureWindowsPath):
            path = flavour("run", "images", f"{job.name}.png")
            assert path.parent == flavour("run", "images") and ".." not in path.parts


def check_outcome(run) -> None:
    """`run()` gives valid jobs, or raises a QueueError holding only well-formed problems."""
    try:
        jobs = run()
    except QueueError as error:
        assert error.problems and all(isinstance(p, Problem) and p.message for p in error.problems)
        str(error)
        for problem in error.problems:
            if problem.field == "name" and problem.hint and problem.hint.startswith("for example "):
                assert SAFE_NAME.fullmatch(problem.hint.removeprefix("for example ").strip("'\""))
        return
    assert isinstance(jobs, list) and jobs
    assert [job.index for job in jobs] == list(range(1, len(jobs) + 1))
    for job in jobs:
        check_job(job)
    names = [job.name.lower() for job in jobs if job.name]
    assert len(names) == len(set(names))


@FAST
@given(documents)
def test_any_document(doc):
    check_outcome(lambda: validate_document(doc, "fuzz"))


@FAST
@given(documents)
def test_any_document_as_json_text(doc):
    check_outcome(lambda: parse_queue(json.dumps(doc), "json"))


@FAST
@given(st.lists(st.one_of(good_job, plausible_job, json_like, st.fixed_dictionaries({"defaults": json_like})),
                max_size=5))
def test_any_jsonl_lines(lines):
    check_outcome(lambda: parse_queue("\n".join(json.dumps(line) for line in lines), "jsonl"))


toml_literals = st.sampled_from(['"a lighthouse"', '""', '"a\\u0000b"', '"../x"', "1024", "1020", "-8", "0",
                                 "4.5", "nan", "inf", "-1.0", "true", "[1, 2]", "{ a = 1 }", "1979-05-27",
                                 "18446744073709551615", "18446744073709551616", '"pirate-ship"'])
any_line = st.tuples(st.sampled_from(KNOWN_FIELDS + ("sed", "job")), toml_literals).map(" = ".join)
good_line = st.sampled_from(['negative_prompt = "blurry"', "width = 512", "height = 1024", "seed = 7", "cfg = 4",
                             "cfg = 0.5", "steps = 3", "count = 2", 'name = "ship"', 'name = "Ship"'])
good_table = st.lists(good_line, max_size=4).map(lambda lines: "\n".join(['[[jobs]]', 'prompt = "a"', *lines]))
any_table = st.tuples(st.sampled_from(["[[jobs]]", "[defaults]", "[jobs]", "[[job]]"]),
                      st.lists(st.one_of(good_line, any_line), max_size=5)).map(lambda t: "\n".join([t[0], *t[1]]))
toml_table = st.one_of(good_table, any_table)


@FAST
@given(st.lists(toml_table, max_size=4).map("\n".join))
def test_toml_built_from_pieces(text):
    check_outcome(lambda: parse_queue(text, "toml"))


@FAST
@given(st.text(max_size=200), st.sampled_from(["toml", "json", "jsonl"]))
def test_any_text(text, fmt):
    check_outcome(lambda: parse_queue(text, fmt))
