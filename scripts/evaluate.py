"""Evaluate a CDAN, PriorRG or D2R-Net checkpoint on a data set split, next to the paper's Table 1 and three reference points.

    python scripts/evaluate.py --model outputs/demo --dataset_name demo
    python scripts/evaluate.py --model runs/iu_xray --dataset_name iu_xray --data_dir /data/iu_xray --num_beams 3
    python scripts/evaluate.py --model outputs/priorrg_demo --shuffle_indication True   # the shuffled-text control
    python scripts/evaluate.py --model outputs/d2r_demo --shuffle_boxes True   # the shuffled-boxes control

A model that reads the clinical context or the prior study (PriorRG, or CDAN with those switches) gets them from the
data set's rows. `--shuffle_indication` gives each study the indication and history of another study (a seeded
permutation), so a score that holds up without the study's own text comes from the images. A model that reads lesion
boxes (D2R-Net, or CDAN with `use_lesion_branch`) gets the rows' `boxes`; `--shuffle_boxes` gives every study another
study's boxes (a seeded derangement: no study keeps its own; the coordinates are kept, and boxes reaching outside the
new image are clipped or dropped by the processor), so a gain from the boxes is not mistaken for image reading.

Writes `predictions.jsonl` (id, reference, generated), `metrics.json` and `metrics.md` under `--output_dir`
(default: `<model>/eval_<split>`), and prints the Markdown table: BLEU-1..4, METEOR, ROUGE-L, CIDEr and clinical
efficacy (headline: CE macro-F1) for the model, the most frequent training report, the best constant report, and the
model with images shuffled across studies. `train.py` runs the same evaluation on the test split after training.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import HfArgumentParser

from cli_cdan import load_report_model
from data_cdan import load_cdan_dataset
from evaluation_cdan import PUBLISHED_IU_XRAY, evaluate_split, markdown_table
from pipeline_cdan import reads_study_details
from processing_cdan import CdanProcessor
from train import set_observation_sentences
from trainer_cdan import CdanDataCollator


@dataclass
class EvaluationArguments:
    model: str = field(metadata={"help": "A CDAN checkpoint folder (or Hub id)."})
    dataset_name: str = field(default="demo", metadata={"help": "demo, iu_xray or mimic_cxr."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder with the downloaded data set."})
    split: str = field(default="test", metadata={"help": "Split to evaluate."})
    num_beams: int = field(default=3, metadata={"help": "Beam size (the R2Gen family reports beam 3)."})
    max_length: int | None = field(default=None, metadata={"help": "Longest report; the checkpoint's by default."})
    no_repeat_ngram_size: int | None = field(
        default=None,
        metadata={"help": "Never generate an n-gram of this size twice in a report (R2Gen's block_trigrams is 3); "
                  "the checkpoint's by default."},
    )  # fmt: skip
    length_penalty: float | None = field(
        default=None,
        metadata={"help": "Beam search ranks finished reports by log-probability / length ** length_penalty; the "
                  "checkpoint's by default."},
    )  # fmt: skip
    observation_sentences: bool = field(
        default=False,
        metadata={"help": "Edit the reports to agree with the classifier (consistency_cdan.py), with sentences taken "
                  "from the data set's training reports; the checkpoint's setting by default."},
    )  # fmt: skip
    batch_size: int = field(default=16, metadata={"help": "Studies per generate() call."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N studies."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to write; default <model>/eval_<split>."})
    seed: int = field(default=0, metadata={"help": "Seed of the image-shuffling control."})
    shuffle_indication: bool = field(
        default=False,
        metadata={"help": "Control: give every study another study's indication and history (seeded permutation)."},
    )
    shuffle_boxes: bool = field(
        default=False,
        metadata={"help": "Control: give every study another study's lesion boxes (seeded; none keeps its own)."},
    )


def shuffle_clinical_context(split, seed: int):
    """`split` with its `indication` and `history` columns permuted across studies (seeded)."""
    order = np.random.default_rng(seed).permutation(len(split)).tolist()
    for column in ("indication", "history"):
        if column in split.column_names:
            values = split[column]
            split = split.remove_columns(column).add_column(column, [values[index] for index in order])
    return split


def shuffle_boxes(split, seed: int):
    """`split` with its `boxes` column moved across studies by a seeded derangement (no study keeps its own boxes)."""
    if "boxes" not in split.column_names:
        raise ValueError("This split has no `boxes` column to shuffle (IU X-Ray / MIMIC-CXR need a boxes_file).")
    if len(split) < 2:
        raise ValueError("Shuffling boxes across studies needs at least two studies.")
    permutation = np.random.default_rng(seed).permutation(len(split))
    source = np.empty_like(permutation)
    source[permutation] = np.roll(permutation, 1)  # study permutation[i] takes the boxes of permutation[i - 1]
    boxes = split["boxes"]
    return split.remove_columns("boxes").add_column("boxes", [boxes[index] for index in source.tolist()])


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses(args=argv)
    model = load_report_model(args.model)
    processor = CdanProcessor.from_pretrained(args.model)
    dataset_dict = load_cdan_dataset(args.dataset_name, data_dir=args.data_dir)
    if args.max_samples is not None:
        split = dataset_dict[args.split]
        dataset_dict[args.split] = split.select(range(min(args.max_samples, len(split))))
    if args.shuffle_indication:
        dataset_dict[args.split] = shuffle_clinical_context(dataset_dict[args.split], args.seed)
    if args.shuffle_boxes:
        dataset_dict[args.split] = shuffle_boxes(dataset_dict[args.split], args.seed)
    reads = reads_study_details(model.config)
    collator = None
    if any(reads.values()):
        collator = CdanDataCollator(
            processor, include_reports=False, include_view_positions=reads["view_positions"],
            include_context=reads["context"], include_prior=reads["prior"], include_boxes=reads["boxes"],
            observation_names=getattr(model.config, "observation_names", None) or CdanDataCollator.observation_names,
        )  # fmt: skip
    if args.observation_sentences:
        set_observation_sentences(model, processor, dataset_dict["train"])
    published = PUBLISHED_IU_XRAY if args.dataset_name == "iu_xray" else None
    generation_kwargs = {"num_beams": args.num_beams}
    for name in ("max_length", "no_repeat_ngram_size", "length_penalty"):  # unset: the checkpoint's generation_config
        if getattr(args, name) is not None:
            generation_kwargs[name] = getattr(args, name)
    output_dir = Path(args.output_dir or Path(args.model) / f"eval_{args.split}")
    results = evaluate_split(
        model, processor, dataset_dict, output_dir, split=args.split, batch_size=args.batch_size, seed=args.seed,
        published=published, collator=collator, **generation_kwargs,
    )  # fmt: skip
    print(markdown_table(results, published))
    print(f"Predictions, metrics.json and metrics.md written to {output_dir}")
    return results


if __name__ == "__main__":
    main()


__all__ = ["EvaluationArguments", "main", "shuffle_boxes", "shuffle_clinical_context"]
