"""PriorRG's two training stages on the library's trainer: prior-guided contrastive pre-training (stage 1), scored by
image-to-report retrieval recall, and report generation with PriorRG's two learning rates (stage 2).

Stage 1 pairs each study's `mean([ctx, st])` with the text encoder's projected `[CLS]` state of
`"[CLS] [FINDINGS] " + findings` (symmetric multi-positive InfoNCE, studies with the same id are positives). Stage 2
trains the decoder at `learning_rate` and everything else at the (lower) encoder learning rate, with cross-entropy
only, on `CdanTrainer`'s loop, collator and evaluation.

Both trainers reload checkpoints (`load_best_model_at_end`, `resume_from_checkpoint`) through `from_pretrained`,
which maps the saved parameter names back to the modules' (see [`load_checkpoint_weights`]).

References: Liu et al., PriorRG, AAAI 2026 (arXiv:2508.05353), `main_github.py` of its public code for the recipe
(AdamW, 5e-5 for stage 1 and the decoder, 5e-6 for the rest in stage 2); CLIP (Radford et al., 2021) for retrieval
recall@K.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import SAFE_WEIGHTS_NAME, logging

from priorrg_modules import REPORT_SECTION_TAG, study_id_codes
from trainer_cdan import CdanDataCollator, CdanTrainer

logger = logging.get_logger(__name__)

RETRIEVAL_RECALL_AT = (1, 5, 10)
"""The K of the stage-1 retrieval recall@K (image query, report gallery)."""


def add_report_section_tag(tokenizer):
    """Add `[FINDINGS]`, stage 1's report tag, to the context tokenizer as one special token (kept if present)."""
    tokenizer.add_tokens([REPORT_SECTION_TAG], special_tokens=True)
    return tokenizer


def retrieval_recall(
    image_embeds: torch.Tensor | np.ndarray,
    report_embeds: torch.Tensor | np.ndarray,
    ks: Sequence[int] = RETRIEVAL_RECALL_AT,
    study_ids: Sequence[Any] | None = None,
) -> dict[str, float]:
    """
    Image-to-report retrieval recall@K: the share of studies whose own report is among the K reports most similar
    (cosine) to its image embedding. Reports of studies sharing its id count as its own. Also gives chance level
    (`K / number of reports`) for each K.

    Args:
        image_embeds (`(N, C)`): one row per study.
        report_embeds (`(N, C)`): the same studies' reports, in the same order.
        ks (`Sequence[int]`, *optional*, defaults to `(1, 5, 10)`).
        study_ids (`Sequence`, *optional*): rows with equal ids are each other's reports; all distinct when `None`.

    Returns:
        `{"recall@1": ..., "chance@1": ..., ...}`.
    """
    image_embeds = torch.nn.functional.normalize(
        torch.as_tensor(np.asarray(image_embeds), dtype=torch.float32), dim=-1
    )
    report_embeds = torch.nn.functional.normalize(
        torch.as_tensor(np.asarray(report_embeds), dtype=torch.float32), dim=-1
    )
    if image_embeds.shape != report_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(
            f"Need (studies, dim) image and report embeddings of one shape; got {tuple(image_embeds.shape)} and "
            f"{tuple(report_embeds.shape)}."
        )
    num_studies = image_embeds.shape[0]
    id_codes = study_id_codes(range(num_studies) if study_ids is None else list(study_ids))  # (N,)
    is_own = id_codes[:, None] == id_codes[None, :]  # (N, N)
    similarity = image_embeds @ report_embeds.t()  # (N, N), image rows
    ranking = similarity.argsort(dim=1, descending=True)  # (N, N) report indices, best first
    own_ranked = is_own.gather(1, ranking)  # (N, N)
    results = {}
    for k in ks:
        results[f"recall@{k}"] = own_ranked[:, :k].any(dim=1).float().mean().item()
        results[f"chance@{k}"] = min(1.0, k / num_studies)
    return results


