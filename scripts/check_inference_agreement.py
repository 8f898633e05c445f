"""Check that the faster inference options write the same reports as float32 on a data set split, and how fast.

    python scripts/check_inference_agreement.py                                   # outputs/demo on the demo test split
    python scripts/check_inference_agreement.py --model runs/iu_xray --dataset_name iu_xray --data_dir /data/iu_xray
    python scripts/check_inference_agreement.py --options fp32 int8 --threads 2 --max_samples 64
    python scripts/check_inference_agreement.py --options int8 --int8_scopes all decoder encoder   # what to quantise
    python scripts/check_inference_agreement.py --options fp32 --onnxruntime_int8_scopes encoder-and-cross-attention \
        --onnxruntime_extractor_int8_scopes none encoder-and-cross-attention --threads 1   # ONNX Runtime, int8

For the checkpoint and each option of `inference_cdan.NAMED_OPTIONS` asked for (`--options`; float32 always runs
first, as the reference), the split's reports are generated with `evaluation_cdan.generate_reports_and_disease_logits`
(the evaluation's own generation: the checkpoint's generation settings unless `--num_beams` / `--max_length` are
given), and the script prints a Markdown table: the option, the share of studies whose report is identical to the
float32 one, CE macro-F1 against the reference reports (`evaluation_cdan.compute_clinical_efficacy`) and its
difference from float32's, reports per second and CPU seconds per report. An option this machine cannot run (bfloat16
without AVX512-BF16 or AMX) is listed below the table with the reason. `--int8_scopes` adds one int8 row per scope of
`inference_cdan.INT8_SCOPES` (`int8 (all)`, ...: which linear layers are quantised), to choose what to quantise.
`--onnxruntime_int8_scopes` adds an `onnxruntime` row (the model exported with `onnx_cdan.export_onnx` and decoded by
ONNX Runtime) and one `onnxruntime-int8 (scope)` row per scope (the export quantised by
`onnx_quantization_cdan.quantize_onnx_int8`). `--onnxruntime_extractor_int8_scopes none encoder-and-cross-attention` adds
`onnxruntime-int8 (extractor)` and `onnxruntime-int8 (extractor + encoder-and-cross-attention)`: the visual extractor
in static int8 (`onnx_quantization_cdan.quantize_onnx_extractor_int8`, calibrated on `--calibration_studies` studies of
`--calibration_split`), alone or with that scope's linear layers in dynamic int8.

Reports per second cover preprocessing and generation of the whole split, after one untimed warm-up batch (which
compiles, for the `compile` options); a last batch of another size than the others compiles again. CPU seconds (of
every thread of this process) are less disturbed than wall-clock time by other processes on a shared machine, and
compare options back to back there; neither replaces a benchmark on an idle machine. The target of the
issue: identical reports for at least 95 % of the studies and CE macro-F1 within 0.01 of float32
(`--min_identical`, `--max_f1_delta`); the exit status is 1 when a run option misses it.
"""

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchmark_utils import markdown_table
from tqdm.auto import tqdm

from consistency_cdan import align_reports_with_classifier
from data_cdan import load_cdan_dataset
from evaluation_cdan import compute_clinical_efficacy, generate_reports_and_disease_logits, reference_reports
from inference_cdan import INT8_SCOPES, NAMED_OPTIONS, InferenceOptions, optimize_for_inference
from modeling_cdan import CdanForConditionalGeneration
from processing_cdan import CdanProcessor

REFERENCE_OPTION = "fp32"
NO_SCOPE = "none"
"""`--onnxruntime_extractor_int8_scopes` value for the static int8 extractor alone."""


def identical_fraction(reports: list[str], reference: list[str]) -> float:
    """The share of studies whose report is exactly the reference report."""
    if len(reports) != len(reference):
        raise ValueError(f"{len(reports)} reports for {len(reference)} reference reports.")
    return sum(report == expected for report, expected in zip(reports, reference)) / len(reference)


def int8_scope_label(scope: str) -> str:
    """The table's name of the int8 option with `scope` (a key of `INT8_SCOPES`)."""
    return f"int8 ({scope})"


