"""Memory and throughput of `cdan-report` over many studies, and its resume after a SIGKILL.

1. Builds a JSON-lines manifest of `--studies` two-view studies from the demo set (`load_cdan_dataset("demo")`
   renders its 1,000 studies once, then reads them from the cache). When more studies are asked for than the demo
   has, its studies are repeated under new ids (`<id>#copy<k>`), and the script says so.
2. Memory: runs `cdan-report` on the manifest in a child process (`cli_cdan.main`, what the console script runs,
   wrapped so that the child also prints its own peak RSS, `benchmark_utils.peak_rss_mb`, at exit). Every
   `--sample_seconds` it reads the resident memory of the child's process tree (psutil) and counts the rows written;
   when the row count passes each of `--marks` it records the rows, the elapsed time, the tree's RSS then and the
   highest RSS sampled so far. Prints a Markdown table: studies done vs RSS and throughput.
3. Resume (`--kill_at`): runs the same command on a fresh output file, SIGKILLs it once `--kill_at` rows are there,
   runs it again to the end, and checks that the rows written before the kill were not redone (each id has exactly
   one row, the file before the kill is a prefix of the final file) and that the final file has one row per study.

Without a checkpoint at `--model` the script builds a randomly initialised checkpoint of the demo preset's size
(see `benchmark_cold_start.build_demo_sized_checkpoint`); random weights write 60 tokens per report, the slowest case.

    python scripts/benchmark_cli_memory.py --model outputs/demo --studies 1000 --threads 1
    python scripts/benchmark_cli_memory.py --studies 100 --marks 25 50 100 --kill_at 40 --work_dir /tmp/cli_memory
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmark_utils import markdown_table


SCRIPTS = Path(__file__).resolve().parent
REPOSITORY = SCRIPTS.parent

CHILD_CODE = """\
import sys
from benchmark_utils import peak_rss_mb
from cli_cdan import main
status = main(sys.argv[1:])
print(f"PEAK_RSS_MB={peak_rss_mb():.1f}", file=sys.stderr)
sys.exit(status)
"""
"""The child process: `cdan-report` (`cli_cdan.main`) that prints its own peak RSS (`VmHWM`) when it exits."""

PEAK_LINE = re.compile(r"PEAK_RSS_MB=([0-9.]+)")
SKIPPED_LINE = re.compile(r"(\d+) study\(ies\) already had a report")


@dataclass
class CliRun:
    """
    What one `cdan-report` run did.

    Args:
        marks (`list[dict]`): per mark reached, `rows`, `seconds`, `rss_mb` (tree RSS then), `peak_sampled_mb`.
        seconds (`float`): wall time until exit (or the kill).
        exit_status (`int`): the child's exit status (`-9` after a SIGKILL).
        peak_rss_mb (`float`, *optional*): the child's own peak RSS (`VmHWM`), when it exited normally.
        peak_sampled_mb (`float`): the highest tree RSS sampled.
        log (`str`): the child's stderr.
    """

    marks: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    exit_status: int = 0
    peak_rss_mb: float | None = None
    peak_sampled_mb: float = 0.0
    log: str = ""


class RowCounter:
    """Counts the complete lines of a growing file, reading only what was appended since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset, self.rows = path, 0, 0

    def __call__(self) -> int:
        if self.path.is_file():
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                appended = file.read()
            self.offset += len(appended)
            self.rows += appended.count(b"\n")
        return self.rows


