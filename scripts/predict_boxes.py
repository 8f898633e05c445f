"""Write the lesion box file of a data set with a saved detector (`detection_cdan.load_detector`), for its builder's
`boxes_file` option. The D2R-Net pipeline is: train the detector on labelled and unlabelled images
(`scripts/train_detector.py`), predict boxes for IU X-Ray or MIMIC-CXR here, then prepare that data set with the file:

    OMP_NUM_THREADS=1 python scripts/predict_boxes.py --detector_dir runs/detector --dataset iu_xray \
        --data_dir data/iu_xray --output_file runs/iu_xray_boxes.jsonl
    python -c "from data_cdan import load_cdan_dataset; load_cdan_dataset('iu_xray', data_dir='data/iu_xray', \
        boxes_file='runs/iu_xray_boxes.jsonl')"

Every image of every row of the chosen splits gets one line (`study_id` = the row's `id`, `split`, `image_index` =
the image's position in the row's `images`, `view`, `image_size` and the detections, best first, as `BOX_FEATURES`
dicts with `source="pseudo"`; see `detection_cdan.write_box_file`). Images stream through the detector in batches, so
the data set never sits in memory; the file appears only when complete. `--dataset_options` passes builder options
as JSON (e.g. `'{"layout": "r2gen"}'`); they must match those the data set is later prepared with, since rows and
image positions are matched by `id` and `image_index`.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import HfArgumentParser

from data_cdan import SPLITS, load_cdan_dataset
from detection_cdan import DetectionSample, load_detector, predict_box_file, sample_from_boxes


@dataclass
class PredictBoxesArguments:
    detector_dir: str = field(metadata={"help": "Folder of a saved detector (detector.pt, detector_config.json)."})
    output_file: str = field(metadata={"help": "The box file (JSON lines) to write."})
    dataset: str = field(default="iu_xray", metadata={"help": "iu_xray, mimic_cxr or demo."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder with the data set's input files."})
    cache_dir: str | None = field(default=None, metadata={"help": "Root of the prepared data sets."})
    splits: str = field(default=",".join(SPLITS), metadata={"help": "Comma-separated splits to predict."})
    max_studies_per_split: int | None = field(default=None, metadata={"help": "Use only N studies per split."})
    dataset_options: str = field(default="{}", metadata={"help": "Builder options as a JSON object."})
    batch_size: int = field(default=8, metadata={"help": "Images per detector forward pass."})


def dataset_samples(dataset_dict: datasets.DatasetDict, splits: list[str]) -> Iterator[DetectionSample]:
    """One [`DetectionSample`] (no boxes) per image of every row of `splits`, keyed like the training box file."""
    for split in splits:
        for row in dataset_dict[split]:
            for index, (image, view) in enumerate(zip(row["images"], row["views"])):
                key = {"study_id": row["id"], "split": split, "image_index": index, "view": view}
                yield sample_from_boxes(image, [], [], key)


def main(argv: list[str] | None = None) -> dict[str, int]:
    (args,) = HfArgumentParser(PredictBoxesArguments).parse_args_into_dataclasses(args=argv)
    splits = [split.strip() for split in args.splits.split(",") if split.strip()]
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"--splits must name some of {list(SPLITS)}, got {args.splits!r}.")
    try:
        options = json.loads(args.dataset_options)
    except json.JSONDecodeError as error:
        raise ValueError(f"--dataset_options is not JSON ({error}): {args.dataset_options!r}") from error
    if not isinstance(options, dict):
        raise ValueError(f"--dataset_options must be a JSON object, got {args.dataset_options!r}.")
    if args.max_studies_per_split is not None:
        options["max_studies_per_split"] = args.max_studies_per_split
    detector, labels = load_detector(args.detector_dir)
    dataset_dict = load_cdan_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir, **options)
    total = sum(len(image_list) for split in splits for image_list in dataset_dict[split]["views"])
    output_file = Path(args.output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    counts = predict_box_file(
        detector, dataset_samples(dataset_dict, splits), labels, output_file, batch_size=args.batch_size, total=total
    )
    print(f"Wrote {counts['boxes']} boxes for {counts['images']} images to {output_file}")
    return counts


if __name__ == "__main__":
    main()


__all__ = ["PredictBoxesArguments", "dataset_samples", "main"]
