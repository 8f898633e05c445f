"""Measure whether a model grounds its sentences on the right lesion boxes, on the demo data set's true boxes.

    python scripts/evaluate_grounding.py --model outputs/d2r_demo
    python scripts/evaluate_grounding.py --model outputs/d2r_demo --boxes_file detector_boxes.jsonl

For every study of the split, the model reads the input boxes (the data set's true boxes, or those of `--boxes_file`,
a JSON-lines file as `scripts/predict_boxes.py` writes it, rescaled to each image) and grounds each sentence on them
(the pipeline's `return_grounding`): of its generated report, and separately of the reference report (the cleaned
`findings`, scored with [`CdanReportPipeline.ground_report`]). A sentence counts when the labeler
(`labeler_cdan.label_report`) finds it POSITIVE for an observation with a true box in that study; its targets are the
true boxes of those observations. Its top box is the input box with the highest grounding score, and

- a hit when its IoU with a target box of the same view is at least `--iou_threshold` (0.3);
- a pointing-game hit when its centre lies inside a target box of the same view (edges included).

Studies without a true box have no counted sentence and are skipped (`--max_samples` counts studies with true boxes).
The chance rates are the same measures for a uniformly random input box of the study, averaged over the same sentences
(with true boxes as input every box is a lesion, so chance is far from zero). A sentence whose study has no input box
counts as a miss, also for chance.

Prints a Markdown table (hit rates with the number of sentences, beside their chance rates) and writes
`grounding.json` (the rates, overall and per observation) and `grounding.md` under `--output_dir`
(default: `<model>/grounding_<split>`).

References: Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016 (the pointing game); Tang et
al., "From Detection to Radiology Report Generation" (D2R-Net), J Imaging Inform Med 2025 (sentence-to-box grounding).
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import HfArgumentParser

from cli_cdan import load_reporter
from consistency_cdan import split_sentences
from data_cdan import load_cdan_dataset
from data_cdan.boxes import LesionBox, box_iou, boxes_from_rows, boxes_to_rows, read_box_file, rescale_boxes
from evaluation_cdan import reference_reports
from labeler_cdan import CHEXPERT_OBSERVATIONS, POSITIVE, label_report

SENTENCE_KINDS = ("generated", "reference")
"""The two sets of sentences measured: of the generated reports, and of the reference reports."""


@dataclass
class GroundingArguments:
    model: str = field(metadata={"help": "A D2R-Net checkpoint folder (or CDAN with use_lesion_alignment)."})
    dataset_name: str = field(default="demo", metadata={"help": "A data set with true boxes (the demo)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder with the downloaded data set."})
    split: str = field(default="test", metadata={"help": "Split to measure."})
    boxes_file: str | None = field(
        default=None,
        metadata={"help": "JSON-lines box file of the input boxes (a detector's); the true boxes by default."},
    )
    iou_threshold: float = field(default=0.3, metadata={"help": "IoU of the top box with a target box for a hit."})
    num_beams: int = field(default=3, metadata={"help": "Beam size of the generated reports."})
    max_length: int | None = field(default=None, metadata={"help": "Longest report; the checkpoint's by default."})
    max_samples: int | None = field(
        default=None, metadata={"help": "Measure only the first N studies with true boxes."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where to write; default <model>/grounding_<split>."}
    )


@dataclass
class GroundingTally:
    """Sums over the counted sentences: top-box hits and pointing hits, and their chance expectations."""

    sentences: int = 0
    hits: float = 0.0
    chance_hits: float = 0.0
    pointing_hits: float = 0.0
    chance_pointing_hits: float = 0.0

    def add(self, scores: Mapping[str, float]) -> None:
        self.sentences += 1
        for name in ("hits", "chance_hits", "pointing_hits", "chance_pointing_hits"):
            setattr(self, name, getattr(self, name) + scores[name])

    def rates(self) -> dict[str, float | int]:
        """The counts as rates over the sentences (NaN-free: 0 sentences give rates of 0)."""
        count = max(self.sentences, 1)
        return {
            "sentences": self.sentences,
            "top_box_hit_rate": self.hits / count,
            "chance_hit_rate": self.chance_hits / count,
            "pointing_game": self.pointing_hits / count,
            "chance_pointing_game": self.chance_pointing_hits / count,
        }


def true_boxes_by_observation(study_boxes: Sequence[Sequence[Mapping[str, Any]] | None]) -> dict[str, list]:
    """A study's true boxes (one `BOX_FEATURES` list per view) by label: `{observation: [(view, LesionBox), ...]}`."""
    by_observation: dict[str, list[tuple[int, LesionBox]]] = {}
    for view, view_boxes in enumerate(study_boxes):
        for box in boxes_from_rows(view_boxes or []):
            by_observation.setdefault(box.label, []).append((view, box))
    return by_observation


