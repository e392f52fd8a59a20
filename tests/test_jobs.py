"""Queue files and command-line prompts -> validated jobs. Each test is a small usage example."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pixart_lowvram.errors import Problem, QueueError
from pixart_lowvram.jobs import (KNOWN_FIELDS, MAX_COUNT, MAX_SEED, MAX_SIDE, Job,
                                 jobs_from_options, load_queue, parse_queue, validate_document)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "seed-queue.toml"


def problems_of(text: str, fmt: str = "toml") -> list[Problem]:
    with pytest.raises(QueueError) as caught:
        parse_queue(text, fmt)
    assert caught.value.problems, "a QueueError always carries at least one Problem"
    return caught.value.problems


def only_problem(text: str, fmt: str = "toml") -> Problem:
    problems = problems_of(text, fmt)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def job_problem(fields: dict, index: int = 1) -> Problem:
    """The one problem of a JSON queue whose job `index` has `fields` (other jobs are fine)."""
    jobs = [{"prompt": "fine"} for _ in range(index - 1)] + [fields]
    problem = only_problem(json.dumps(jobs), "json")
    assert problem.job_index == index
    return problem


# ---- good queues --------------------------------------------------------------------------------------------

def test_a_minimal_job_gets_every_default():
    """Size, guidance, steps and sampler are left to the model (None), decided once it is known."""
    [job] = parse_queue('[[jobs]]\nprompt = "a lighthouse at dusk"\n', "toml")
    assert job == Job(index=1, prompt="a lighthouse at dusk", negative_prompt="", width=None, height=None,
                      seed=None, cfg=None, steps=None, count=1, name=None, sampler=None)


def test_known_fields_are_the_job_fields():
    assert set(KNOWN_FIELDS) == {f.name for f in dataclasses.fields(Job)} - {"index"}


def test_defaults_apply_to_every_job_and_a_jobs_own_value_wins():
    jobs = parse_queue("""
        [defaults]
        steps = 30
        cfg = 7
        negative_prompt = "blurry"

        [[jobs]]
        prompt = "a"

        [[jobs]]
        prompt = "b"
        steps = 10
        negative_prompt = ""
    """, "toml")
    assert [(j.index, j.steps, j.cfg, j.negative_prompt) for j in jobs] == [(1, 30, 7.0, "blurry"), (2, 10, 7.0, "")]
    assert isinstance(jobs[0].cfg, float)


def test_the_prompt_itself_may_come_from_the_defaults():
    jobs = parse_queue('[defaults]\nprompt = "a cat"\n[[jobs]]\nseed = 1\n[[jobs]]\nseed = 2\n', "toml")
    assert [(j.prompt, j.seed) for j in jobs] == [("a cat", 1), ("a cat", 2)]


def test_json_list_form():
    jobs = parse_queue('[{"prompt": "a", "width": 512, "height": 768}, {"prompt": "b", "count": 4}]', "json")
    assert [(j.index, j.prompt, j.width, j.height, j.count) for j in jobs] == [(1, "a", 512, 768, 1),
                                                                                (2, "b", None, None, 4)]


def test_json_object_form_with_defaults():
    jobs = parse_queue('{"defaults": {"seed": 7}, "jobs": [{"prompt": "a"}, {"prompt": "b", "seed": 1}]}', "json")
    assert [j.seed for j in jobs] == [7, 1]


def test_jsonl_defaults_line_applies_to_the_whole_file_and_indices_count_job_lines_only():
    text = '{"prompt": "a"}\n\n{"defaults": {"steps": 12}}\n{"prompt": "b", "steps": 3}\n'
    jobs = parse_queue(text, "jsonl")
    assert [(j.index, j.prompt, j.steps) for j in jobs] == [(1, "a", 12), (2, "b", 3)]


def test_jsonl_job_index_skips_the_defaults_line():
    problem = only_problem('{"defaults": {"cfg": 2}}\n{"prompt": "a"}\n{"prompt": ""}\n', "jsonl")
    assert (problem.job_index, problem.field) == (2, "prompt")


def test_a_second_jsonl_defaults_line_is_a_problem_reported_with_the_others():
    text = '{"defaults": {"cfg": 2}}\n{"prompt": "a"}\n{"defaults": {"cfg": 3}}\n{"prompt": 5}\n'
    first, second = problems_of(text, "jsonl")
    assert first.field == "defaults" and "line 3" in first.message and "line 1" in first.hint
    assert (second.job_index, second.field) == (2, "prompt")


def test_the_seed_article_queue():
    jobs = load_queue(EXAMPLE)
    assert len(jobs) == 5
    oppenheimer, pirate, *supercars = jobs
    assert oppenheimer.prompt.startswith("Oppenheimer sits on the beach")
    assert (oppenheimer.cfg, oppenheimer.steps, oppenheimer.seed, oppenheimer.width) == (None, None, None, None)
    assert pirate == Job(index=2, prompt="pirate ship trapped in a cosmic malestrom nebula", width=1024,
                         height=1024, seed=1152753, cfg=5.0, steps=30, count=1, name="pirate-ship")
    assert [(j.prompt, j.cfg, j.seed, j.name) for j in supercars] == [
        ("supercar", 4.0, None, f"supercar-{k}") for k in (1, 2, 3)]


def test_jobs_from_options():
    [job] = jobs_from_options("a lighthouse", width=512, height=512, seed=7, cfg=3, steps=12, count=2, name="lh")
    assert job == Job(index=1, prompt="a lighthouse", width=512, height=512, seed=7, cfg=3.0, steps=12, count=2,
                      name="lh")


def test_jobs_from_options_none_means_not_given():
    [job] = jobs_from_options("a lighthouse", negative_prompt=None, cfg=None, steps=None)
    assert (job.negative_prompt, job.cfg, job.steps, job.sampler) == ("", None, None, None)


def test_jobs_from_options_is_validated_like_a_file():
    with pytest.raises(QueueError) as caught:
        jobs_from_options("   ", width=1000 + 4, count=0)
    assert caught.value.source == "command line"
    assert [(p.job_index, p.field) for p in caught.value.problems] == [(1, "prompt"), (1, "width"), (1, "count")]


def test_validate_document_takes_parsed_data():
    [job] = validate_document({"jobs": [{"prompt": "x", "seed": 3}]}, "mine")
    assert job.seed == 3
    with pytest.raises(QueueError) as caught:
        validate_document({"jobs": [{"prompt": 3}]}, "mine")
    assert caught.value.source == "mine"


# ---- every problem at once --------------------------------------------------------------------------------

def test_all_problems_come_at_once():
    problems = problems_of("""
        [[jobs]]
        prompt = ""

        [[jobs]]
        prompt = "b"
        width = 1000.5
        steps = 0

        [[jobs]]
        prompt = "c"
        sede = 4
    """)
    assert [(p.job_index, p.field) for p in problems] == [(1, "prompt"), (2, "width"), (2, "steps"), (3, "sede")]


def test_the_error_message_lists_every_problem_with_its_place():
    with pytest.raises(QueueError) as caught:
        parse_queue('[{"prompt": "a", "name": "ship", "width": 100}, {"prompt": ""}]', "json", "q.json")
    text = str(caught.value)
    assert text.startswith("q.json: 2 problems in the queue:")
    assert "job 1 ('ship'), field 'width': must be a multiple of 8, not 100" in text
    assert "job 2, field 'prompt': must not be empty" in text


def test_a_problem_names_the_job_by_name_only_when_the_name_is_valid():
    problems = problems_of('[{"prompt": "", "name": "ship"}, {"prompt": "", "name": "a/b"}]', "json")
    assert [(p.job_index, p.job_name) for p in problems if p.field == "prompt"] == [(1, "ship"), (2, None)]


# ---- syntax errors ------------------------------------------------------------------------------------------

def test_toml_syntax_error_names_line_and_column():
    problem = only_problem('[[jobs]]\nprompt = "a"\n\nsteps = = 3\n')
    assert problem.message.startswith("syntax error at line 4, column 9:")
    assert problem.job_index is None


def test_toml_syntax_error_at_the_end_of_the_file_names_the_last_line():
    problem = only_problem('[[jobs]]\nprompt = "a"\nseed =')
    assert "syntax error at line 3" in problem.message


def test_json_syntax_error_names_line_and_column():
    problem = only_problem('[\n  {"prompt": "a"},\n  {"prompt" "b"}\n]', "json")
    assert problem.message.startswith("syntax error at line 3, column 13:")


def test_json_keys_given_twice_are_a_problem():
    problem = only_problem('[{"prompt": "a", "seed": 1, "seed": 2}]', "json")
    assert "'seed' appears twice" in problem.message


def test_jsonl_syntax_errors_name_each_bad_line():
    text = '{"prompt": "a"}\n\n{"prompt": "b",}\n{"prompt": "c"}\n{prompt: "d"}\n'
    problems = problems_of(text, "jsonl")
    assert [p.message.split(":")[0] for p in problems] == ["syntax error at line 3, column 16",
                                                         "syntax error at line 5, column 2"]


def test_a_number_too_long_to_read_is_a_problem_not_a_crash():
    problem = only_problem('[{"prompt": "a", "seed": %s}]' % ("9" * 5000), "json")
    assert "cannot read" in problem.message


# ---- files ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, text", [
    (".toml", '[[jobs]]\nprompt = "a"\n'),
    (".json", '[{"prompt": "a"}]'),
    (".jsonl", '{"prompt": "a"}\n'),
    (".ndjson", '{"prompt": "a"}\n'),
    (".TOML", '[[jobs]]\nprompt = "a"\n'),
])
def test_the_suffix_picks_the_format(tmp_path, suffix, text):
    path = tmp_path / f"queue{suffix}"
    path.write_text(text, encoding="utf-8")
    assert [j.prompt for j in load_queue(path)] == ["a"]
    assert [j.prompt for j in load_queue(str(path))] == ["a"]


def test_a_utf8_byte_order_mark_is_fine(tmp_path):
    path = tmp_path / "queue.json"
    path.write_bytes('\ufeff[{"prompt": "café"}]'.encode("utf-8"))
    assert load_queue(path)[0].prompt == "café"


@pytest.mark.parametrize(("suffix", "text"), [
    (".toml", '[defaults]\r\nsteps = 2\r\n\r\n[[jobs]]\r\n\tprompt = """\r\n🚀 سفينة 海上的船 e\u0301le\u0300ve\r\nat sea"""\r\n'),
    (".json", '{"defaults": {"steps": 2},\r\n "jobs": [{\t"prompt": "🚀 سفينة 海上的船 e\u0301le\u0300ve\\nat sea"}]}\r\n'),
    (".jsonl", '{"defaults": {"steps": 2}}\r\n\r\n{"prompt": "🚀 سفينة 海上的船 e\u0301le\u0300ve\\nat sea"}\r\n'),
])
def test_windows_line_ends_a_bom_tabs_and_any_script_are_read_as_written(tmp_path, suffix, text):
    """A queue saved by a Windows editor (BOM, CRLF), indented with tabs, in any script: the prompt is the text as
    written, emoji, right-to-left, CJK and combining marks unchanged (not normalised), a line end in it one \\n."""
    path = tmp_path / f"queue{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (job,) = load_queue(path)
    assert job.prompt == "🚀 سفينة 海上的船 e\u0301le\u0300ve\nat sea" and job.steps == 2


def test_a_utf16_file_is_named_as_such(tmp_path):
    path = tmp_path / "queue.jsonl"
    path.write_text('{"prompt": "a cat"}\n', encoding="utf-16")  # as Windows PowerShell's `>` saves it
    with pytest.raises(QueueError) as caught:
        load_queue(path)
    assert f"{path} is UTF-16 text" in str(caught.value) and "save the file as UTF-8" in str(caught.value)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "queue.yaml"
    path.write_text("jobs: []\n")
    with pytest.raises(QueueError) as caught:
        load_queue(path)
    [problem] = caught.value.problems
    assert "'.yaml'" in problem.message
    assert all(s in problem.hint for s in (".toml", ".json", ".jsonl", ".ndjson"))
    assert caught.value.source == str(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(QueueError) as caught:
        load_queue(path)
    [problem] = caught.value.problems
    assert str(path) in problem.message and "No such file" in problem.message


def test_a_directory_is_not_a_queue(tmp_path):
    path = tmp_path / "queue.toml"
    path.mkdir()
    with pytest.raises(QueueError) as caught:
        load_queue(path)
    [problem] = caught.value.problems
    assert str(path) in problem.message and "directory" in problem.message.lower()


def test_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "queue.toml"
    path.write_bytes(b'[[jobs]]\nprompt = "caf\xe9"\n')
    with pytest.raises(QueueError) as caught:
        load_queue(path)
    [problem] = caught.value.problems
    assert "not UTF-8" in problem.message and "line 2" in problem.message and "UTF-8" in problem.hint


def test_an_unknown_format_name():
    assert "'jsonl'" in only_problem("", "yaml").hint


# ---- the document's shape -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, text", [("toml", ""), ("toml", "[defaults]\nsteps = 3\n"), ("json", "[]"),
                                       ("json", '{"jobs": []}'), ("jsonl", "\n\n"), ("jsonl", '{"defaults": {}}')])
def test_an_empty_queue_shows_the_minimal_form_for_its_format(fmt, text):
    problem = only_problem(text, fmt)
    assert problem.message == "the queue has no jobs"
    example = problem.hint.split(" is ", 1)[1]
    if fmt == "toml":
        assert "[[jobs]]" in example and "prompt = " in example
    else:  # the example is itself a valid queue
        assert parse_queue(example.removeprefix("one line "), fmt)[0].prompt == "a lighthouse at dusk"


def test_unknown_top_level_key_with_did_you_mean():
    problems = problems_of('[[job]]\nprompt = "a"\n')
    assert (problems[0].field, problems[0].hint) == ("job", "did you mean 'jobs'?")
    assert problems[1].message == "the queue has no jobs"


def test_jobs_must_be_a_list():
    problem = only_problem('[jobs]\nprompt = "a"\n')
    assert problem.field == "jobs" and "[[jobs]]" in problem.hint


def test_a_job_must_be_a_table():
    problem = job_problem("a lighthouse", index=2)
    assert "must be an object" in problem.message and "the text 'a lighthouse'" in problem.message


def test_the_json_document_must_be_a_list_or_an_object():
    assert "must be a list of jobs" in only_problem('"a lighthouse"', "json").message


def test_defaults_must_be_a_table():
    problem = only_problem('{"defaults": [1], "jobs": [{"prompt": "a"}]}', "json")
    assert (problem.job_index, problem.field) == (None, "defaults")


# ---- defaults ---------------------------------------------------------------------------------------------------

# (document, field at fault, where the words are, the words, whether they are all of it)
DEFAULTS_PROBLEMS = {
    "a bad width": ('[defaults]\nwidth = 1001\n[[jobs]]\nprompt = "a"\n[[jobs]]\nprompt = "b"\n',
                    "defaults.width", "hint", "1000 and 1008", False),
    # a bad default prompt does not make every job miss its prompt
    "a bad prompt": ('[defaults]\nprompt = ""\n[[jobs]]\nseed = 1\n[[jobs]]\nseed = 2\n', "defaults.prompt", None,
                     None, False),
    "a name": ('[defaults]\nname = "ship"\n[[jobs]]\nprompt = "a"\n', "defaults.name", "message", "same name", False),
    "an unknown key": ('[defaults]\nstep = 3\n[[jobs]]\nprompt = "a"\n', "defaults.step", "hint",
                       "did you mean 'steps'?", True),
}


@pytest.mark.parametrize("case", DEFAULTS_PROBLEMS)
def test_a_problem_in_the_defaults_is_reported_once_on_the_defaults(case):
    document, field, where, words, whole = DEFAULTS_PROBLEMS[case]
    problem = only_problem(document)
    assert (problem.job_index, problem.field) == (None, field)
    if where:
        text = getattr(problem, where)
        assert text == words if whole else words in text


# ---- fields -------------------------------------------------------------------------------------------------

def test_prompt_missing():
    problem = job_problem({"seed": 1}, index=2)
    assert (problem.field, problem.message) == ("prompt", "is missing")


@pytest.mark.parametrize("prompt, says", [("", "must not be empty"), ("  \n\t", "must not be empty"),
                                          (42, "must be text, not 42"), (None, "must be text, not null"),
                                          (["a"], "must be text, not a list"), ("a\0b", "NUL")])
def test_prompt_must_be_nonempty_text(prompt, says):
    problem = job_problem({"prompt": prompt})
    assert problem.field == "prompt" and says in problem.message


def test_negative_prompt():
    assert parse_queue('[{"prompt": "a", "negative_prompt": ""}]', "json")[0].negative_prompt == ""
    assert job_problem({"prompt": "a", "negative_prompt": False}).message == "must be text, not false"
    assert "NUL" in job_problem({"prompt": "a", "negative_prompt": "x\u0000"}).message


@pytest.mark.parametrize("field", ["width", "height"])
@pytest.mark.parametrize("value, says, hint", [
    (1020, "must be a multiple of 8, not 1020", "the nearest multiples of 8 are 1016 and 1024"),
    (4, "must be a multiple of 8, not 4", "the nearest multiple of 8 is 8"),
    (0, "must be 1 or more, not 0", None),
    (-8, "must be 1 or more, not -8", None),
    (MAX_SIDE + 8, f"must be at most {MAX_SIDE}, not {MAX_SIDE + 8}", None),
    (1024.0, "must be a whole number, not 1024.0", "write 1024 without the decimal point"),
    (1024.5, "must be a whole number, not 1024.5", None),
    ("1024", "must be a whole number, not the text '1024'", "write 1024 without quotes"),
    (True, "must be a whole number, not true", None),
])
def test_width_and_height(field, value, says, hint):
    problem = job_problem({"prompt": "a", field: value})
    assert (problem.field, problem.message, problem.hint) == (field, says, hint)


def test_width_and_height_limits_are_fine():
    [job] = parse_queue(f'[{{"prompt": "a", "width": 8, "height": {MAX_SIDE}}}]', "json")
    assert (job.width, job.height) == (8, MAX_SIDE)


@pytest.mark.parametrize("field, value, says", [
    ("steps", 0, "must be 1 or more"), ("steps", -3, "must be 1 or more"), ("steps", 1001, "at most 1000"),
    ("steps", 2.5, "whole number"), ("steps", False, "whole number"),
    ("count", 0, "must be 1 or more"), ("count", MAX_COUNT + 1, f"at most {MAX_COUNT}"),
    ("count", "3", "whole number"), ("count", True, "whole number"),
])
def test_steps_and_count_are_positive_whole_numbers(field, value, says):
    problem = job_problem({"prompt": "a", field: value})
    assert problem.field == field and says in problem.message


def test_count_limit_is_fine():
    assert parse_queue(f'[{{"prompt": "a", "count": {MAX_COUNT}}}]', "json")[0].count == MAX_COUNT


@pytest.mark.parametrize("text, says", [("-1", "must be 0 or more"), ("NaN", "finite"), ("Infinity", "finite"),
                                        ("-Infinity", "finite"), ("true", "must be a number, not true"),
                                        ('"4.5"', "must be a number"), ("1e400", "finite"),
                                        ("1" + "0" * 400, "finite")])
def test_cfg_is_a_finite_number_not_below_zero(text, says):
    problem = only_problem('[{"prompt": "a", "cfg": %s}]' % text, "json")
    assert (problem.job_index, problem.field) == (1, "cfg") and says in problem.message
    assert problem.hint


@pytest.mark.parametrize("value", [0, 1, 7.5])
def test_cfg_accepts_ints_and_floats(value):
    assert parse_queue(json.dumps([{"prompt": "a", "cfg": value}]), "json")[0].cfg == float(value)


@pytest.mark.parametrize("value, says", [(-1, "must be 0 or more"), (MAX_SEED + 1, "must be at most"),
                                         (1.0, "whole number"), (True, "whole number"), ("7", "whole number")])
def test_seed_is_a_64_bit_unsigned_integer(value, says):
    problem = job_problem({"prompt": "a", "seed": value})
    assert problem.field == "seed" and says in problem.message


def test_seed_limits_are_fine():
    jobs = parse_queue(json.dumps([{"prompt": "a", "seed": 0}, {"prompt": "b", "seed": MAX_SEED}]), "json")
    assert [j.seed for j in jobs] == [0, MAX_SEED]


def test_the_seeds_of_every_copy_must_fit_in_64_bits():
    assert parse_queue(json.dumps([{"prompt": "a", "seed": MAX_SEED - 2, "count": 3}]), "json")[0].count == 3
    problem = job_problem({"prompt": "a", "seed": MAX_SEED - 1, "count": 3})
    assert problem.field == "seed" and "count = 3" in problem.message
    assert problem.hint == f"use a seed of at most {MAX_SEED - 2}"


def test_a_default_seed_and_a_jobs_count_are_checked_together_on_the_job():
    problem = only_problem(json.dumps({"defaults": {"seed": MAX_SEED}, "jobs": [{"prompt": "a", "count": 2}]}), "json")
    assert (problem.job_index, problem.field) == (1, "seed")


def test_a_default_seed_and_default_count_are_checked_on_the_defaults():
    doc = {"defaults": {"seed": MAX_SEED, "count": 2}, "jobs": [{"prompt": "a"}, {"prompt": "b"}]}
    problem = only_problem(json.dumps(doc), "json")
    assert (problem.job_index, problem.field) == (None, "defaults.seed")


@pytest.mark.parametrize("key, hint", [("negative", "did you mean 'negative_prompt'?"),
                                       ("Width", "did you mean 'width'?"), ("guidance", None), ("xyzzy", None)])
def test_unknown_keys_with_a_did_you_mean_hint(key, hint):
    problem = job_problem({"prompt": "a", key: 1})
    assert (problem.field, problem.message, problem.hint) == (key, f"unknown field {key!r}", hint)


def test_each_unknown_key_is_its_own_problem():
    problems = problems_of('[{"prompt": "a", "sed": 1, "stesp": 2}]', "json")
    assert [(p.field, p.hint) for p in problems] == [("sed", "did you mean 'seed'?"),
                                                     ("stesp", "did you mean 'steps'?")]


def test_defaults_inside_a_jsonl_job_line():
    problem = only_problem('{"defaults": {"cfg": 2}, "prompt": "a"}\n', "jsonl")
    assert problem.field == "defaults" and "line of their own" in problem.hint


@pytest.mark.parametrize("name", ["pirate-ship", "v1.2_final", "_x", "A", "x" * 100, "a..b"])
def test_good_names(name):
    assert parse_queue(json.dumps([{"prompt": "a", "name": name}]), "json")[0].name == name


@pytest.mark.parametrize("name, safe", [
    ("a/b", "a-b"), ("../../etc/passwd", "etc-passwd"), ("..", "image"), (".hidden", "hidden"), ("-x", "x"),
    ("a\\b", "a-b"), ("C:boot", "C-boot"), ("a\0b", "a-b"), ("pirate ship", "pirate-ship"), ("café", "cafe"),
    ("x" * 101, "x" * 100),
])
def test_bad_names_get_a_safe_version_as_hint(name, safe):
    problem = job_problem({"prompt": "a", "name": name})
    assert problem.field == "name" and problem.job_name is None
    assert problem.hint == f"for example {safe!r}"


def test_an_empty_or_non_text_name():
    assert job_problem({"prompt": "a", "name": ""}).message == "must not be empty"
    assert job_problem({"prompt": "a", "name": 7}).hint == 'write it in quotes: "7"'


def test_names_are_unique_ignoring_case():
    problems = problems_of('[{"prompt": "a", "name": "Ship"}, {"prompt": "b"}, {"prompt": "c", "name": "ship"}]',
                           "json")
    [problem] = problems
    assert (problem.job_index, problem.job_name, problem.field) == (3, "ship", "name")
    assert "already used by job 1 ('Ship')" in problem.message
