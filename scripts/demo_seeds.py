"""The demo recipe over several seeds: mean ± sd of what the model sees and what its reports say.

    # paper CDAN and the diagnosis prompt, 3 seeds, each also decoded with trigram blocking and with its sentences
    # made to agree with its classifier (the demo preset is "diagnosis prompt + sentences agree with the classifier")
    python scripts/demo_seeds.py --decoding_variants "trigram blocking" "sentences agree with the classifier"
    python scripts/demo_seeds.py --variants paper "asymmetric L_mlc" --seeds 9223 1 2 3

Each (variant, seed) runs the main job (`python train.py`, demo preset, beam 3) in a fresh process with
`--seed <seed> --output_dir <output_dir>/<variant>/seed<seed>`, and reads back the test-split `metrics.json` that
`train.py` writes. A run whose metrics already exist is not trained again, so an interrupted sweep resumes where it
stopped. A decoding variant (trigram blocking) re-scores each trained checkpoint with other generation settings via
`scripts/evaluate.py`, without training again.

For every row it prints mean ± sd over the seeds (sample standard deviation) of: the reports' CE macro- and
micro-F1, the classifier's macro-F1 and mean AUROC on the same studies (what the model sees), the ratio of the two
macro-F1s, BLEU-4, the CE macro-F1 of the shuffled-image control, and the wall time of each run (with the share of
the CPUs other processes used meanwhile, so timings on a busy machine are recognisable). It writes `summary.json` and
`summary.md` to `--output_dir`.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from benchmark_utils import CpuMeter, markdown_table
from tqdm.auto import tqdm

REPOSITORY = Path(__file__).resolve().parents[1]

PAPER = ["--diagnosis_prompt", "False", "--observation_sentences", "False"]
PROMPT = ["--diagnosis_prompt", "True", "--observation_sentences", "False"]
CONTEXT = ["--clinical_context", "True", "--context_text_encoder", "offline-minilm"]
TRAINING_VARIANTS: dict[str, list[str]] = {
    "paper": PAPER,
    "diagnosis prompt": PROMPT,
    "weighted BCE L_mlc": [*PAPER, "--mlc_loss", "weighted_bce"],
    "asymmetric L_mlc": [*PAPER, "--mlc_loss", "asymmetric"],
    "prompt + indication": [*PROMPT, *CONTEXT],
    "prompt + prior": [*PROMPT, "--prior_study", "True", "--cache_visual_features", "False"],
    "prompt + indication + prior": [*PROMPT, *CONTEXT, "--prior_study", "True", "--cache_visual_features", "False"],
    "PriorRG": ["--preset", "priorrg_demo"],
    "prompt, extractor trained": [*PROMPT, "--cache_visual_features", "False"],  # the lesion rows' baseline
    "prompt + lesion branch": [*PROMPT, "--lesion_branch", "True", "--cache_visual_features", "False"],
    "prompt + lesion branch + alignment": [
        *PROMPT,
        "--lesion_branch",
        "True",
        "--lesion_alignment",
        "True",
        "--cache_visual_features",
        "False",
        "--context_text_encoder",
        "offline-minilm",
    ],
    "D2R-Net": ["--preset", "d2r_demo"],
}
"""Training recipes: extra `train.py` arguments on top of the demo preset (whose defaults switch on the diagnosis
prompt and the sentence agreement; "diagnosis prompt" + "sentences agree with the classifier" is the demo preset).
"PriorRG" is the `priorrg_demo` preset in two runs: `--stage pretrain`, then `--stage finetune` from its weights. The
demo's priors carry no change statements in the text, so their rows test plumbing, not benefit. The lesion rows read the
demo's true boxes (D2R-Net's detector stage is `scripts/train_detector.py`); they train the extractor with the report
model, as boxes follow each view's augmentation, so they take longer than the cached-feature demo; their baseline is
"prompt, extractor trained", the same recipe without the lesion branch."""

DECODING_VARIANTS: dict[str, list[str]] = {
    "trigram blocking": ["--no_repeat_ngram_size", "3"],
    "sentences agree with the classifier": ["--observation_sentences", "True"],
    "shuffled indication": ["--shuffle_indication", "True"],
    "shuffled boxes": ["--shuffle_boxes", "True"],
}
"""Generation settings applied to every trained checkpoint (extra `scripts/evaluate.py` arguments)."""

MODEL_ROW, SHUFFLED_ROW = "(this run)", "images shuffled"
"""Ends of the model's rows in `metrics.json` ("CDAN (this run)", "PriorRG, images shuffled", ...)."""

