"""Train the semi-supervised lesion detector (detection_cdan.py) on a data set with boxes, evaluate its mAP@0.5 on
the test split, and write its boxes for every split.

    OMP_NUM_THREADS=1 python scripts/train_detector.py --dataset demo --labelled_fraction 0.1 \
        --mode semi_supervised --output_dir runs/detector

A seeded `labelled_fraction` of the training studies keeps its boxes (the labelled images); the other training
studies are the unlabelled images (their boxes are never read). Validation and test boxes are only used to evaluate.
Writes under `--output_dir`: `metrics.json` (the settings, the training time, AP@0.5 per class and the mean over the
classes with a test box), `history.jsonl` (losses per step), the detector (`detector.pt`, its state dict, and
`detector_config.json`, its build arguments and labels; `detection_cdan.load_detector` reads them) and, unless
`--skip_box_file`, `boxes.jsonl` (one line per image of every split: `study_id`, `split`, `image_index`, `view`,
`image_size`, and the detections as `BOX_FEATURES` dicts with `source="pseudo"`; see `detection_cdan.write_box_file`).
To write the box file of another data set (IU X-Ray, MIMIC-CXR) with the saved detector, run
`scripts/predict_boxes.py --detector_dir <output_dir>`.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

from data_cdan import boxes_from_rows, load_cdan_dataset
from data_cdan.synthetic_cxr import BOXED_OBSERVATIONS
from detection_cdan import (
    BACKBONES,
    TRAINING_MODES,
    DetectionSample,
    TeacherStudentConfig,
    average_precision,
    build_detector,
    predict,
    sample_from_boxes,
    save_detector,
    train_teacher_student,
    write_box_file,
)


@dataclass
class DetectorArguments:
    output_dir: str = field(metadata={"help": "Where to write the metrics, the model and the box file."})
    dataset: str = field(default="demo", metadata={"help": "A data set with a `boxes` column (the demo)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Root of the prepared data sets."})
    max_studies_per_split: int | None = field(default=None, metadata={"help": "Use only N studies per split."})
    labelled_fraction: float = field(default=0.1, metadata={"help": "Fraction of training studies with boxes."})
    mode: str = field(default="semi_supervised", metadata={"help": f"One of {TRAINING_MODES}."})
    backbone: str = field(default="tiny", metadata={"help": f"One of {BACKBONES} (resnet50: D2R-Net's R50-FPN)."})
    pretrained_backbone: bool = field(default=False, metadata={"help": "Start a ResNet from ImageNet weights."})
    detector_image_size: int = field(default=256, metadata={"help": "Side the detector resizes images to."})
    focal_gamma: float | None = field(default=1.5, metadata={"help": "Focal ROI classification loss gamma."})
    iterations: int = field(default=300, metadata={"help": "Optimiser steps."})
    burn_in: int = field(default=100, metadata={"help": "Supervised steps before the teacher starts."})
    batch_size: int = field(default=4, metadata={"help": "Labelled (and unlabelled) images per step."})
    learning_rate: float = field(default=0.01, metadata={"help": "SGD learning rate."})
    ema_decay: float = field(default=0.9996, metadata={"help": "Teacher EMA decay (D2R-Net: 0.9996)."})
    pseudo_threshold: float = field(default=0.89, metadata={"help": "Pseudo-box score threshold (D2R-Net: 0.89)."})
    unsupervised_weight: float = field(default=1.0, metadata={"help": "Weight of the pseudo-box losses."})
    seed: int = field(default=0, metadata={"help": "Seed of the labelled selection, the batches and the model."})
    skip_box_file: bool = field(default=False, metadata={"help": "Do not predict and write boxes.jsonl."})


def split_samples(dataset, split: str) -> list[DetectionSample]:
    """One [`DetectionSample`] per image of a split, with the image's boxes from the `boxes` column."""
    if "boxes" not in dataset.column_names:
        raise ValueError(f"The {split} split has no 'boxes' column; train the detector on a data set with boxes.")
    samples = []
    for row in dataset:
        for index, (image, view, boxes) in enumerate(zip(row["images"], row["views"], row["boxes"])):
            key = {"study_id": row["id"], "split": split, "image_index": index, "view": view}
            samples.append(sample_from_boxes(image, boxes_from_rows(boxes), BOXED_OBSERVATIONS, key))
    return samples


