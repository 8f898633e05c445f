"""Benchmark the cold start of report generation: time to the first report of a fresh Python process.

Each run is a new interpreter (the script re-invokes itself with `--single_run`) that does what a user's first call
does, timing each phase:

1. import torch;
2. import transformers' pipeline machinery (`from transformers import pipeline`);
3. load: `pipeline("image-to-text", model=<checkpoint>, trust_remote_code=True)`, which imports the checkpoint's
   copies of `configuration_cdan.py`, `modeling_cdan.py`, `processing_cdan.py` (with `image_processing_cdan.py` and
   `tokenization_cdan.py`) and `pipeline_cdan.py` (and timm, torchvision's transforms) and reads the weights;
4. the first report: one two-view study (two 512 px greyscale PNGs), with the checkpoint's generation settings.

"Time to first report" runs from the moment the parent starts the process to the end of phase 4, so it includes the
interpreter's own start-up. The table gives the median of `--runs` fresh processes (3 by default) and each run's
value, and the median CPU seconds (user + system) of each phase, which other processes on a shared machine inflate
much less than wall time (imports run on one thread, so on an idle machine their wall time is about their CPU time;
generation uses every core). Before each run the script waits (at most `--max_idle_wait` s) for the shared machine's CPUs to be idle;
a run during which other processes used `--max_foreign_load` of the CPUs or more is marked `*`.

Without a checkpoint at `--model` (default `outputs/demo`, which `python train.py` writes) the script builds a
randomly initialised checkpoint of the demo preset's size (`train.py --preset demo`: resnet10t at 96 px, two views,
d_model 128, FFN 256, 3 + 3 layers, 4 heads, the demo vocabulary, beam 3, 60 tokens) in a temporary folder, so it
runs on a fresh machine. Random weights rarely end a report early, so its first report is about as slow as a report
can be (60 tokens).

    python scripts/benchmark_cold_start.py                    # outputs/demo, or a demo-sized random checkpoint
    python scripts/benchmark_cold_start.py --model runs/iu_xray --runs 5
    python scripts/benchmark_cold_start.py --threads 1        # one torch thread: far faster on a busy machine
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark_utils import CpuMeter, markdown_table, wait_for_idle_machine


PHASES = {
    "import_torch": "import torch",
    "import_transformers": "import transformers' pipeline",
    "load": "load the checkpoint (remote code + weights)",
    "first_report": "first report (one two-view study)",
}
"""Phases timed inside the fresh process, in order, with their row labels."""

STUDY_IMAGE_SIZE = 512


class PhaseClock:
    """Wall and CPU seconds of consecutive phases of this process: `lap(name)` ends the phase `name`."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.timings[name], self.timings[f"{name}_cpu"] = wall - self._wall, cpu - self._cpu
        self._wall, self._cpu = wall, cpu


def run_single(model: str, images: list[str]) -> dict[str, float]:
    """
    The phases of one cold start, timed in this (fresh) process: wall seconds per phase, their CPU seconds
    (`<phase>_cpu`), the process's CPU seconds since it started (`process_cpu`) and the wall clock at the end
    (`finished_at`).
    """
    clock = PhaseClock()
    import torch  # noqa: F401

    clock.lap("import_torch")
    from transformers import pipeline

    clock.lap("import_transformers")
    reporter = pipeline("image-to-text", model=model, trust_remote_code=True)
    clock.lap("load")
    reporter(tuple(images))
    clock.lap("first_report")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        **clock.timings,
        "process_cpu": usage.ru_utime + usage.ru_stime,
        "finished_at": time.time(),
    }


def build_demo_sized_checkpoint(folder: Path) -> Path:
    """A randomly initialised checkpoint of `train.py --preset demo`'s size and vocabulary, saved in `folder`."""
    from data_cdan.demo import DEMO_REPORTS_FILE
    from modeling_cdan import CdanForConditionalGeneration
    from pipeline_cdan import save_checkpoint
    from processing_cdan import CdanProcessor
    from train import build_config, parse_arguments

    model_args, data_args, training_args = parse_arguments(["--preset", "demo"])
    with open(DEMO_REPORTS_FILE, encoding="utf-8") as lines:
        reports = [row["findings"] for row in map(json.loads, lines) if row["split"] == "train"]
    processor = CdanProcessor.from_reports(
        reports,
        threshold=data_args.vocabulary_threshold,
        max_length=data_args.max_length,
        image_size=model_args.image_size,
        num_views=data_args.num_views,
    )
    model = CdanForConditionalGeneration(build_config(model_args, data_args, len(processor.tokenizer))).eval()
    model.generation_config.update(max_length=data_args.max_length, num_beams=training_args.generation_num_beams)
    return save_checkpoint(model, processor, folder)