def tree_rss_mb(process: psutil.Process) -> float:
    """
    Resident memory, in MB, of `process` and all its descendants (0 for those that are gone). A child that has not
    yet replaced the forked copy of this process by `python -c` (exec) counts 0: its RSS would be the parent's.
    """
    total = 0
    try:
        if process.cmdline()[1:2] != ["-c"]:
            return 0.0
        members = [process, *process.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return 0.0
    for member in members:
        try:
            total += member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / 2**20


def demo_manifest(path: Path, studies: int) -> str:
    """
    Write a JSON-lines manifest of `studies` demo studies (all splits, in order) and say where they came from.

    Returns:
        `str`: a sentence naming the source: the demo studies used, and how many were repeated copies.
    """
    import datasets

    from data_cdan import load_cdan_dataset

    demo = load_cdan_dataset("demo")
    records = []
    for split in ("train", "validation", "test"):
        rows = demo[split].cast_column("images", datasets.List(datasets.Image(decode=False)))  # paths, not pixels
        for study_id, images in zip(rows["id"], rows["images"]):
            records.append({"id": study_id, "images": [image["path"] for image in images]})
    with open(path, "w", encoding="utf-8") as manifest:
        for index in range(studies):
            record = records[index % len(records)]
            copy = index // len(records)
            study_id = record["id"] if copy == 0 else f"{record['id']}#copy{copy}"
            manifest.write(json.dumps({"id": study_id, "images": record["images"]}) + "\n")
    copies = max(studies - len(records), 0)
    repeated = f", plus {copies} repeated under new ids" if copies else ""
    return f"{min(studies, len(records))} distinct demo studies (two rendered views each){repeated}"


def run_cli(
    arguments: list[str],
    output: Path,
    marks: list[int],
    threads: int,
    log_path: Path,
    kill_at: int | None = None,
    sample_seconds: float = 0.2,
) -> CliRun:
    """
    Run `cdan-report arguments` in a child process, sampling its tree's RSS and the rows written to `output`.

    Args:
        arguments (`list[str]`): the command's arguments.
        output (`Path`): its output file, whose complete lines are counted.
        marks (`list[int]`): row counts at which to record a sample.
        threads (`int`): `OMP_NUM_THREADS` of the child (the command also gets `--threads`).
        log_path (`Path`): where the child's stderr goes.
        kill_at (`int`, *optional*): SIGKILL the child's process group once this many rows are written.
        sample_seconds (`float`, *optional*): sampling period.
    """
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(REPOSITORY), os.environ.get("PYTHONPATH", "")]),
    }
    count_rows = RowCounter(output)
    count_rows()  # rows already there (a resumed run) are not this run's
    initial_rows = count_rows.rows
    run = CliRun()
    pending = sorted(marks)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_CODE, *arguments],
            cwd=REPOSITORY,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole
        )
        process = psutil.Process(child.pid)
        while True:
            finished = child.poll() is not None
            rss = 0.0 if finished else tree_rss_mb(process)
            run.peak_sampled_mb = max(run.peak_sampled_mb, rss)
            rows = count_rows() - initial_rows
            while pending and rows >= pending[0] and not finished:
                run.marks.append(
                    {
                        "rows": rows,
                        "seconds": time.perf_counter() - start,
                        "rss_mb": rss,
                        "peak_sampled_mb": run.peak_sampled_mb,
                    }
                )
                pending = [mark for mark in pending if mark > rows]
            if finished:
                break
            if kill_at is not None and rows >= kill_at:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                break
            time.sleep(sample_seconds)
    run.seconds = time.perf_counter() - start
    run.exit_status = child.returncode
    run.log = log_path.read_text(errors="replace")
    if peak := PEAK_LINE.search(run.log):
        run.peak_rss_mb = float(peak.group(1))
    return run


def read_lines(path: Path) -> list[bytes]:
    """The complete lines of a file (a partial last line, as a kill may leave, is left out)."""
    data = path.read_bytes() if path.is_file() else b""
    return data[: data.rfind(b"\n") + 1].splitlines(keepends=True)


def memory_table(run: CliRun) -> str:
    """Markdown: studies done vs the tree's RSS then, the highest sampled so far, and throughput."""
    rows, previous_rows, previous_seconds = [], 0, 0.0
    for mark in run.marks:
        interval = (mark["rows"] - previous_rows) / max(mark["seconds"] - previous_seconds, 1e-9)
        rows.append(
            (
                mark["rows"],
                f"{mark['seconds']:.0f}",
                f"{mark['rss_mb']:.0f}",
                f"{mark['peak_sampled_mb']:.0f}",
                f"{interval:.2f}",
                f"{mark['rows'] / mark['seconds']:.2f}",
            )
        )
        previous_rows, previous_seconds = mark["rows"], mark["seconds"]
    header = [
        "studies done",
        "elapsed (s)",
        "RSS then (MB)",
        "peak RSS so far (MB)",
        "studies/s in the interval",
        "studies/s overall",
    ]
    return markdown_table(header, rows, align="rrrrrr")


