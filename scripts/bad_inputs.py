"""Feed the pipeline, the builders, the labeler and the evaluation a corpus of bad or unusual inputs; count outcomes.

Every case is generated here (files are written to a temporary folder) and declares the outcome the project
promises for it: `error` (a clear exception from project code), `warning` (a result, with a warning), `skip` (a
builder drops the study and lists it in `skipped.json`) or `accept` (a documented result, checked where a check is
meaningful). What actually happened is put in one of seven buckets:

- clear error: a `TypeError`, `ValueError` (`CdanDataError` included) or `OSError` raised by a `raise` statement of
  the project's own files (an `OSError` may come from a builtin such as `open` called there);
- documented skip: the builder skipped the study and recorded it, as the case expects;
- accepted as documented: a result that passes the case's check, with a warning where the case expects one;
- hang: no answer within `--timeout` seconds (or the process did not exit after answering);
- deep traceback: the exception was raised inside a third-party library (its last frame is outside the project),
  except transformers' own validation of `generate()` arguments when its message names the argument the case is
  about (then it is a clear error);
- raw Python error: any other exception (`KeyError`, `IndexError`, a `TypeError` from Python internals, ...), or a
  clear error whose message does not name the input it is about;
- silent wrong output: a result without the error or warning the case expects, or one that fails its check.

Cases run in one worker process per area, started with "spawn" in its own process group; a case that hangs is
killed together with its children (METEOR's Java process) and the worker restarted. Cases marked `isolated` run in a
fresh interpreter that must also exit in time (pycocoevalcap's METEOR can hang at interpreter exit).

Usage:

```bash
python scripts/bad_inputs.py                    # all areas, a Markdown table of the totals
python scripts/bad_inputs.py --details          # plus one line per case
python scripts/bad_inputs.py --areas labeler evaluation --timeout 30
python scripts/bad_inputs.py --fast             # the subset tests/test_bad_inputs.py runs
```

Exits with status 1 when any case lands in one of the four bad buckets.
"""

import argparse
import functools
import importlib.util
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from bad_input_corpus import AREAS, CASES, Case, Workspace, prepare
from benchmark_utils import markdown_table


CLEAR_ERROR, SKIP, ACCEPTED, HANG, DEEP, RAW, SILENT = (
    "clear error",
    "documented skip",
    "accepted as documented",
    "hang",
    "deep traceback",
    "raw Python error",
    "silent wrong output",
)
BUCKETS = (CLEAR_ERROR, SKIP, ACCEPTED, HANG, DEEP, RAW, SILENT)
BAD_BUCKETS = (HANG, DEEP, RAW, SILENT)
MATCHING = {"error": CLEAR_ERROR, "warning": ACCEPTED, "skip": SKIP, "accept": ACCEPTED}
"""The bucket each expectation is met by."""
CLEAR_ERROR_TYPES = (TypeError, ValueError, OSError)
"""Exception types that make a clear error when raised by project code (`CdanDataError` is a `ValueError`)."""

PROJECT_MODULES = tuple(
    tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "py-modules"
    ]
)
"""The project's top-level modules, as `pyproject.toml` installs them (`cdan`, `priorrg`, `d2r`, shared layers)."""
PROJECT_PACKAGES = ("data_cdan",)
RESULT_MARKER = "BAD_INPUTS_RESULT "
"""Prefix of the line on which an isolated case prints its outcome."""
READY_TIMEOUT_S = 600
"""How long a worker may take to import its area's modules and build its fixtures (a tiny checkpoint)."""


# --------------------------------------------------------------------------------------------------------------------
# Running one case and classifying what happened
# --------------------------------------------------------------------------------------------------------------------


@functools.cache
def project_files() -> frozenset[Path]:
    """The project's own source files (the modules and the `data_cdan` package), wherever they are installed."""
    files = set()
    for name in PROJECT_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            files.add(Path(spec.origin).resolve())
    for name in PROJECT_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            files.update(path.resolve() for path in Path(spec.origin).parent.rglob("*.py"))
    return frozenset(files)