COLUMNS = {
    "reports' CE macro-F1": (MODEL_ROW, "CE macro-F1"),
    "reports' CE micro-F1": (MODEL_ROW, "CE micro-F1"),
    "classifier macro-F1": (MODEL_ROW, "classifier macro-F1"),
    "classifier AUROC": (MODEL_ROW, "classifier mean AUROC"),
    "reports / classifier": (MODEL_ROW, "report/classifier macro-F1"),
    "BLEU-4": (MODEL_ROW, "BLEU-4"),
    "shuffled images CE macro-F1": (SHUFFLED_ROW, "CE macro-F1"),
}
"""Table column -> (end of the row's name in metrics.json, metric); a model without a classifier leaves its
columns n/a."""


def metric_value(metrics: dict, row_end: str, metric: str) -> float:
    """The `metric` of the row of `metrics` whose name ends with `row_end`; NaN when it has none."""
    (row,) = [name for name in metrics if name.endswith(row_end)]
    return metrics[row].get(metric, float("nan"))


def slug(name: str) -> str:
    return "".join(character if character.isalnum() else "_" for character in name).strip("_")


def run_logged(command: list[str], log_path: Path, threads: int | None = None) -> CpuMeter:
    """Run `command` (with `threads` OpenMP threads when given), its output into `log_path`; raise if it fails."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        environment.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log, CpuMeter() as meter:
        process = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPOSITORY)
    returncode = process.returncode
    if returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed (exit {returncode}); end of {log_path}:\n{tail}")
    return meter


def train_once(
    variant: str, seed: int, output_dir: Path, extra_arguments: list[str], threads: int | None = None
) -> dict:
    """Train and evaluate one (variant, seed), or read the results of an earlier run."""
    run_dir = output_dir / slug(variant) / f"seed{seed}"
    metrics_path, timing_path = run_dir / "test" / "metrics.json", run_dir / "timing.json"
    if not (metrics_path.exists() and timing_path.exists()):
        common = [sys.executable, "train.py", "--seed", str(seed), "--report_to", "none", *TRAINING_VARIANTS[variant]]
        log_path = output_dir / "logs" / f"{slug(variant)}_seed{seed}.log"
        seconds = foreign_load = 0.0
        if variant == "PriorRG":  # stage 1 (contrastive pre-training), then stage 2 from its weights
            stage_one_dir = run_dir.with_name(f"{run_dir.name}_stage1")
            meter = run_logged(
                [*common, "--stage", "pretrain", "--output_dir", str(stage_one_dir), *extra_arguments],
                log_path.with_name(f"{log_path.stem}_stage1.log"), threads,
            )  # fmt: skip
            seconds, foreign_load = meter.seconds, meter.foreign_load
            common += ["--stage", "finetune", "--model_name_or_path", str(stage_one_dir)]
        meter = run_logged([*common, "--output_dir", str(run_dir), *extra_arguments], log_path, threads)
        timing = {"seconds": seconds + meter.seconds, "foreign_load": max(foreign_load, meter.foreign_load)}
        timing_path.write_text(json.dumps(timing))
    timing = json.loads(timing_path.read_text())
    return {"metrics": json.loads(metrics_path.read_text()), "timing": timing, "dir": run_dir}


def decode_again(run: dict, variant: str, seed: int, output_dir: Path, threads: int | None = None) -> dict:
    """Score a trained checkpoint with a decoding variant (no training)."""
    eval_dir = run["dir"] / f"eval_{slug(variant)}"
    metrics_path = eval_dir / "metrics.json"
    if not metrics_path.exists():
        command = [sys.executable, "scripts/evaluate.py", "--model", str(run["dir"]), "--dataset_name", "demo",
                   "--output_dir", str(eval_dir), "--seed", str(seed), *DECODING_VARIANTS[variant]]  # fmt: skip
        log_path = output_dir / "logs" / f"{run['dir'].parent.name}_{slug(variant)}_seed{seed}.log"
        run_logged(command, log_path, threads)
    return {"metrics": json.loads(metrics_path.read_text()), "timing": None}


def mean_sd(values: list[float]) -> str:
    """`mean ± sd` (sample standard deviation) of the values; "n/a" when one of them is undefined (NaN)."""
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        return "n/a"
    return f"{values.mean():.3f}" if len(values) == 1 else f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def summarize(rows: dict[str, list[dict]]) -> tuple[str, dict]:
    """The Markdown table (mean ± sd per column) and the per-seed values."""
    header = ["variant", "seeds", *COLUMNS, "minutes per run"]
    table_rows, summary = [], {}
    for name, runs in rows.items():
        values = {
            column: [metric_value(run["metrics"], row, metric) for run in runs]
            for column, (row, metric) in COLUMNS.items()
        }
        timed = [run["timing"] for run in runs if run["timing"]]
        minutes = [timing["seconds"] / 60 for timing in timed]
        busy = max((timing["foreign_load"] for timing in timed), default=0.0)
        time_cell = f"{mean_sd(minutes)} (others used ≤{busy:.0%} CPU)" if minutes else "(decoding only)"
        cells = [mean_sd(column_values) for column_values in values.values()]
        table_rows.append([name, str(len(runs)), *cells, time_cell])
        summary[name] = {"per_seed": values, "minutes": minutes}
    return markdown_table(header, table_rows), summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[9223, 1, 2], help="Training seeds (at least 3).")
    parser.add_argument(
        "--variants", nargs="+", default=["paper", "diagnosis prompt"], choices=sorted(TRAINING_VARIANTS)
    )
    parser.add_argument("--decoding_variants", nargs="*", default=[], choices=sorted(DECODING_VARIANTS),
                        help="Also score each trained checkpoint with these generation settings.")  # fmt: skip
    parser.add_argument("--output_dir", default="runs/demo_seeds", help="Runs, logs and the summary go here.")
    parser.add_argument(
        "--threads_per_run", type=int, default=None,
        help="OpenMP threads of each run (default: torch's, one per core). Use 1 to run two sweeps side by side on "
        "2 cores without the threads of one slowing the other several-fold.",
    )  # fmt: skip
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="After `--`: more train.py arguments for every run.")
    args = parser.parse_args(argv)
    extra_arguments = [argument for argument in args.extra if argument != "--"]
    output_dir = Path(args.output_dir).resolve()

    rows: dict[str, list[dict]] = {}
    jobs = [(variant, seed) for variant in args.variants for seed in args.seeds]
    for variant, seed in tqdm(jobs, desc="Demo runs", unit="run"):
        run = train_once(variant, seed, output_dir, extra_arguments, args.threads_per_run)
        rows.setdefault(variant, []).append(run)
        for decoding in args.decoding_variants:
            decoded = decode_again(run, decoding, seed, output_dir, args.threads_per_run)
            rows.setdefault(f"{variant} + {decoding}", []).append(decoded)
        tqdm.write(f"{variant}, seed {seed}: CE macro-F1 {metric_value(run['metrics'], MODEL_ROW, 'CE macro-F1'):.3f}")

    table, summary = summarize(rows)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.json").write_text(json.dumps({"seeds": args.seeds, "rows": summary}, indent=2))
    (output_dir / "summary.md").write_text(table + "\n")
    print(f"\nDemo test split, beam 3, seeds {args.seeds}: mean ± sd\n\n{table}")
    return summary


if __name__ == "__main__":
    main()


__all__ = ["COLUMNS", "DECODING_VARIANTS", "TRAINING_VARIANTS", "main", "metric_value", "summarize"]