def resume_check(
    arguments: list[str], output: Path, study_ids: list[str], kill_at: int, threads: int, work_dir: Path, **kwargs
) -> dict:
    """
    Kill a run at `kill_at` rows, rerun it to the end, and compare the rows and ids before and after.

    Returns:
        `dict`: `killed_at_rows`, `partial_line_after_kill`, `skipped_on_resume` (from the command's message),
        `resumed_rows` (written by the second run), `final_rows`, `final_unique_ids`, `error_rows`,
        `rows_before_kill_kept` (the file before the kill is a prefix of the final one), `redone_ids` (ids with a row
        before the kill and another after), `missing_ids`, `unknown_ids`, and both runs' seconds.
    """
    killed = run_cli(arguments, output, [], threads, work_dir / "resume_killed.log", kill_at=kill_at, **kwargs)
    if killed.exit_status != -signal.SIGKILL:
        raise RuntimeError(f"The run to kill ended by itself (status {killed.exit_status}):\n{killed.log[-3000:]}")
    before = read_lines(output)
    partial_line = output.stat().st_size > sum(len(line) for line in before)
    ids_before = [json.loads(line)["id"] for line in before]
    resumed = run_cli(arguments, output, [], threads, work_dir / "resume_rerun.log", **kwargs)
    if resumed.exit_status not in (0, 1):
        raise RuntimeError(f"The resumed run failed (status {resumed.exit_status}):\n{resumed.log[-3000:]}")
    after = read_lines(output)
    rows = [json.loads(line) for line in after]
    id_counts = Counter(row["id"] for row in rows)
    skipped = SKIPPED_LINE.search(resumed.log)
    return {
        "killed_at_rows": len(before),
        "partial_line_after_kill": partial_line,
        "skipped_on_resume": int(skipped.group(1)) if skipped else None,
        "resumed_rows": len(after) - len(before),
        "final_rows": len(rows),
        "final_unique_ids": len(id_counts),
        "error_rows": sum("error" in row for row in rows),
        "rows_before_kill_kept": after[: len(before)] == before,
        "redone_ids": sorted(study_id for study_id in set(ids_before) if id_counts[study_id] > 1),
        "missing_ids": sorted(set(study_ids) - set(id_counts)),
        "unknown_ids": sorted(set(id_counts) - set(study_ids)),
        "killed_seconds": killed.seconds,
        "resumed_seconds": resumed.seconds,
    }


