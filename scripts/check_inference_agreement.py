"""Check that the faster inference options write the same reports as float32 on a data set split, and how fast.

    python scripts/check_inference_agreement.py                                   # outputs/demo on the demo test split
    python scripts/check_inference_agreement.py --model runs/iu_xray --dataset_name iu_xray --data_dir /data/iu_xray
    python scripts/check_inference_agreement.py --options fp32 int8 --threads 2 --max_samples 64

For the checkpoint and each option of `inference_cdan.NAMED_OPTIONS` asked for (`--options`; float32 always runs
first, as the reference), the split's reports are generated with `evaluation_cdan.generate_reports_and_disease_logits`
(the evaluation's own generation: the checkpoint's generation settings unless `--num_beams` / `--max_length` are
given), and the script prints a Markdown table: the option, the share of studies whose report is identical to the
float32 one, CE macro-F1 against the reference reports (`evaluation_cdan.compute_clinical_efficacy`) and its
difference from float32's, and reports per second. An option this machine cannot run (bfloat16 without AVX512-BF16
or AMX) is listed below the table with the reason.

Reports per second cover preprocessing and generation of the whole split, after one untimed warm-up batch (which
compiles, for the `compile` options); a last batch of another size than the others compiles again. The target of the
issue: identical reports for at least 95 % of the studies and CE macro-F1 within 0.01 of float32
(`--min_identical`, `--max_f1_delta`); the exit status is 1 when a run option misses it.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmark_utils import markdown_table
from data_cdan import load_cdan_dataset
from evaluation_cdan import compute_clinical_efficacy, generate_reports_and_disease_logits, reference_reports
from inference_cdan import NAMED_OPTIONS, optimize_for_inference
from modeling_cdan import CdanForConditionalGeneration
from processing_cdan import CdanProcessor


REFERENCE_OPTION = "fp32"


def identical_fraction(reports: list[str], reference: list[str]) -> float:
    """The share of studies whose report is exactly the reference report."""
    if len(reports) != len(reference):
        raise ValueError(f"{len(reports)} reports for {len(reference)} reference reports.")
    return sum(report == expected for report, expected in zip(reports, reference)) / len(reference)


def run_option(model, processor, dataset, name: str, batch_size: int, **generation_kwargs) -> dict:
    """
    Prepare a copy of `model` with the option set `name` and generate the split's reports, after one warm-up batch.

    Returns:
        `dict`: `reports` and `seconds` (the timed pass over the split).

    Raises:
        `ValueError`: the option cannot run on this machine.
    """
    options = NAMED_OPTIONS[name]
    prepared = optimize_for_inference(model, precision=options.precision, compile=options.compile)
    warmup = dataset.select(range(min(batch_size, len(dataset))))
    generate_reports_and_disease_logits(prepared, processor, warmup, batch_size, **generation_kwargs)
    start = time.perf_counter()
    reports, _ = generate_reports_and_disease_logits(prepared, processor, dataset, batch_size, **generation_kwargs)
    return {"reports": reports, "seconds": time.perf_counter() - start}


def agreement_table(results: dict[str, dict], references: list[str]) -> tuple[str, dict[str, dict]]:
    """The Markdown table of the module docstring and its numbers per option."""
    fp32_reports = results[REFERENCE_OPTION]["reports"]
    reference_f1 = compute_clinical_efficacy(references, fp32_reports)["CE macro-F1"]
    numbers, rows = {}, []
    for name, result in results.items():
        f1 = compute_clinical_efficacy(references, result["reports"])["CE macro-F1"]
        numbers[name] = {
            "identical_fraction": identical_fraction(result["reports"], fp32_reports),
            "ce_macro_f1": f1,
            "ce_macro_f1_delta": f1 - reference_f1,
            "reports_per_second": len(references) / result["seconds"],
        }
        row = numbers[name]
        rows.append(
            [
                name,
                f"{100 * row['identical_fraction']:.1f} %",
                f"{row['ce_macro_f1']:.4f}",
                f"{row['ce_macro_f1_delta']:+.4f}",
                f"{row['reports_per_second']:.2f}",
            ]
        )
    header = ["option", "identical reports", "CE macro-F1", "delta vs fp32", "reports/s"]
    return markdown_table(header, rows), numbers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/demo", help="a CDAN checkpoint folder")
    parser.add_argument("--dataset_name", default="demo", help="demo, iu_xray or mimic_cxr")
    parser.add_argument("--data_dir", default=None, help="folder of the downloaded data set (not for the demo)")
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--options",
        nargs="+",
        default=[name for name in NAMED_OPTIONS if name != REFERENCE_OPTION],
        choices=list(NAMED_OPTIONS),
        help="option sets to compare with fp32 (which always runs)",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="studies per generate() call")
    parser.add_argument("--num_beams", type=int, default=None, help="beam size; the checkpoint's by default")
    parser.add_argument("--max_length", type=int, default=None, help="longest report; the checkpoint's by default")
    parser.add_argument("--max_samples", type=int, default=None, help="only the first N studies of the split")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--min_identical", type=float, default=0.95, help="target share of identical reports")
    parser.add_argument("--max_f1_delta", type=float, default=0.01, help="target |CE macro-F1 - fp32's|")
    parser.add_argument("--output_json", default=None, help="also write the numbers here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"`--batch_size` must be at least 1, got {args.batch_size}.")
    if not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"{args.model} is not a checkpoint folder (no config.json); train one with train.py.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = CdanForConditionalGeneration.from_pretrained(args.model).eval()
    processor = CdanProcessor.from_pretrained(args.model)
    dataset = load_cdan_dataset(args.dataset_name, data_dir=args.data_dir)[args.split]
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    generation_kwargs = {
        name: getattr(args, name) for name in ("num_beams", "max_length") if getattr(args, name) is not None
    }

    results, skipped = {}, {}
    for name in dict.fromkeys([REFERENCE_OPTION, *args.options]):
        print(f"{name}: generating {len(dataset)} reports", file=sys.stderr, flush=True)
        try:
            results[name] = run_option(model, processor, dataset, name, args.batch_size, **generation_kwargs)
        except ValueError as error:
            if name == REFERENCE_OPTION:
                raise
            skipped[name] = str(error)
    table, numbers = agreement_table(results, reference_reports(processor, dataset))
    print(table)
    for name, reason in skipped.items():
        print(f"\n{name}: skipped: {reason}")
    missed = [
        name
        for name, row in numbers.items()
        if row["identical_fraction"] < args.min_identical or abs(row["ce_macro_f1_delta"]) > args.max_f1_delta
    ]
    print(
        f"\n{len(dataset)} studies of {args.dataset_name}/{args.split}, {torch.get_num_threads()} threads; target: "
        f">= {100 * args.min_identical:.0f} % identical, |delta| <= {args.max_f1_delta}: "
        + (f"missed by {', '.join(missed)}" if missed else "met by every option run")
    )
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps({"options": numbers, "skipped": skipped}, indent=2))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["agreement_table", "identical_fraction", "main", "run_option"]