def options_to_run(names: list[str], int8_scopes: list[str] | None = None) -> dict[str, InferenceOptions]:
    """
    The option sets to compare, by table name: float32 first, then `names` (of `NAMED_OPTIONS`), then one int8 set per
    scope of `int8_scopes` (keys of `INT8_SCOPES`).
    """
    options = {name: NAMED_OPTIONS[name] for name in dict.fromkeys([REFERENCE_OPTION, *names])}
    for scope in int8_scopes or []:
        options[int8_scope_label(scope)] = InferenceOptions(precision="int8", int8_scope=scope)
    return options


def run_option(model, processor, dataset, options: InferenceOptions, batch_size: int, **generation_kwargs) -> dict:
    """
    Prepare a copy of `model` with `options` and generate the split's reports, after one warm-up batch.

    Returns:
        `dict`: `reports`, `seconds` and `cpu_seconds` (wall-clock and this process's CPU time of the timed pass over
        the split).

    Raises:
        `ValueError`: the option cannot run on this machine.
    """
    prepared = optimize_for_inference(model, **dataclasses.asdict(options))
    warmup = dataset.select(range(min(batch_size, len(dataset))))
    generate_reports_and_disease_logits(prepared, processor, warmup, batch_size, **generation_kwargs)
    start, cpu_start = time.perf_counter(), time.process_time()
    reports, _ = generate_reports_and_disease_logits(prepared, processor, dataset, batch_size, **generation_kwargs)
    return {
        "reports": reports,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }


def generate_onnx_reports(generator, model, processor, dataset, batch_size: int, **generation_kwargs) -> list[str]:
    """
    The reports of `dataset` written by an `onnx_cdan.OnnxReportGenerator`, edited to agree with the exported
    classifier as `evaluation_cdan.generate_reports_and_disease_logits` edits the PyTorch model's (`model` gives the
    decision thresholds and observation sentences). The disease logits take a second encoder call per batch
    (`generate()` keeps its own), so the ONNX Runtime rows' speed is a lower bound.
    """
    config = model.config
    reports = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="Generating reports (ONNX Runtime)", unit="batch"):
        pixel_values = processor(images=dataset[start : start + batch_size]["images"], return_tensors="pt")
        pixel_values = pixel_values["pixel_values"].numpy()
        batch_reports = processor.batch_decode(
            generator.generate(pixel_values, **generation_kwargs), skip_special_tokens=True
        )
        if generator.metadata["has_disease_logits"] and config.observation_sentences:
            disease_logits = torch.from_numpy(generator.encode(pixel_values)["disease_logits"])  # (B, O)
            decisions = model.diagnosis_decisions(disease_logits).tolist()
            batch_reports = align_reports_with_classifier(
                batch_reports, decisions, config.observation_names, config.observation_sentences
            )
        reports.extend(batch_reports)
    return reports


def onnx_label(int8_scope: str | None, extractor_int8: bool) -> str:
    """The table's name of an ONNX Runtime row: float32, or what is quantised."""
    quantized = (["extractor"] if extractor_int8 else []) + ([int8_scope] if int8_scope else [])
    return f"onnxruntime-int8 ({' + '.join(quantized)})" if quantized else "onnxruntime"