class WarningCollector(logging.Handler):
    """Collects the warnings project code logs or emits with `warnings.warn` while a case runs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Project modules log under their module name; `warning_once` records carry transformers' file as pathname.
        if record.name.split(".")[0] in PROJECT_MODULES + PROJECT_PACKAGES:
            self.messages.append(record.getMessage())

    def add_warnings(self, caught: list[warnings.WarningMessage]) -> None:
        for warning in caught:
            # With `stacklevel`, the file is the caller's: project code, or this script calling a project function.
            source = Path(warning.filename).resolve()
            if source in project_files() or source == Path(__file__).resolve():
                if not issubclass(warning.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
                    self.messages.append(str(warning.message))


def short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_generation_argument_check(frame: traceback.FrameSummary) -> bool:
    """Whether a frame is transformers' validation of `generate()` arguments (`GenerationConfig.validate`, the
    `_validate_*` methods of `GenerationMixin`): its errors name the argument, as the project's own checks do."""
    path = Path(frame.filename).as_posix()
    return "/transformers/generation/" in path and (frame.name == "validate" or frame.name.startswith("_validate"))


def classify_error(case: Case, error: BaseException) -> tuple[str, str]:
    """The bucket of an exception: where it was raised, its type and, for a clear error, its message."""
    frames = traceback.extract_tb(error.__traceback__)
    message = f"{type(error).__name__}: {short(error)}"
    if not frames:
        return RAW, message
    last = frames[-1]
    source = Path(last.filename).resolve()
    where = f" (raised at {source.name}:{last.lineno})"
    if source == Path(__file__).resolve():
        return RAW, "corpus script error: " + message + where
    if source not in project_files():
        if is_generation_argument_check(last) and isinstance(error, ValueError) and case.mentions:
            if case.mentions.lower() in str(error).lower():  # transformers' own check names the argument
                return CLEAR_ERROR, message + where
        return DEEP, message + where
    raised_here = (last.line or "").lstrip().startswith("raise")
    if not isinstance(error, CLEAR_ERROR_TYPES) or not (raised_here or isinstance(error, OSError)):
        return RAW, message + where
    if case.mentions and case.mentions.lower() not in str(error).lower():
        return RAW, f"unclear message (does not name {case.mentions!r}): {message}"
    return CLEAR_ERROR, message


def classify_result(case: Case, result: Any, warned: list[str]) -> tuple[str, str]:
    """The bucket of a returned value, given the warnings project code gave while computing it."""
    try:
        problem = case.check(result) if case.check is not None else None
    except Exception as error:  # a value of an unexpected shape
        problem = f"the returned value fails its check ({type(error).__name__}: {short(error, 80)}): {result!r:.120}"
    warning_text = f" (warning: {short(warned[0], 120)})" if warned else ""
    if problem is not None:
        return SILENT, problem + warning_text
    if case.expected == "skip":
        return SKIP, "skipped and recorded in skipped.json"
    if case.expected in ("error", "warning") and not warned:
        return SILENT, f"returned {short(repr(result), 120)} without the expected {case.expected}"
    return ACCEPTED, "returned" + warning_text


def run_case(case: Case, workspace: Workspace) -> dict[str, str]:
    """Run one case in this process and classify it."""
    collector = WarningCollector()
    loggers = [logging.getLogger(), logging.getLogger("transformers"), logging.getLogger("datasets")]
    for logger in loggers:
        logger.addHandler(collector)
    warning_once = getattr(logging.Logger, "warning_once", None)
    if warning_once is not None and hasattr(warning_once, "cache_clear"):
        warning_once.cache_clear()  # transformers' `warning_once` would otherwise stay silent after the first case
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = case.run(workspace)
            except Exception as error:
                bucket, message = classify_error(case, error)
            else:
                collector.add_warnings(caught)
                bucket, message = classify_result(case, result, collector.messages)
    finally:
        for logger in loggers:
            logger.removeHandler(collector)
    return {"observed": bucket, "message": message}