def select_labelled(
    samples: list[DetectionSample], fraction: float, seed: int
) -> tuple[list[DetectionSample], list[DetectionSample]]:
    """
    A seeded choice of `round(fraction * studies)` training studies (at least 1) whose images keep their boxes; the
    images of the other studies are returned without boxes.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"labelled_fraction must be in (0, 1], got {fraction}.")
    studies = sorted({sample.key["study_id"] for sample in samples})
    count = max(1, round(fraction * len(studies)))
    chosen = {studies[index] for index in np.random.default_rng(seed).choice(len(studies), count, replace=False)}
    labelled = [sample for sample in samples if sample.key["study_id"] in chosen]
    unlabelled = [
        DetectionSample(sample.image, sample.boxes[:0], sample.labels[:0], sample.key)
        for sample in samples
        if sample.key["study_id"] not in chosen
    ]
    return labelled, unlabelled


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(DetectorArguments).parse_args_into_dataclasses(args=argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    options = {} if args.max_studies_per_split is None else {"max_studies_per_split": args.max_studies_per_split}
    dataset_dict = load_cdan_dataset(args.dataset, cache_dir=args.cache_dir, **options)
    samples = {split: split_samples(dataset, split) for split, dataset in dataset_dict.items()}
    labelled, unlabelled = select_labelled(samples["train"], args.labelled_fraction, args.seed)
    model = build_detector(
        len(BOXED_OBSERVATIONS),
        backbone=args.backbone,
        pretrained_backbone=args.pretrained_backbone,
        image_size=args.detector_image_size,
        focal_gamma=args.focal_gamma,
    )
    config = TeacherStudentConfig(
        mode=args.mode,
        iterations=args.iterations,
        burn_in=args.burn_in,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        ema_decay=args.ema_decay,
        pseudo_threshold=args.pseudo_threshold,
        unsupervised_weight=args.unsupervised_weight,
        seed=args.seed,
    )
    start = time.perf_counter()
    detector, history = train_teacher_student(model, labelled, unlabelled, config)
    training_seconds = time.perf_counter() - start
    save_detector(
        detector,
        output_dir,
        BOXED_OBSERVATIONS,
        backbone=args.backbone,
        image_size=args.detector_image_size,
        focal_gamma=args.focal_gamma,
    )
    with open(output_dir / "history.jsonl", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in history)
    test = samples["test"]
    start = time.perf_counter()
    predictions = predict(detector, test, description="test")
    truths = [{"boxes": sample.boxes, "labels": sample.labels} for sample in test]
    per_class = average_precision(predictions, truths, len(BOXED_OBSERVATIONS))
    metrics = {
        "arguments": asdict(args),
        "labelled_studies": len({sample.key["study_id"] for sample in labelled}),
        "labelled_images": len(labelled),
        "labelled_boxes": sum(len(sample.boxes) for sample in labelled),
        "unlabelled_images": len(unlabelled),
        "training_seconds": round(training_seconds, 1),
        "test_images": len(test),
        "map50": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
        "ap50": {BOXED_OBSERVATIONS[label - 1]: value for label, value in per_class.items()},
    }
    if not args.skip_box_file:
        everything = [sample for split in samples.values() for sample in split]
        others = [sample for sample in everything if sample.key["split"] != "test"]
        all_predictions = predict(detector, others, description="box file") + predictions
        metrics["box_file_boxes"] = write_box_file(
            output_dir / "boxes.jsonl", others + test, all_predictions, BOXED_OBSERVATIONS
        )
    metrics["prediction_seconds"] = round(time.perf_counter() - start, 1)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(f"mAP@0.5 on {len(test)} test images: {metrics['map50']:.4f} ({training_seconds:.0f} s training)")
    return metrics


if __name__ == "__main__":
    main()


__all__ = ["DetectorArguments", "main", "select_labelled", "split_samples"]
