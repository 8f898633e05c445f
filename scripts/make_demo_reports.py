"""Reproduces `data/demo/reports.jsonl`, the verbatim Open-I report text of the embedded demo dataset.

The demo ships about 1,000 IU X-Ray studies of the R2Gen split (Chen et al., "Generating Radiology Reports via
Memory-driven Transformer", EMNLP 2020) with their Open-I report sections copied verbatim from the Indiana University
Chest X-ray Collection (Demner-Fushman et al., JAMIA 23(2), 2016; CC BY-NC-ND 4.0, so no field is edited). It reads
the text staged in `iu_xray` of the shared data folder (`$CDAN_SHARED_DATA`, by default `../shared/data`):
`annotation.json` (R2Gen split membership), `r2gen_to_openi_crosswalk.json` (R2Gen id -> Open-I uid) and
`openi_reports.jsonl` (the parsed Open-I reports).

Selection rule (per R2Gen split, quotas train 700 / val 100 / test 200):

1. Candidates are the R2Gen studies of the split (all have a FINDINGS section).
2. A study is *abnormal* when one sentence of its FINDINGS or IMPRESSION contains a finding term of `FINDING_TERMS`
   and no negation word of `NEGATION_WORDS`; it is *rare-abnormal* when such a sentence contains a term of
   `RARE_FINDING_TERMS`. This rough rule only enriches the sample; the demo's labels come from `labeler_cdan`.
3. With `random.Random(SELECTION_SEED)`, each group is shuffled (in R2Gen annotation order before shuffling). The
   split's abnormal quota (`ABNORMAL_FRACTION` of its size) is filled with rare-abnormal studies first, then other
   abnormal ones; the rest of the split is filled with the other studies (normal first, then any abnormal left).
4. Records are written in split order (train, val, test) and, within a split, in R2Gen annotation order.

Usage:
    python scripts/make_demo_reports.py [--shared ../shared/data/iu_xray] [--output data/demo/reports.jsonl]
"""

import argparse
import json
import random
import re
from pathlib import Path

from data_cdan import DEMO_REPORTS_FILE
from data_cdan.testing import IU_XRAY

DEFAULT_SHARED = IU_XRAY
DEFAULT_OUTPUT = DEMO_REPORTS_FILE

SPLIT_QUOTAS = {"train": 700, "val": 100, "test": 200}
SELECTION_SEED = 2025
ABNORMAL_FRACTION = 0.65
FIELDS = ("r2gen_id", "openi_uid", "split", "findings", "impression", "indication", "comparison")

FINDING_TERMS = (
    "cardiomegaly",
    "enlarged",
    "widen",
    "opacit",
    "infiltrat",
    "consolidat",
    "pneumonia",
    "atelecta",
    "edema",
    "effusion",
    "pneumothora",
    "nodul",
    "mass",
    "lesion",
    "fracture",
    "pacemaker",
    "sternotomy",
    "catheter",
    "picc",
    "tube",
    "thickening",
    "congestion",
    "airspace disease",
)
RARE_FINDING_TERMS = (
    "pneumothora",
    "effusion",
    "edema",
    "consolidat",
    "pneumonia",
    "fracture",
    "mass",
    "thickening",
    "pacemaker",
    "catheter",
    "picc",
    "widen",
)
NEGATION_WORDS = re.compile(r"\b(no|not|without|negative|free of|clear of|resolved|removed|normal)\b")
SENTENCE_BREAK = re.compile(r"[.;]\s+|[.;]$|\n")


def finding_sentences(report: dict) -> list[str]:
    """Lower-cased sentences of the FINDINGS and IMPRESSION that mention no negation word."""
    text = f"{report.get('findings') or ''}\n{report.get('impression') or ''}".lower()
    return [sentence for sentence in SENTENCE_BREAK.split(text) if sentence and not NEGATION_WORDS.search(sentence)]


def selection_group(report: dict) -> str:
    """ "rare", "abnormal" or "normal", by the keyword rule of the module docstring."""
    sentences = finding_sentences(report)
    if any(term in sentence for sentence in sentences for term in RARE_FINDING_TERMS):
        return "rare"
    if any(term in sentence for sentence in sentences for term in FINDING_TERMS):
        return "abnormal"
    return "normal"


def select_demo_studies(annotation: dict, crosswalk: list[dict], reports: dict[int, dict]) -> list[dict]:
    """
    Applies the selection rule.

    Args:
        annotation (`dict`): R2Gen `annotation.json` ({"train", "val", "test"} -> entries with "id").
        crosswalk (`list[dict]`): `r2gen_to_openi_crosswalk.json` entries with "id" and "uid".
        reports (`dict[int, dict]`): Open-I reports by uid.

    Returns:
        The demo records (fields `FIELDS`), in split order, then R2Gen annotation order.
    """
    uid_by_id = {entry["id"]: entry["uid"] for entry in crosswalk}
    rng = random.Random(SELECTION_SEED)
    records = []
    for split, quota in SPLIT_QUOTAS.items():
        order = {entry["id"]: position for position, entry in enumerate(annotation[split])}
        groups: dict[str, list[str]] = {"rare": [], "abnormal": [], "normal": []}
        for entry in annotation[split]:
            groups[selection_group(reports[uid_by_id[entry["id"]]])].append(entry["id"])
        for members in groups.values():
            rng.shuffle(members)
        abnormal = groups["rare"] + groups["abnormal"]
        abnormal_quota = round(ABNORMAL_FRACTION * quota)
        chosen = abnormal[:abnormal_quota]
        chosen += (groups["normal"] + abnormal[abnormal_quota:])[: quota - len(chosen)]
        for study_id in sorted(chosen, key=order.__getitem__):
            report = reports[uid_by_id[study_id]]
            records.append(
                {
                    "r2gen_id": study_id,
                    "openi_uid": report["uid"],
                    "split": split,
                    **{name: report[name] for name in ("findings", "impression", "indication", "comparison")},
                }
            )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="folder with the staged IU X-Ray text")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON-lines file to write")
    arguments = parser.parse_args()
    annotation = json.loads((arguments.shared / "annotation.json").read_text(encoding="utf-8"))
    crosswalk = json.loads((arguments.shared / "r2gen_to_openi_crosswalk.json").read_text(encoding="utf-8"))
    with open(arguments.shared / "openi_reports.jsonl", encoding="utf-8") as lines:
        reports = {report["uid"]: report for report in map(json.loads, lines)}
    records = select_demo_studies(annotation, crosswalk, reports)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    with open(arguments.output, "w", encoding="utf-8") as output:
        output.writelines(
            json.dumps({name: record[name] for name in FIELDS}, ensure_ascii=False) + "\n" for record in records
        )
    counts = {split: sum(record["split"] == split for record in records) for split in SPLIT_QUOTAS}
    print(f"wrote {len(records)} studies {counts} to {arguments.output} ({arguments.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()


__all__ = ["SPLIT_QUOTAS", "select_demo_studies", "selection_group"]