def load_checkpoint_weights(model: PreTrainedModel, checkpoint_dir: str | os.PathLike) -> None:
    """
    Copy the weights of a `save_pretrained` folder into `model`, in place, reading them with `from_pretrained`.

    `Trainer` reloads its checkpoints with `model.load_state_dict(file, strict=False)`, which skips the renaming that
    `from_pretrained` applies to the saved names: `save_pretrained` writes a DINOv2 vision encoder's attention under
    its original names (`attention.attention.query`) while the module holds `attention.q_proj`, so those weights were
    silently left at the last step's values, mixed with the best checkpoint's other weights.

    Args:
        model (`PreTrainedModel`): The model to overwrite (same class and configuration as the checkpoint's).
        checkpoint_dir (`str` or `os.PathLike`): A folder written by `save_pretrained` (a Trainer checkpoint).
    """
    saved = type(model).from_pretrained(checkpoint_dir)
    model.load_state_dict(saved.state_dict())  # strict: every parameter and buffer is replaced


class ConvertedCheckpointsMixin:
    """`Trainer` checkpoint reloading through [`load_checkpoint_weights`] (single-process, unsharded checkpoints)."""

    def _loads_converted(self, checkpoint_dir: str) -> bool:
        plain = not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        return plain and os.path.isfile(os.path.join(checkpoint_dir, SAFE_WEIGHTS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._loads_converted(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info(f"Loading model from {resume_from_checkpoint}.")
        model = model if model is not None else self.model
        load_checkpoint_weights(self.accelerator.unwrap_model(model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        checkpoint_dir = self.state.best_model_checkpoint
        if not self._loads_converted(checkpoint_dir):
            return super()._load_best_model()
        logger.info(f"Loading best model from {checkpoint_dir} (score: {self.state.best_metric}).")
        load_checkpoint_weights(self.accelerator.unwrap_model(self.model), checkpoint_dir)


@dataclass
class ContrastivePretrainingCollator:
    """
    Stage 1's batches: the study inputs of `study_collator` (images, view positions, context, prior; no report tokens)
    plus `report_input_ids` / `report_attention_mask` (`"[FINDINGS] " + findings` through the processor's context
    tokenizer, which writes `[CLS]` first) and `study_ids` (equal for rows of one study).

    Args:
        study_collator (`CdanDataCollator`): with `include_reports=False` and the PriorRG flags the model needs.
        max_report_length (`int`, *optional*, defaults to 128): truncation of the report text in tokens.
    """

    study_collator: CdanDataCollator
    max_report_length: int = 128

    def __post_init__(self):
        tokenizer = self.study_collator.processor.context_tokenizer
        if tokenizer is None:
            raise ValueError(
                "Contrastive pre-training embeds reports with the processor's context tokenizer, and this processor "
                "has none; build it with `CdanProcessor.from_reports(..., context_tokenizer=...)`."
            )
        if self.study_collator.include_reports:
            raise ValueError("The study collator of stage 1 must not tokenise reports (`include_reports=False`).")
        add_report_section_tag(tokenizer)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.study_collator(rows)
        batch.pop("disease_labels", None)  # PriorRG has no observation classifier
        tokenizer = self.study_collator.processor.context_tokenizer
        reports = tokenizer(
            [f"{REPORT_SECTION_TAG} {row['findings']}" for row in rows],
            padding=True, truncation=True, max_length=self.max_report_length, return_tensors="pt",
        )  # fmt: skip
        batch["report_input_ids"] = reports["input_ids"]
        batch["report_attention_mask"] = reports["attention_mask"]
        batch["study_ids"] = study_id_codes([row["id"] for row in rows])
        return batch


class PriorRGImageWarmupModel(nn.Module):
    """
    PriorRG's image path with a linear multi-label head on its image latents `[st, joint]` (flattened, so each latent
    can carry its own region), trained alone before stage 1 (`--visual_warmup_epochs`), without context or prior.

    Without a pre-trained vision encoder (the offline demo), stage 1 learns to retrieve reports from the indication,
    which the pre-trained text encoder already reads, and the Perceiver's latents barely depend on the image; stage 2
    then writes the most common report (README, "PriorRG"). This warm-up trains the trainable parts of the image path
    (the projection, the view embeddings, the layer-wise fusion, the Perceiver's image passes, and the vision encoder
    unless it is frozen) to carry the 14 CheXpert labels into the latents the decoder reads. The head is discarded
    afterwards; the context encoder is not trained.

    Args:
        encoder (`PriorRGEncoder`): the model's encoder, trained in place.
        num_observations (`int`): number of labels (14 CheXpert observations).
    """

    accepts_loss_kwargs = False
    input_names = ("pixel_values", "view_position_ids")
    weights_name = "image_encoder.safetensors"
    untrained_prefix = "context_encoder."
    """Encoder weights the warm-up leaves alone, and so neither saves nor loads."""

    def __init__(self, encoder: nn.Module, num_observations: int):
        super().__init__()
        self.encoder = encoder
        num_features = 2 * encoder.config.num_latents * encoder.config.hidden_size
        self.classifier = nn.Linear(num_features, num_observations)

    def forward(
        self,
        pixel_values: torch.Tensor,
        view_position_ids: torch.LongTensor | None = None,
        disease_labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        outputs = self.encoder(pixel_values=pixel_values, view_position_ids=view_position_ids)  # no context, no prior
        image_latents = torch.cat([outputs.spatiotemporal_latents, outputs.joint_latents], dim=1)  # (B, 2M, C)
        logits = self.classifier(image_latents.flatten(1))  # (B, num_observations)
        loss = None
        if disease_labels is not None:
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), disease_labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def warmed_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights except the context encoder's."""
        return {
            name: tensor
            for name, tensor in self.encoder.state_dict().items()
            if not name.startswith(self.untrained_prefix)
        }

    def load_warmed_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.encoder.load_state_dict(state_dict, strict=False)
        missing = [name for name in missing if not name.startswith(self.untrained_prefix)]
        if missing or unexpected:
            raise ValueError(
                f"The saved warm-up weights do not fit this PriorRG encoder: missing {missing}, unexpected "
                f"{unexpected}."
            )


class PriorRGPretrainer(ConvertedCheckpointsMixin, CdanTrainer):
    """
    Stage 1 on `CdanTrainer`: the loss is `model.get_contrastive_outputs(...).loss`, and `evaluate()` reports
    image-to-report retrieval recall@1/5/10 (and chance) on the evaluation split instead of generating reports.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model.get_contrastive_outputs(**inputs)
        if model.training:
            weight = 1.0 / self.args.gradient_accumulation_steps
            self.loss_term_sums["loss_contrastive"] = (
                self.loss_term_sums.get("loss_contrastive", 0.0) + outputs.loss.detach().item() * weight
            )
            self.loss_term_count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        return None  # the contrastive loss is a mean over the micro-batch's studies, not a token sum

    def embed_dataset(self, dataset) -> tuple[np.ndarray, np.ndarray, list[Any]]:
        """Image and report embeddings of every study of `dataset`, in order, with the study ids."""
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        dataloader = self.get_eval_dataloader(dataset)
        image_embeds, report_embeds = [], []
        with torch.inference_mode():
            for batch in dataloader:
                batch = self._prepare_inputs(batch)
                outputs = model.get_contrastive_outputs(**batch)
                image_embeds.append(outputs.image_embeds.float().cpu().numpy())
                report_embeds.append(outputs.report_embeds.float().cpu().numpy())
        return np.concatenate(image_embeds), np.concatenate(report_embeds), list(dataset["id"])

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **kwargs) -> dict:
        """Retrieval recall@K of the evaluation split (image queries, report gallery), logged and returned."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        image_embeds, report_embeds, study_ids = self.embed_dataset(dataset)
        metrics = {
            f"{metric_key_prefix}_{name}": value
            for name, value in retrieval_recall(image_embeds, report_embeds, study_ids=study_ids).items()
        }
        self.log(dict(metrics))  # `log` adds the epoch to the dict it is given
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class PriorRGTrainer(ConvertedCheckpointsMixin, CdanTrainer):
    """
    Stage 2 on `CdanTrainer`: PriorRG's two learning rates, `learning_rate` for the decoder (and the memory
    projection) and `visual_extractor_learning_rate` for everything else (PriorRG: 5e-5 and 5e-6).
    """

    def learning_rate_groups(self, model) -> list[dict[str, Any]]:
        decoder_parameters, other_parameters = [], []
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                is_decoder = name.startswith(("decoder.", "memory_projection."))
                (decoder_parameters if is_decoder else other_parameters).append(parameter)
        return [
            {"params": decoder_parameters, "lr": self.args.learning_rate},
            {"params": other_parameters, "lr": self.args.visual_extractor_learning_rate},
        ]


__all__ = [
    "RETRIEVAL_RECALL_AT",
    "ContrastivePretrainingCollator",
    "ConvertedCheckpointsMixin",
    "PriorRGImageWarmupModel",
    "PriorRGPretrainer",
    "PriorRGTrainer",
    "add_report_section_tag",
    "load_checkpoint_weights",
    "retrieval_recall",
]