def write_study_images(folder: Path) -> list[str]:
    """Two non-degenerate greyscale PNGs (a gradient with noise), the views of the timed study."""
    from PIL import Image, ImageChops

    paths = []
    for index in range(2):
        gradient = Image.linear_gradient("L").rotate(90 * index).resize((STUDY_IMAGE_SIZE, STUDY_IMAGE_SIZE))
        noise = Image.effect_noise((STUDY_IMAGE_SIZE, STUDY_IMAGE_SIZE), 40)
        path = folder / f"view_{index}.png"
        ImageChops.blend(gradient, noise, 0.3).save(path)
        paths.append(str(path))
    return paths


def run_fresh_process(model: str, images: list[str], threads: int | None = None) -> tuple[dict[str, float], float]:
    """
    One cold start in a new interpreter: its phase timings (with `to_first_report`) and the foreign CPU load.

    Args:
        model (`str`): the checkpoint folder.
        images (`list[str]`): the views of the study.
        threads (`int`, *optional*): torch's intra-op threads in that process (`OMP_NUM_THREADS`); torch's default
            (one per core) when not given.
    """
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, __file__, "--single_run", "--model", model, "--images", *images]
    with CpuMeter() as meter:
        started_at = time.time()
        result = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"The cold-start run failed:\n{result.stderr[-3000:]}")
    timings = json.loads(result.stdout.strip().splitlines()[-1])
    timings["to_first_report"] = timings.pop("finished_at") - started_at
    return timings, meter.foreign_load


def results_table(runs: list[dict[str, float]], contended: list[bool]) -> str:
    """
    The Markdown table: one row per phase and one for the total, with the median wall seconds, the median CPU
    seconds (less sensitive to other processes than wall time) and each run's wall seconds.
    """
    marks = ["*" if flag else "" for flag in contended]
    startup = [run["to_first_report"] - sum(run[phase] for phase in PHASES) for run in runs]
    startup_cpu = [run["process_cpu"] - sum(run[f"{phase}_cpu"] for phase in PHASES) for run in runs]
    labelled = [("interpreter start-up", startup, startup_cpu)]
    labelled += [(label, [run[phase] for run in runs], [run[f"{phase}_cpu"] for run in runs])
                 for phase, label in PHASES.items()]  # fmt: skip
    labelled.append(
        ("**time to first report**", [run["to_first_report"] for run in runs], [run["process_cpu"] for run in runs])
    )
    rows = []
    for label, values, cpu_values in labelled:
        cells = ", ".join(f"{value:.2f}{mark}" for value, mark in zip(values, marks))
        rows.append((label, f"{statistics.median(values):.2f}", f"{statistics.median(cpu_values):.2f}", cells))
    return markdown_table(["phase", "median wall (s)", "median CPU (s)", "runs, wall (s)"], rows, align="lrrr")


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/demo", help="Checkpoint folder; a demo-sized one if missing.")
    parser.add_argument("--runs", type=int, default=3, help="Fresh processes to time (the median is reported).")
    parser.add_argument("--images", nargs="+", help="The views of the timed study (two synthetic PNGs by default).")
    parser.add_argument("--threads", type=int, help="torch threads of the timed process (default: one per core).")
    parser.add_argument("--max_foreign_load", type=float, default=0.10, help="CPU share of other processes.")
    parser.add_argument("--max_idle_wait", type=float, default=30.0, help="Longest wait for an idle machine (s).")
    parser.add_argument("--single_run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single_run:
        print(json.dumps(run_single(args.model, args.images)))
        return []
    with tempfile.TemporaryDirectory() as work_dir:
        model, described = args.model, args.model
        if not Path(model).is_dir():
            print(f"{model} not found: building a demo-sized random checkpoint.", file=sys.stderr)
            model = str(build_demo_sized_checkpoint(Path(work_dir) / "demo"))
            described = "a demo-sized random checkpoint"
        images = args.images or write_study_images(Path(work_dir))
        # An untimed run first: it fills the remote-code module cache and the page cache
        run_fresh_process(model, images, args.threads)
        runs, contended = [], []
        for _ in range(args.runs):
            wait_for_idle_machine(args.max_foreign_load, args.max_idle_wait)
            timings, foreign_load = run_fresh_process(model, images, args.threads)
            runs.append(timings)
            contended.append(foreign_load >= args.max_foreign_load)
    threads = f"{args.threads} torch thread(s)" if args.threads else "torch's default threads"
    setting = f"{args.runs} fresh processes, {os.cpu_count()} CPUs, {threads}"
    print(f"Cold start of {described}, {setting} (* = contended run):\n")
    print(results_table(runs, contended))
    return runs


if __name__ == "__main__":
    main()


__all__ = ["build_demo_sized_checkpoint", "main", "run_single"]