def run_onnx_option(
    model,
    processor,
    dataset,
    int8_scope: str | None,
    batch_size: int,
    calibration_dataset=None,
    calibration_method: str = "MinMax",
    **generation_kwargs,
) -> dict:
    """
    Export `model` to ONNX (into a temporary folder); with `calibration_dataset`, quantise its visual extractor to
    static int8 calibrated on those studies (`onnx_quantization_cdan.quantize_onnx_extractor_int8`); quantise the linear layers of
    `int8_scope` unless `None` (`onnx_quantization_cdan.quantize_onnx_int8`); then generate the split's reports with ONNX Runtime
    (as many threads as torch), after one warm-up batch.

    Returns:
        `dict`: `reports`, `seconds` and `cpu_seconds`, as [`run_option`].
    """
    from onnx_cdan import OnnxReportGenerator, export_onnx
    from onnx_quantization_cdan import calibration_batches, quantize_onnx_extractor_int8, quantize_onnx_int8

    with tempfile.TemporaryDirectory(prefix="cdan_onnx_") as folder:
        export_onnx(model, folder, processor=processor)
        if calibration_dataset is not None:
            batches = calibration_batches(processor, calibration_dataset["images"], batch_size)
            quantize_onnx_extractor_int8(folder, batches, calibration_method)
        if int8_scope is not None:
            quantize_onnx_int8(folder, int8_scope)
        generator = OnnxReportGenerator(folder, num_threads=torch.get_num_threads())
        warmup = dataset.select(range(min(batch_size, len(dataset))))
        generate_onnx_reports(generator, model, processor, warmup, batch_size, **generation_kwargs)
        start, cpu_start = time.perf_counter(), time.process_time()
        reports = generate_onnx_reports(generator, model, processor, dataset, batch_size, **generation_kwargs)
        return {
            "reports": reports,
            "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start,
        }


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
            "cpu_seconds_per_report": result["cpu_seconds"] / len(references),
        }
        row = numbers[name]
        rows.append(
            [
                name,
                f"{100 * row['identical_fraction']:.1f} %",
                f"{row['ce_macro_f1']:.4f}",
                f"{row['ce_macro_f1_delta']:+.4f}",
                f"{row['reports_per_second']:.2f}",
                f"{row['cpu_seconds_per_report']:.3f}",
            ]
        )
    header = ["option", "identical reports", "CE macro-F1", "delta vs fp32", "reports/s", "CPU s/report"]
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
    parser.add_argument(
        "--int8_scopes",
        nargs="+",
        default=[],
        choices=list(INT8_SCOPES),
        help="also run int8 with each of these scopes (which linear layers are quantised; inference_cdan.INT8_SCOPES)",
    )
    parser.add_argument(
        "--onnxruntime_int8_scopes",
        nargs="+",
        default=[],
        choices=list(INT8_SCOPES),
        help="also run ONNX Runtime, in float32 and quantised with each of these scopes (quantize_onnx_int8)",
    )
    parser.add_argument(
        "--onnxruntime_extractor_int8_scopes",
        nargs="+",
        default=[],
        choices=[NO_SCOPE, *INT8_SCOPES],
        help="also run ONNX Runtime with the visual extractor in static int8 (quantize_onnx_extractor_int8), and the "
        f"linear layers of each of these scopes in dynamic int8 ({NO_SCOPE!r}: none)",
    )
    parser.add_argument("--calibration_split", default="train", help="split whose studies calibrate static int8")
    parser.add_argument("--calibration_studies", type=int, default=64, help="studies that calibrate static int8")
    parser.add_argument(
        "--calibration_method", default="Percentile", help="onnxruntime.quantization.CalibrationMethod of static int8"
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
    for name, options in options_to_run(args.options, args.int8_scopes).items():
        print(f"{name}: generating {len(dataset)} reports", file=sys.stderr, flush=True)
        try:
            results[name] = run_option(model, processor, dataset, options, args.batch_size, **generation_kwargs)
        except ValueError as error:
            if name == REFERENCE_OPTION:
                raise
            skipped[name] = str(error)
    onnx_runs = [(None, False)] if args.onnxruntime_int8_scopes or args.onnxruntime_extractor_int8_scopes else []
    onnx_runs += [(scope, False) for scope in args.onnxruntime_int8_scopes]
    onnx_runs += [(None if scope == NO_SCOPE else scope, True) for scope in args.onnxruntime_extractor_int8_scopes]
    calibration_dataset = None
    if args.onnxruntime_extractor_int8_scopes:
        calibration_dataset = load_cdan_dataset(args.dataset_name, data_dir=args.data_dir)[args.calibration_split]
        calibration_dataset = calibration_dataset.select(
            range(min(args.calibration_studies, len(calibration_dataset)))
        )
    for scope, extractor_int8 in onnx_runs:
        name = onnx_label(scope, extractor_int8)
        print(f"{name}: generating {len(dataset)} reports", file=sys.stderr, flush=True)
        results[name] = run_onnx_option(
            model, processor, dataset, scope, args.batch_size,
            calibration_dataset=calibration_dataset if extractor_int8 else None,
            calibration_method=args.calibration_method, **generation_kwargs,
        )  # fmt: skip
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


__all__ = [
    "agreement_table",
    "generate_onnx_reports",
    "identical_fraction",
    "int8_scope_label",
    "main",
    "onnx_label",
    "options_to_run",
    "run_onnx_option",
    "run_option",
]
