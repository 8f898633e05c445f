"""Validate the rule-based CheXpert labeler (`labeler_cdan.py`) against IU X-Ray's expert MeSH tags.

Every Open-I report that has MeSH tags (the R2Gen train and val splits, and the Open-I reports R2Gen does not use; the
R2Gen test split's tags are withheld, and reports indexed "No Indexing" are left out) is labeled from its findings
and impression, and the labeler's positives are compared with the observations its MeSH terms map to
(`mesh_cdan.labels_from_mesh`). The script prints, for each requested split, a Markdown table of per-observation
precision, recall, F1 and support, the macro-F1 over the nine headline observations (Atelectasis, Cardiomegaly,
Edema, Fracture, Lung Lesion, Lung Opacity, No Finding, Pleural Effusion, Support Devices), and the labeling
throughput in reports per second on one process.

References: Irvin et al., CheXpert (AAAI 2019); Demner-Fushman et al., Open-I / IU X-Ray (JAMIA 2016).

Command (from the repository root), as used for `docs/labeler.md`:

    python scripts/evaluate_labeler.py --data_dir ../shared/data/iu_xray --output_json /tmp/labeler_eval.json

Options: `--splits all train+val train val outside` (default: `all train+val train val`); `--uncertain_as 0`
(default: UNCERTAIN counts as negative, because the MeSH indexers do not index merely possible findings; `1` counts
it as positive); `--no_finding_rule strict` (default) or `chexpert`; `--show_errors Atelectasis` prints the false
positives and negatives of one observation on the train split, with the mentions the labeler found.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmark_utils import markdown_table
from evaluation_cdan import macro_f1, precision_recall_f1
from labeler_cdan import CHEXPERT_OBSERVATIONS, EVALUATION_OBSERVATIONS, CheXpertRuleLabeler, to_binary
from mesh_cdan import labels_from_mesh, load_mesh_validation_set, report_text


SPLIT_GROUPS = {
    "all": ("train", "val", "outside"),
    "train": ("train",),
    "val": ("val",),
    "outside": ("outside",),
    "train+val": ("train", "val"),
}
"""Named report groups: R2Gen splits, the Open-I reports outside R2Gen, and "all" tagged reports."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_data_dir = Path(__file__).resolve().parents[2] / "shared" / "data" / "iu_xray"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, default=default_data_dir, help="Folder with openi_reports.jsonl.")
    parser.add_argument(
        "--splits", nargs="+", default=["all", "train+val", "train", "val"], choices=sorted(SPLIT_GROUPS)
    )
    parser.add_argument("--uncertain_as", type=int, default=0, choices=[0, 1], help="Binary value of UNCERTAIN.")
    parser.add_argument("--no_finding_rule", default="strict", choices=["strict", "chexpert"])
    parser.add_argument("--output_json", type=Path, default=None, help="Also write all scores to this JSON file.")
    parser.add_argument("--show_errors", default=None, choices=CHEXPERT_OBSERVATIONS, help="Print train errors.")
    parser.add_argument("--max_errors", type=int, default=40)
    return parser.parse_args(argv)


def scores_table(scores: dict[str, dict[str, float]]) -> str:
    """Per-observation scores as a Markdown table (headline observations marked with *)."""
    rows = []
    for name in CHEXPERT_OBSERVATIONS:
        row = scores[name]
        marker = "*" if name in EVALUATION_OBSERVATIONS else ""
        rates = [f"{row[key]:.3f}" for key in ("precision", "recall", "f1")]
        rows.append([name + marker, *rates, row["support"], row["predicted"]])
    return markdown_table(["observation", "precision", "recall", "F1", "support", "predicted"], rows)


def measure_throughput(labeler: CheXpertRuleLabeler, texts: list[str], repeats: int = 3) -> float:
    """Reports labeled per second (best of `repeats` passes over `texts`, one process)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        labeler.label_many(texts)
        best = min(best, time.perf_counter() - started)
    return len(texts) / best


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    labeler = CheXpertRuleLabeler(no_finding_rule=args.no_finding_rule)
    reports = load_mesh_validation_set(args.data_dir)
    texts = [report_text(report) for report in reports]
    predicted_states = labeler.label_many(texts)
    predictions = [to_binary(states, uncertain_as=args.uncertain_as) for states in predicted_states]
    references = [labels_from_mesh(report["mesh_major"]) for report in reports]

    results: dict = {
        "uncertain_as": args.uncertain_as,
        "no_finding_rule": args.no_finding_rule,
        "evaluation_observations": list(EVALUATION_OBSERVATIONS),
        "splits": {},
    }
    for group in args.splits:
        members = [i for i, report in enumerate(reports) if report["split"] in SPLIT_GROUPS[group]]
        scores = precision_recall_f1([predictions[i] for i in members], [references[i] for i in members])
        results["splits"][group] = {"reports": len(members), "macro_f1": macro_f1(scores), "scores": scores}
        print(f"\n### {group} ({len(members)} reports, UNCERTAIN as {args.uncertain_as})\n")
        print(scores_table(scores))
        print(f"\nmacro-F1 over the nine headline observations (*): {macro_f1(scores):.4f}")

    throughput = measure_throughput(labeler, texts)
    results["throughput_reports_per_second"] = throughput
    print(f"\nthroughput: {throughput:,.0f} reports/s ({len(texts)} reports, one process)")

    if args.show_errors:
        column = CHEXPERT_OBSERVATIONS.index(args.show_errors)
        shown = {"false positive": 0, "false negative": 0}
        for index, report in enumerate(reports):
            if report["split"] != "train" or predictions[index][column] == references[index][column]:
                continue
            kind = "false positive" if predictions[index][column] else "false negative"
            if shown[kind] >= args.max_errors:
                continue
            shown[kind] += 1
            mentions = [
                (m.text, m.state) for m in labeler.extract_mentions(texts[index]) if args.show_errors in m.observations
            ]
            print(f"\n[{kind}] uid {report['uid']} mesh={report['mesh_major']}")
            print(f"  {texts[index]!r}\n  mentions={mentions}")

    if args.output_json:
        args.output_json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()


__all__ = ["SPLIT_GROUPS", "main", "measure_throughput", "parse_args", "scores_table"]