def resume_table(check: dict, studies: int) -> str:
    """Markdown: the resume check's counts."""
    rows = [
        ("rows when SIGKILLed", check["killed_at_rows"]),
        ("half-written last line after the kill", "yes" if check["partial_line_after_kill"] else "no"),
        ("studies skipped by the rerun (its own count)", check["skipped_on_resume"]),
        ("rows the rerun wrote", check["resumed_rows"]),
        ("rows before the kill kept unchanged (prefix)", "yes" if check["rows_before_kill_kept"] else "NO"),
        ("ids redone (a row before the kill and another after)", len(check["redone_ids"])),
        ("final rows", check["final_rows"]),
        (f"final unique ids (of {studies})", check["final_unique_ids"]),
        ("manifest ids missing / unknown ids", f"{len(check['missing_ids'])} / {len(check['unknown_ids'])}"),
        ("error rows", check["error_rows"]),
        ("wall time, killed run + rerun (s)", f"{check['killed_seconds']:.0f} + {check['resumed_seconds']:.0f}"),
    ]
    return markdown_table(["resume check", "value"], rows, align="lr")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="outputs/demo", help="Checkpoint folder; a demo-sized random one if missing."
    )
    parser.add_argument("--studies", type=int, default=1000, help="Studies in the manifest.")
    parser.add_argument("--marks", type=int, nargs="+", default=[100, 250, 500, 1000], help="Row counts sampled.")
    parser.add_argument(
        "--kill_at", type=int, help="Resume check: SIGKILL at this many rows (studies // 3 by default)."
    )
    parser.add_argument("--skip_memory", action="store_true", help="Only the resume check.")
    parser.add_argument("--skip_resume", action="store_true", help="Only the memory run.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the command (--threads).")
    parser.add_argument("--batch_size", type=int, default=8, help="The command's --batch_size.")
    parser.add_argument("--sample_seconds", type=float, default=0.2, help="RSS sampling period.")
    parser.add_argument(
        "--work_dir", help="Where the manifest, outputs and logs go (a new temporary folder if unset)."
    )
    parser.add_argument("--summary", help="Also write the results as JSON here.")
    args = parser.parse_args(argv)
    if args.studies < 1:
        parser.error("--studies must be at least 1.")
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="cdan-cli-memory-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"memory": work_dir / "memory_reports.jsonl", "resume": work_dir / "resume_reports.jsonl"}
    if existing := [str(path) for path in outputs.values() if path.exists()]:
        parser.error(f"{', '.join(existing)} already exist(s); pick a new --work_dir (nothing is overwritten).")

    model, model_description = args.model, f"checkpoint {args.model}"
    if not Path(model).is_dir():
        from benchmark_cold_start import build_demo_sized_checkpoint

        print(f"{model} not found: building a demo-sized random checkpoint.", file=sys.stderr)
        model = str(build_demo_sized_checkpoint(work_dir / "random_demo_checkpoint"))
        model_description = "a demo-sized random checkpoint (60-token reports)"
    manifest = work_dir / "manifest.jsonl"
    source = demo_manifest(manifest, args.studies)
    study_ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines()]
    print(f"Manifest {manifest}: {args.studies} studies, {source}. Model: {model_description}.", file=sys.stderr)

    def arguments(output: Path) -> list[str]:
        return ["--model", str(Path(model).resolve()), "--inputs", str(manifest), "--output", str(output),
                "--threads", str(args.threads), "--batch_size", str(args.batch_size)]  # fmt: skip

    summary: dict = {"studies": args.studies, "source": source, "model": model_description, "work_dir": str(work_dir)}
    command = f"cdan-report {' '.join(arguments(Path('reports.jsonl')))}"
    print(f"Command: {command}", file=sys.stderr)
    if not args.skip_memory:
        marks = sorted({mark for mark in args.marks if mark <= args.studies} | {args.studies})
        run = run_cli(arguments(outputs["memory"]), outputs["memory"], marks, args.threads, work_dir / "memory.log",
                      sample_seconds=args.sample_seconds)  # fmt: skip
        if run.exit_status not in (0, 1):
            raise RuntimeError(f"cdan-report failed (status {run.exit_status}):\n{run.log[-3000:]}")
        rows = [json.loads(line) for line in read_lines(outputs["memory"])]
        summary["memory"] = {
            "marks": run.marks,
            "seconds": run.seconds,
            "peak_rss_mb": run.peak_rss_mb,
            "peak_sampled_mb": run.peak_sampled_mb,
            "rows": len(rows),
            "error_rows": sum("error" in row for row in rows),
        }
        print(f"\n## cdan-report memory, {args.studies} studies ({source}; {model_description})\n")
        print(memory_table(run))
        print(
            f"\nWhole run: {run.seconds:.0f} s, {len(rows)} rows ({summary['memory']['error_rows']} error rows); "
            f"peak RSS of the command (its VmHWM) {run.peak_rss_mb} MB, highest sampled tree RSS "
            f"{run.peak_sampled_mb:.0f} MB."
        )
    if not args.skip_resume:
        kill_at = args.kill_at or max(args.studies // 3, 1)
        check = resume_check(arguments(outputs["resume"]), outputs["resume"], study_ids, kill_at, args.threads,
                             work_dir, sample_seconds=args.sample_seconds)  # fmt: skip
        summary["resume"] = check
        print(f"\n## Resume after SIGKILL at {kill_at} rows\n")
        print(resume_table(check, args.studies))
    print(f"\nCommand (per run): {command}\nFiles: {work_dir}")
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()


__all__ = ["CliRun", "RowCounter", "demo_manifest", "main", "resume_check", "run_cli", "tree_rss_mb"]