def counted_observations(sentence: str, true_boxes: Mapping[str, list]) -> list[str]:
    """The observations a sentence is POSITIVE for (labeler) that have a true box in the study."""
    states = label_report(sentence)
    return [name for name, state in zip(CHEXPERT_OBSERVATIONS, states) if state == POSITIVE and name in true_boxes]


def as_box(entry: Mapping[str, Any]) -> LesionBox:
    """A grounding entry's box as a `LesionBox`."""
    return LesionBox(*entry["box"], label="")


def is_hit(entry: Mapping[str, Any], targets: Sequence[tuple[int, LesionBox]], iou_threshold: float) -> bool:
    """IoU of the entry's box with a target box of the same view at least `iou_threshold`."""
    box = as_box(entry)
    return any(view == entry["view"] and box_iou(box, target) >= iou_threshold for view, target in targets)


def is_pointing_hit(entry: Mapping[str, Any], targets: Sequence[tuple[int, LesionBox]]) -> bool:
    """The centre of the entry's box inside a target box of the same view (edges included)."""
    x_min, y_min, x_max, y_max = entry["box"]
    x, y = (x_min + x_max) / 2, (y_min + y_max) / 2
    return any(
        view == entry["view"] and target.x_min <= x <= target.x_max and target.y_min <= y <= target.y_max
        for view, target in targets
    )


def score_sentence(
    candidates: Sequence[Mapping[str, Any]], targets: Sequence[tuple[int, LesionBox]], iou_threshold: float = 0.3
) -> dict[str, float]:
    """
    The measures of one counted sentence.

    Args:
        candidates (`Sequence[dict]`): its grounding entries (`view`, `box`, `score`), best first (the pipeline's
            order); the first is the top box.
        targets (`Sequence[tuple[int, LesionBox]]`): the true boxes of its observations, with their views.
        iou_threshold (`float`, *optional*, defaults to 0.3): IoU for a hit.

    Returns:
        `dict[str, float]`: `hits` and `pointing_hits` (0 or 1) of the top box, and `chance_hits` and
        `chance_pointing_hits`, the same for a uniformly random candidate (0 without candidates).
    """
    if not candidates:
        return dict.fromkeys(("hits", "chance_hits", "pointing_hits", "chance_pointing_hits"), 0.0)
    hits = [is_hit(entry, targets, iou_threshold) for entry in candidates]
    pointing = [is_pointing_hit(entry, targets) for entry in candidates]
    top = max(range(len(candidates)), key=lambda index: candidates[index]["score"])  # the first of equal best
    return {
        "hits": float(hits[top]),
        "chance_hits": sum(hits) / len(hits),
        "pointing_hits": float(pointing[top]),
        "chance_pointing_hits": sum(pointing) / len(pointing),
    }


def tally_grounding(
    grounding: Sequence[Mapping[str, Any]],
    true_boxes: Mapping[str, list],
    overall: GroundingTally,
    per_observation: dict[str, GroundingTally],
    iou_threshold: float,
) -> None:
    """Add the counted sentences of one report's grounding to `overall` and to each of their observations."""
    for item in grounding:
        observations = counted_observations(item["sentence"], true_boxes)
        if not observations:
            continue
        targets = [target for name in observations for target in true_boxes[name]]
        scores = score_sentence(item["boxes"], targets, iou_threshold)
        overall.add(scores)
        for name in observations:
            name_scores = score_sentence(item["boxes"], true_boxes[name], iou_threshold)
            per_observation.setdefault(name, GroundingTally()).add(name_scores)