def worker_main(area: str, root: str, connection) -> None:
    """Answer the parent's case names with outcomes, one at a time, in this area's fixtures."""
    os.setpgrp()  # the parent kills this group on a hang: the worker and what it started (METEOR's Java)
    log = open(Path(root) / f"{area}-worker.log", "ab", buffering=0)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    workspace = Workspace(Path(root))
    try:
        prepare(area, workspace)
    except Exception:
        connection.send("failed: " + traceback.format_exc(limit=-3))
        return
    connection.send("ready")
    cases = {case.name: case for case in CASES if case.area == area}
    while True:
        name = connection.recv()
        if name is None:
            break
        try:
            outcome = run_case(cases[name], workspace)
        except Exception as error:  # in the classification itself: still answer, so the run goes on
            outcome = {"observed": RAW, "message": f"corpus script error: {type(error).__name__}: {short(error)}"}
        connection.send(outcome)


def isolated_main(key: str, root: str) -> None:
    """`--run-case`: run one case in this fresh interpreter and print its outcome on a marked line."""
    case = next(case for case in CASES if case.key == key)
    workspace = Workspace(Path(root))
    prepare(case.area, workspace)
    outcome = run_case(case, workspace)
    sys.stdout.write(RESULT_MARKER + json.dumps(outcome) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------------------------------
# The driver: workers per area, timeouts, the report
# --------------------------------------------------------------------------------------------------------------------


def kill_group(process_id: int) -> None:
    try:
        os.killpg(process_id, signal.SIGKILL)
    except ProcessLookupError:
        pass


class AreaWorker:
    """A spawned worker for one area, restarted after a hang or a crash."""

    def __init__(self, area: str, root: Path):
        self.area = area
        self.root = root
        self.process: multiprocessing.Process | None = None
        self.connection = None
        self.failure: str | None = None

    def start(self) -> str | None:
        """Start the worker and wait until its fixtures are built; returns why it failed, or None."""
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        self.process = context.Process(target=worker_main, args=(self.area, str(self.root), child_end), daemon=True)
        self.process.start()
        child_end.close()
        self.connection = parent_end
        answer = f"no answer within {READY_TIMEOUT_S} s"
        try:
            if parent_end.poll(READY_TIMEOUT_S):
                answer = parent_end.recv()
        except EOFError:
            answer = "the process exited"
        if answer == "ready":
            return None
        self.stop()
        return f"the {self.area} worker could not import its modules or build its fixtures: {short(answer, 600)}"

    def run(self, case: Case, timeout: float) -> dict[str, str]:
        if self.failure is not None:  # a worker that could not start is not retried for every case
            return {"observed": RAW, "message": self.failure}
        if self.process is None:
            self.failure = self.start()
            if self.failure is not None:
                return {"observed": RAW, "message": self.failure}
        self.connection.send(case.name)
        try:
            if self.connection.poll(timeout):
                return self.connection.recv()
        except EOFError:
            exit_code = self.process.exitcode
            self.stop()
            return {"observed": DEEP, "message": f"the worker process crashed (exit code {exit_code})"}
        self.stop()
        return {"observed": HANG, "message": f"no answer within {timeout:.0f} s; killed"}

    def stop(self) -> None:
        if self.process is not None:
            if self.process.is_alive() and self.connection is not None:
                try:
                    self.connection.send(None)
                except (BrokenPipeError, OSError):
                    pass
                self.process.join(5)
            kill_group(self.process.pid)
            self.process.join(5)
        self.process = None
        self.connection = None


def run_isolated(case: Case, root: Path, timeout: float) -> dict[str, str]:
    """Run a case in a fresh interpreter (own process group) that must answer and exit within `timeout`."""
    command = [sys.executable, str(Path(__file__).resolve()), "--run-case", case.key, "--workdir", str(root)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process.pid)
        stdout, _ = process.communicate()
        answered = RESULT_MARKER in (stdout or "")
        if answered:
            return {"observed": HANG, "message": f"answered, but the process did not exit within {timeout:.0f} s"}
        return {"observed": HANG, "message": f"no answer within {timeout:.0f} s; killed"}
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    return {"observed": DEEP, "message": f"the process died (exit code {process.returncode}): {short(stderr[-300:])}"}


def run_corpus(cases: list[Case], timeout: float, root: Path) -> list[dict[str, str]]:
    """Run the cases area by area; progress on stderr. One row per case: area, name, expected, observed, message."""
    rows = []
    for area in AREAS:
        area_cases = [case for case in cases if case.area == area]
        if not area_cases:
            continue
        worker = AreaWorker(area, root)
        started = time.monotonic()
        try:
            for index, case in enumerate(area_cases, 1):
                case_started = time.monotonic()
                if case.isolated:
                    outcome = run_isolated(case, root, timeout)
                else:
                    outcome = worker.run(case, timeout)
                rows.append({"area": area, "name": case.name, "expected": case.expected, **outcome})
                marker = "  " if outcome["observed"] not in BAD_BUCKETS else "!!"
                seconds = time.monotonic() - case_started
                progress = f"[{area} {index}/{len(area_cases)}] {case.name}: {outcome['observed']} ({seconds:.1f} s)"
                print(marker, progress, file=sys.stderr, flush=True)
        finally:
            worker.stop()
        print(f"   {area}: {len(area_cases)} cases in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return rows


def totals_table(rows: list[dict[str, str]]) -> str:
    counts = Counter(row["observed"] for row in rows)
    table_rows = [[bucket, str(counts.get(bucket, 0))] for bucket in BUCKETS] + [["total", str(len(rows))]]
    return markdown_table(["outcome", "cases"], table_rows, align="lr")


def details_table(rows: list[dict[str, str]]) -> str:
    table_rows = [
        [row["area"], row["name"], row["expected"], row["observed"], short(row["message"], 160).replace("|", "/")]
        for row in rows
    ]
    return markdown_table(["area", "case", "expected", "observed", "message"], table_rows, align="lllll")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--areas", nargs="+", choices=AREAS, default=list(AREAS), help="areas to run (default: all)")
    parser.add_argument("--details", action="store_true", help="also print one line per case")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a case may take before it is a hang")
    parser.add_argument("--fast", action="store_true", help="leave out the slowest cases (decompression bomb, ...)")
    parser.add_argument("--json", type=Path, help="also write the per-case rows to this JSON file")
    parser.add_argument("--run-case", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.timeout <= 0:
        parser.error(f"--timeout must be positive, got {arguments.timeout}.")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.run_case:
        isolated_main(arguments.run_case, arguments.workdir)
        return 0
    # Workers inherit these: offline, quiet, one thread each on a shared machine.
    for name, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }.items():
        os.environ.setdefault(name, value)
    cases = [case for case in CASES if case.area in arguments.areas and (case.fast or not arguments.fast)]
    with tempfile.TemporaryDirectory(prefix="cdan-bad-inputs-") as root:
        rows = run_corpus(cases, arguments.timeout, Path(root))
    if arguments.json:
        arguments.json.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(totals_table(rows))
    if arguments.details:
        print()
        print(details_table(rows))
    differing = [
        row for row in rows if row["observed"] not in BAD_BUCKETS and row["observed"] != MATCHING[row["expected"]]
    ]
    if differing:
        print(f"\n{len(differing)} case(s) ended well, but not as expected:", file=sys.stderr)
        for row in differing:
            print(f"  {row['area']}/{row['name']}: expected {row['expected']}, {row['observed']}: "
                  f"{short(row['message'])}", file=sys.stderr)
    bad = [row for row in rows if row["observed"] in BAD_BUCKETS]
    if bad:
        print(f"\n{len(bad)} of {len(rows)} cases in a bad bucket:", file=sys.stderr)
        for row in bad:
            print(f"  {row['area']}/{row['name']}: {row['observed']}: {short(row['message'])}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = [
    "AREAS",
    "BAD_BUCKETS",
    "BUCKETS",
    "CASES",
    "Case",
    "Workspace",
    "classify_error",
    "classify_result",
    "main",
    "run_case",
    "run_corpus",
]
