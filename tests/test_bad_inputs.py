"""The bad-input corpus (`scripts/bad_inputs.py`): no hang, deep traceback, raw Python error or silent wrong output.

The corpus runs in a subprocess, as a user runs the script; `--fast` leaves out the slowest cases but keeps those that
used to hang (a line break in a METEOR text, a 32,000-phrase sentence for the labeler, 20,000-word texts), bounded by
`--timeout`. The classifier of outcomes is checked on its own first, so that a pass cannot come from a classifier that
calls everything a clear error.
"""

import importlib.util
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest


REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPTS = REPOSITORY / "scripts"
CASE_TIMEOUT_S = 60
BAD = ("hang", "deep traceback", "raw Python error", "silent wrong output")
"""The four buckets the corpus must leave empty."""


def load_script(name: str):
    """A script module loaded by path; `bad_inputs` imports its siblings `benchmark_utils` and `bad_input_corpus`, so
    those go first."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bad_inputs():
    load_script("benchmark_utils")
    load_script("bad_input_corpus")
    return load_script("bad_inputs")


@pytest.fixture(scope="module")
def corpus(bad_inputs):
    return sys.modules["bad_input_corpus"]


def raised(function) -> BaseException:
    try:
        function()
    except Exception as error:
        return error
    raise AssertionError("nothing was raised")


def case(bad_inputs, expected: str, **options):
    return bad_inputs.Case("labeler", "probe", expected, run=lambda workspace: None, **options)


def test_an_explicit_raise_in_project_code_is_a_clear_error(bad_inputs):
    from labeler_cdan import to_binary

    error = raised(lambda: to_binary([1], uncertain_as=2))
    assert bad_inputs.classify_error(case(bad_inputs, "error"), error)[0] == bad_inputs.CLEAR_ERROR


def test_a_clear_error_must_name_the_input_the_case_names(bad_inputs):
    from labeler_cdan import to_binary

    error = raised(lambda: to_binary([1], uncertain_as=2))
    assert bad_inputs.classify_error(case(bad_inputs, "error", mentions="uncertain_as"), error)[0] == (
        bad_inputs.CLEAR_ERROR
    )
    assert bad_inputs.classify_error(case(bad_inputs, "error", mentions="states"), error)[0] == bad_inputs.RAW


def test_an_error_raised_inside_a_third_party_library_is_a_deep_traceback(bad_inputs):
    import PIL.Image

    error = raised(lambda: PIL.Image.open(REPOSITORY / "no_such_image.png"))
    bucket, message = bad_inputs.classify_error(case(bad_inputs, "error"), error)
    assert bucket == bad_inputs.DEEP, message


def test_transformers_check_of_a_generate_argument_is_clear_only_when_it_names_the_argument(bad_inputs):
    from transformers import GenerationConfig

    error = raised(lambda: GenerationConfig(num_beams=2, num_return_sequences=5).validate(strict=True))
    named = case(bad_inputs, "error", mentions="num_return_sequences")
    unnamed = case(bad_inputs, "error", mentions="max_length")
    assert bad_inputs.classify_error(named, error)[0] == bad_inputs.CLEAR_ERROR
    assert bad_inputs.classify_error(unnamed, error)[0] == bad_inputs.DEEP


def test_python_errors_in_project_code_are_raw(bad_inputs):
    # Code compiled under a project file's name runs as if it were that file (its line 1 is no `raise`).
    project_file = str(REPOSITORY / "labeler_cdan.py")
    key_error = raised(lambda: exec(compile("{}['missing']", project_file, "exec")))
    assert bad_inputs.classify_error(case(bad_inputs, "error"), key_error)[0] == bad_inputs.RAW
    internal_type_error = raised(lambda: exec(compile("len(None)", project_file, "exec")))
    assert bad_inputs.classify_error(case(bad_inputs, "error"), internal_type_error)[0] == bad_inputs.RAW


def test_a_result_without_the_expected_error_or_warning_is_silent(bad_inputs):
    assert bad_inputs.classify_result(case(bad_inputs, "error"), [1], warned=[])[0] == bad_inputs.SILENT
    assert bad_inputs.classify_result(case(bad_inputs, "warning"), [1], warned=[])[0] == bad_inputs.SILENT
    assert bad_inputs.classify_result(case(bad_inputs, "warning"), [1], warned=["odd"])[0] == bad_inputs.ACCEPTED
    failing = case(bad_inputs, "accept", check=lambda result: "wrong value")
    assert bad_inputs.classify_result(failing, [1], warned=["odd"])[0] == bad_inputs.SILENT


def test_warnings_count_when_project_code_gives_them(bad_inputs, corpus, tmp_path):
    def warn_from_project(workspace):
        from image_processing_cdan import CdanImageProcessor

        # One view for a two-view processor: repeated, with a (`warning_once`) warning.
        return CdanImageProcessor(image_size=32, num_views=2)(str(corpus.FRONTAL_PNG))

    def warn_from_elsewhere(workspace):
        logging.getLogger("some_library").warning("unrelated")
        warnings.warn("unrelated", UserWarning, stacklevel=1)
        return [1]

    workspace = bad_inputs.Workspace(tmp_path)
    from_project = bad_inputs.Case("pipeline", "probe", "warning", run=warn_from_project)
    for _ in range(2):  # the second time too: `warning_once` is reset between cases
        assert bad_inputs.run_case(from_project, workspace)["observed"] == bad_inputs.ACCEPTED
    from_elsewhere = bad_inputs.Case("pipeline", "probe", "warning", run=warn_from_elsewhere)
    assert bad_inputs.run_case(from_elsewhere, workspace)["observed"] == bad_inputs.SILENT


def test_the_corpus_covers_every_area_and_expectation(corpus):
    cases = corpus.CASES
    assert len(cases) >= 100
    assert {case.area for case in cases} == set(corpus.AREAS)
    assert {case.expected for case in cases} == set(corpus.EXPECTATIONS)
    assert len({case.key for case in cases}) == len(cases)


def test_no_bad_input_hangs_crashes_deep_or_passes_silently(tmp_path):
    rows_file = tmp_path / "rows.json"
    python_path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": python_path}
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "bad_inputs.py"),
            "--fast",
            "--timeout",
            str(CASE_TIMEOUT_S),
            "--json",
            str(rows_file),
        ],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert rows_file.is_file(), result.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    bad = [f"{row['area']}/{row['name']}: {row['observed']}: {row['message']}" for row in rows if row["observed"] in BAD]
    assert not bad, "\n".join(bad)
    assert result.returncode == 0, result.stderr[-3000:]
    former_hangs = {
        "evaluation/NLG newline in a prediction (METEOR)",
        "labeler/32,000 repeats without a full stop",
        "evaluation/NLG 20,000-word texts",
    }
    assert former_hangs <= {f"{row['area']}/{row['name']}" for row in rows}
    assert "| hang | 0 |" in result.stdout