def input_boxes_from_file(box_index: Mapping, study_id: str, images: Sequence) -> list[list[dict[str, Any]]]:
    """A study's boxes from a box file (`read_box_file`), rescaled to each of its images; none for a missing view."""
    study_boxes = []
    for image_index, image in enumerate(images):
        entry = box_index.get((str(study_id), image_index))
        if entry is None:
            study_boxes.append([])
            continue
        size, boxes = entry
        study_boxes.append(boxes_to_rows(rescale_boxes(boxes, from_image_size=size, to_image_size=image.size)))
    return study_boxes


def markdown_table(results: Mapping[str, Mapping[str, float]], iou_threshold: float) -> str:
    """The rates of the generated and the reference sentences, beside their chance rates."""
    lines = [
        f"| sentences | count | top box IoU >= {iou_threshold:g} | chance | pointing game | chance |",
        "|---|---|---|---|---|---|",
    ]
    for kind in SENTENCE_KINDS:
        rates = results[kind]
        lines.append(
            f"| {kind} | {rates['sentences']} | {rates['top_box_hit_rate']:.3f} | {rates['chance_hit_rate']:.3f} "
            f"| {rates['pointing_game']:.3f} | {rates['chance_pointing_game']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = HfArgumentParser(GroundingArguments).parse_args_into_dataclasses(args=argv)
    reporter = load_reporter(args.model)
    reporter.check_grounding_model()
    split = load_cdan_dataset(args.dataset_name, data_dir=args.data_dir)[args.split]
    if "boxes" not in split.column_names:
        raise ValueError(f"The {args.dataset_name} {args.split} split has no true `boxes` column to measure against.")
    num_studies = len(split)
    boxed = [index for index, study_boxes in enumerate(split["boxes"]) if any(study_boxes)]  # the others count nothing
    split = split.select(boxed[: args.max_samples])
    box_index = read_box_file(args.boxes_file) if args.boxes_file else None
    references = reference_reports(reporter.processor, split)
    generation_kwargs = {"num_beams": args.num_beams}
    if args.max_length is not None:
        generation_kwargs["max_length"] = args.max_length
    overall = {kind: GroundingTally() for kind in SENTENCE_KINDS}
    per_observation: dict[str, dict[str, GroundingTally]] = {kind: {} for kind in SENTENCE_KINDS}
    for row, reference in tqdm(zip(split, references), total=len(split), desc="Grounding", unit="study"):
        input_boxes = row["boxes"] if box_index is None else input_boxes_from_file(box_index, row["id"], row["images"])
        true_boxes = true_boxes_by_observation(row["boxes"])
        study = {"images": row["images"], "boxes": input_boxes}
        if any(input_boxes):
            (result,) = reporter(study, return_grounding=True, **generation_kwargs)
            groundings = {"generated": result["grounding"], "reference": reporter.ground_report(study, reference)}
        else:  # nothing to ground on (a box file without this study): every counted sentence is a miss
            (result,) = reporter({"images": row["images"]}, **generation_kwargs)
            reports = {"generated": result["generated_text"], "reference": reference}
            groundings = {
                kind: [{"sentence": sentence, "boxes": []} for sentence in split_sentences(report)]
                for kind, report in reports.items()
            }
        for kind, grounding in groundings.items():
            tally_grounding(grounding, true_boxes, overall[kind], per_observation[kind], args.iou_threshold)
    results = {kind: overall[kind].rates() for kind in SENTENCE_KINDS}
    table = markdown_table(results, args.iou_threshold)
    summary = {
        "model": args.model,
        "split": args.split,
        "studies": num_studies,
        "studies_with_true_boxes": len(split),
        "input_boxes": args.boxes_file or "true boxes",
        "iou_threshold": args.iou_threshold,
        **results,
        "per_observation": {
            kind: {name: tally.rates() for name, tally in sorted(tallies.items())}
            for kind, tallies in per_observation.items()
        },
        "arguments": asdict(args),
    }
    output_dir = Path(args.output_dir or Path(args.model) / f"grounding_{args.split}")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "grounding.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (output_dir / "grounding.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"grounding.json and grounding.md written to {output_dir}")
    return summary


if __name__ == "__main__":
    main()


__all__ = [
    "SENTENCE_KINDS",
    "GroundingArguments",
    "GroundingTally",
    "counted_observations",
    "input_boxes_from_file",
    "is_hit",
    "is_pointing_hit",
    "main",
    "markdown_table",
    "score_sentence",
    "tally_grounding",
    "true_boxes_by_observation",
]
