"""`pipeline("image-to-text")` for CDAN checkpoints, and the Hub-ready checkpoint folder.

Transformers 5.x removed its stock image-to-text pipeline (the task name now redirects to image-text-to-text, which
needs a prompt). CDAN checkpoints therefore carry their own pipeline: [`CdanReportPipeline`] is registered for the
`image-to-text` task and saved into the checkpoint's `custom_pipelines`, so that

```python
>>> from transformers import pipeline
>>> reporter = pipeline("image-to-text", model="path/or/hub-id", trust_remote_code=True)
>>> reporter("frontal.png")                          # one single-view study
[{'generated_text': 'the heart is normal in size . ...'}]
>>> reporter(("frontal.png", "lateral.png"))         # one study given as several views (a tuple)
>>> reporter(["a.png", ("b_pa.png", "b_lat.png")])   # a batch: one result list per study
>>> reporter({"images": ["pa.png", "lat.png"], "boxes": [[[30, 40, 120, 160]], []]}, return_grounding=True)
[{'generated_text': '...', 'grounding': [{'sentence': '...', 'boxes': [{'view': 0, 'index': 0, ...}]}, ...]}]
```
(the last one for D2R-Net, or CDAN with the lesion alignment: each sentence scored on the study's lesion boxes).

References: the custom-pipeline mechanism of `transformers.pipelines` (`PIPELINE_REGISTRY`, `custom_pipelines` in
`config.json`), `huggingface_hub` model cards, and D2R-Net's sentence-to-box grounding (Tang et al., J Imaging
Inform Med 2025; see `d2r_modules`).
"""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from huggingface_hub import HfApi, ModelCard, ModelCardData
from transformers import AutoModelForImageTextToText, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging


try:
    from .configuration_cdan import DIAGNOSIS_STATES
    from .consistency_cdan import align_reports_with_classifier, split_sentences
    from .d2r_modules import alignment_text_inputs
    from .heatmaps_cdan import (
        feature_grid,
        group_sentences,
        patch_maps_from_memory_weights,
        reverse_attention_maps,
        token_cross_attention,
    )
    from .inference_cdan import optimize_for_inference
except ImportError:
    from configuration_cdan import DIAGNOSIS_STATES
    from consistency_cdan import align_reports_with_classifier, split_sentences
    from d2r_modules import alignment_text_inputs
    from heatmaps_cdan import (
        feature_grid,
        group_sentences,
        patch_maps_from_memory_weights,
        reverse_attention_maps,
        token_cross_attention,
    )
    from inference_cdan import optimize_for_inference

logger = logging.get_logger(__name__)

PIPELINE_MODULE_FILES = (
    "pipeline_cdan.py",
    "consistency_cdan.py",
    "labeler_cdan.py",
    "heatmaps_cdan.py",
    "inference_cdan.py",
    "configuration_cdan.py",
    "modeling_cdan.py",
    "priorrg_modules.py",
    "d2r_modules.py",
    "layers_cdan.py",
)
"""The pipeline's remote code and the modules it imports that a saved model does not already carry (a PriorRG
checkpoint carries none of CDAN's)."""

MIN_TRANSFORMERS_VERSION = "5.24.0"
"""Oldest transformers the remote code runs on (the decoder cache argument is named `cache` since 5.24); the same
bound as `pyproject.toml`'s dependency."""

STUDY_KEYS = ("images", "views")

STUDY_DETAIL_KEYS = ("view_positions", "indication", "history", "prior", "boxes")
"""Other entries of a study dict: `{"images": [...], "view_positions": [...], "indication": "...", "history": "...",
"prior": {"images": [...], "view_positions": [...]}, "boxes": [[box, ...] per view]}`; each is read by the models that
take it (PriorRG, CDAN with `use_clinical_context` / `use_prior_study` / `use_lesion_branch`, D2R-Net). Boxes are in
pixels of the given images, in any form `CdanProcessor(boxes=...)` accepts (`[x_min, y_min, x_max, y_max]`, a
`BOX_FEATURES` dict or a `LesionBox`)."""

GROUNDING_INPUTS = ("grounding_boxes", "grounding_box_positions")
"""What `preprocess` adds for `return_grounding`: per row of `lesion_boxes` its cleaned box in pixels of the given
image (float64 `(1, V*K, 4)`) and its `(given view, index in that view's box list)` (`(1, V*K, 2)`, -1 for padding).
They never reach the model."""


def reads_study_details(config) -> dict[str, bool]:
    """
    Which study details a model reads: view positions, clinical context (indication, history), prior study, lesion
    boxes (D2R-Net, or CDAN with `use_lesion_branch`).
    """
    is_priorrg = config.model_type == "priorrg"
    return {
        "view_positions": is_priorrg,
        "context": is_priorrg or getattr(config, "use_clinical_context", False),
        "prior": is_priorrg or getattr(config, "use_prior_study", False),
        "boxes": getattr(config, "use_lesion_branch", False),
    }


class CdanReportPipeline(Pipeline):
    """
    Writes a draft findings report for each chest X-ray study.

    Inputs:
        - an image (file path, `PIL.Image.Image` or array): one study with one view;
        - a tuple of images, or a dict `{"images": [...]}`: one study given as several views;
        - a list whose items are any of the above: a batch of studies.

    A study with fewer views than the model reads is handled by the image processor (a single view is repeated when
    `repeat_single_view` is on); any other mismatch raises `ValueError`.

    Returns:
        `[{"generated_text": report}]` for one study, and a list of those for a list of studies.

    Generation parameters (`num_beams`, `max_length`, `no_repeat_ngram_size`, `do_sample`, ...) may be passed at
    construction or per call; by default the checkpoint's `generation_config.json` applies (beam 3, 60 tokens).

    `on_degenerate_image` (`"warn"` or `"error"`), at construction or per call, overrides the image processor's
    handling of views that cannot be a chest X-ray (tiny, extreme aspect ratio, constant or binary pixels): by default
    they are processed with a `UserWarning`; with `"error"` they raise `ValueError`.

    `return_labels=True`, at construction or per call, adds the structured CheXpert labels of the reverse-attention
    classifier to each result: `{"generated_text": ..., "labels": {observation: "positive" | "negative" | ...},
    "probabilities": {observation: sigmoid(logit)}}`, an observation being positive when its logit exceeds its
    `config.observation_thresholds` entry (0.0, i.e. probability 0.5, when unset), and "uncertain" within
    `config.diagnosis_uncertainty_margin` of it (0 by default: no uncertain labels). These are the decisions a model
    with the diagnosis prompt (`use_diagnosis_prompt`) writes its report from. The image is encoded once for both
    the labels and the report, which is the same as without `return_labels`. Models without reverse attention have
    no classifier and raise `ValueError`.

    `return_attention_maps=True`, at construction or per call, adds where the model looked, as float arrays on each
    view's `h x w` feature-map grid (see `heatmaps_cdan`): `{"attention_maps": {"positive": [array (h, w) per view],
    "negative": [...], "sentences": [{"sentence": str, "maps": [array (h, w) per view]}, ...]}}`. `positive` and
    `negative` are the attention each patch receives in the reverse-attention module (behind `u_p` and `u_n`),
    averaged over heads and query patches; a sentence's maps are the decoder's cross-attention on each patch's `u_p`
    and `u_n` tokens (summed), averaged over layers, heads and the sentence's tokens, from one teacher-forced decoder
    pass over the generated report. The report is the same as without the option. Models without reverse attention
    raise `ValueError`.

    `ban_anonymisation_token=True`, at construction or per call, never writes IU X-Ray's de-identification mark
    `xxxx` (nor the vocabulary words containing it, see [`CdanProcessor.anonymisation_token_ids`]): their ids are
    added to the generation's `suppress_tokens` (on top of any the call or the checkpoint sets), whose logits
    processor masks them at every decoding step. A vocabulary without them generates as without the option.

    `precision` (`"fp32"`, `"bf16"` or `"int8"`) and `compile` (`bool`), at construction only (`pipeline(...,
    precision="int8")`), prepare the model for faster inference with [`~inference_cdan.optimize_for_inference`]
    (in place): bfloat16 autocast (refused with `ValueError` on a CPU without AVX512-BF16 or AMX), dynamic int8
    linear layers, and a compiled visual extractor. Reports may differ slightly from float32 ones.

    `return_grounding=True`, at construction or per call, grounds each sentence of the report on the study's lesion
    boxes (D2R-Net, or CDAN with `use_lesion_alignment`: models with an `alignment`; others raise `ValueError`). The
    study must be a dict with `boxes` (one list per given view, in pixels of the given image). Each result gets
    `"grounding"`: per sentence (`consistency_cdan.split_sentences` of the report) `{"sentence": str, "boxes":
    [{"view": int, "index": int, "box": [x_min, y_min, x_max, y_max], "score": float}, ...]}`, best score first, with
    `view` the given image, `index` the box's position in that view's list, and `box` in pixels of the given image
    (clipped to it when it crossed its border). Boxes the processor dropped (invalid, or past `max_lesion_boxes`) are
    not listed. The scores are [`~d2r_modules.ImageTextAlignment.ground`]'s distribution over the real boxes; a view
    given once and repeated to fill the study has its boxes' two rows summed. The report is the same as without the
    option.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True

    def __init__(self, *args, precision: str = "fp32", compile: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if precision != "fp32" or compile:
            self.model = optimize_for_inference(self.model, precision=precision, compile=compile, inplace=True)

    def _sanitize_parameters(
        self,
        generate_kwargs: dict | None = None,
        on_degenerate_image: str | None = None,
        return_labels: bool | None = None,
        ban_anonymisation_token: bool | None = None,
        return_attention_maps: bool | None = None,
        return_grounding: bool | None = None,
        **generation_parameters,
    ):
        preprocess_params = {} if on_degenerate_image is None else {"on_degenerate_image": on_degenerate_image}
        forward_params = {"generate_kwargs": {**(generate_kwargs or {}), **generation_parameters}}
        if ban_anonymisation_token is not None:
            forward_params["ban_anonymisation_token"] = bool(ban_anonymisation_token)
        if return_labels is not None:
            if return_labels and not getattr(self.model.config, "use_reverse_attention", False):
                raise ValueError(
                    "`return_labels=True` needs the reverse-attention disease classifier, and this model has none "
                    "(`use_reverse_attention=False`)."
                )
            forward_params["return_labels"] = return_labels
        postprocess_params = {} if return_labels is None else {"return_labels": return_labels}
        if return_attention_maps is not None:
            if return_attention_maps and not getattr(self.model.config, "use_reverse_attention", False):
                raise ValueError(
                    "`return_attention_maps=True` draws the reverse-attention maps (u_p, u_n), and this model has no "
                    "reverse attention (`use_reverse_attention=False`)."
                )
            if return_attention_maps and any(reads_study_details(self.model.config).values()):
                raise ValueError(
                    "`return_attention_maps=True` draws the maps of the image-only CDAN; this model also reads the "
                    "clinical context or the prior study."
                )
            forward_params["return_attention_maps"] = bool(return_attention_maps)
            postprocess_params["return_attention_maps"] = bool(return_attention_maps)
        if return_grounding is not None:
            if return_grounding:
                self.check_grounding_model()
            for params in (preprocess_params, forward_params, postprocess_params):
                params["return_grounding"] = bool(return_grounding)
        return preprocess_params, forward_params, postprocess_params

    def check_grounding_model(self) -> None:
        """Raise `ValueError` unless the model can ground sentences on boxes (an `alignment` and its tokenizer)."""
        if getattr(self.model, "alignment", None) is None or not reads_study_details(self.model.config)["boxes"]:
            raise ValueError(
                "`return_grounding=True` needs a model with lesion boxes and image-text alignment (D2R-Net with "
                "`use_alignment`, or CDAN with `use_lesion_branch` and `use_lesion_alignment`); this one has none."
            )
        if getattr(self.processor, "context_tokenizer", None) is None:
            raise ValueError(
                "`return_grounding=True` tokenises the sentences with the processor's `context_tokenizer` (the "
                "alignment text encoder's), and this processor has none."
            )

    def __call__(self, inputs: Any = None, **kwargs) -> list:
        if inputs is None or (isinstance(inputs, (list, tuple, dict)) and len(inputs) == 0):
            raise ValueError("No image given: pass an image path, a PIL image, a tuple of views or a list of studies.")
        return super().__call__(inputs, **kwargs)

    @staticmethod
    def study_views(study: Any) -> list:
        """The views of one study as a list, from an image, a tuple/list of images or a `{"images": ...}` dict."""
        if isinstance(study, dict):
            views = next((study[key] for key in STUDY_KEYS if key in study), None)
            if views is None:
                raise ValueError(f"A study given as a dict needs an 'images' entry; got keys {sorted(study)}.")
            return list(views) if isinstance(views, (list, tuple)) else [views]
        if isinstance(study, (list, tuple)):
            return list(study)
        return [study]

    def study_details(self, study: Any) -> dict[str, list]:
        """
        The processor arguments for what a study dict says besides its images (see `STUDY_DETAIL_KEYS`), for the
        details this model reads. A detail the model does not read is ignored with a warning.
        """
        details = study if isinstance(study, dict) else {}
        unknown = sorted(set(details) - set(STUDY_KEYS) - set(STUDY_DETAIL_KEYS))
        if unknown:
            accepted = [*STUDY_KEYS, *STUDY_DETAIL_KEYS]
            raise ValueError(f"Unknown study entries {unknown}; a study dict takes {accepted}.")
        reads = reads_study_details(self.model.config)
        ignored = [
            key for key in STUDY_DETAIL_KEYS
            if details.get(key) and not reads["context" if key in ("indication", "history") else key]
        ]  # fmt: skip
        if ignored:
            logger.warning_once(f"This model does not read the study's {ignored}; they are ignored.")
        arguments: dict[str, list] = {}
        if reads["view_positions"]:
            arguments["view_positions"] = [details.get("view_positions")]
        if reads["context"]:
            arguments["indication"] = [details.get("indication")]
            arguments["history"] = [details.get("history")]
        if reads["prior"]:
            prior = details.get("prior")
            prior_views = self.study_views(prior) if prior else None
            arguments["prior_images"] = [prior_views or None]
            arguments["prior_view_positions"] = [prior.get("view_positions") if isinstance(prior, dict) else None]
        if reads["boxes"]:  # a study without boxes gets all-padding rows, so that batches stack
            arguments["boxes"] = [details.get("boxes") or None]
        return arguments

    def preprocess(
        self, study: Any, on_degenerate_image: str | None = None, return_grounding: bool = False
    ) -> dict[str, torch.Tensor]:
        views = self.study_views(study)
        if not views:
            raise ValueError("A study with no image was given.")
        if return_grounding and not (isinstance(study, dict) and study.get("boxes")):
            raise ValueError(
                "`return_grounding=True` grounds the report on the study's lesion boxes: give the study as a dict "
                '`{"images": [...], "boxes": [[x_min, y_min, x_max, y_max], ...] per view}` (pixels of each image).'
            )
        inputs = self.processor(
            images=[views], return_tensors="pt", on_degenerate_image=on_degenerate_image, **self.study_details(study)
        )
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        model_inputs["pixel_values"] = model_inputs["pixel_values"].to(self.dtype or torch.float32)
        if "prior_pixel_values" in model_inputs:
            model_inputs["prior_pixel_values"] = model_inputs["prior_pixel_values"].to(self.dtype or torch.float32)
        for key in ("context_input_ids", "context_attention_mask"):  # one length for every study, so batches stack
            if key in model_inputs:
                padding = self.processor.max_context_length - model_inputs[key].shape[1]
                model_inputs[key] = nn.functional.pad(model_inputs[key], (0, padding), value=0)
        if return_grounding:
            model_inputs.update(self.grounding_box_inputs(views, study["boxes"], model_inputs["lesion_box_mask"][0]))
        return model_inputs

    def grounding_box_inputs(
        self, views: list, boxes: list, lesion_box_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """
        The [`GROUNDING_INPUTS`] of one study: what each row of its `lesion_boxes` is in the study as given (see
        [`CdanImageProcessor.lesion_box_rows`]), flattened to the model's `V*K` lesion order.

        Args:
            views (`list`): the study's views as given.
            boxes (`list`): the study's `boxes` entry (one list per given view).
            lesion_box_mask (`torch.Tensor` of shape `(num_views, max_lesion_boxes)`): the processor's real rows.
        """
        rows = self.processor.image_processor.lesion_box_rows(views, boxes, self.processor.max_lesion_boxes)
        num_views, max_boxes = lesion_box_mask.shape
        given_boxes = torch.zeros(num_views, max_boxes, 4, dtype=torch.float64)  # (V, K, 4)
        positions = torch.full((num_views, max_boxes, 2), -1, dtype=torch.long)  # (V, K, 2)
        for view_index, view_rows in enumerate(rows):
            if len(view_rows) != int(lesion_box_mask[view_index].sum()):
                raise RuntimeError(
                    f"View {view_index} has {int(lesion_box_mask[view_index].sum())} lesion rows but "
                    f"{len(view_rows)} cleaned boxes; the processor's box order cannot be recovered."
                )
            for row, (given_view, box_index, box) in enumerate(view_rows):
                given_boxes[view_index, row] = torch.tensor(box.xyxy, dtype=torch.float64)
                positions[view_index, row] = torch.tensor([given_view, box_index])
        return {
            "grounding_boxes": given_boxes.flatten(0, 1)[None],  # (1, V*K, 4)
            "grounding_box_positions": positions.flatten(0, 1)[None],  # (1, V*K, 2)
        }

    def anonymisation_suppress_tokens(self, generate_kwargs: dict) -> list[int]:
        """
        The `suppress_tokens` that ban the anonymisation words: those `generate` would already suppress with
        `generate_kwargs` (this call's, on top of the pipeline's and the checkpoint's), plus
        [`CdanProcessor.anonymisation_token_ids`].
        """
        anonymisation_ids = self.processor.anonymisation_token_ids()
        if not anonymisation_ids:
            logger.warning_once(
                "`ban_anonymisation_token=True`, but the vocabulary has no word with the de-identification mark "
                "'xxxx'; nothing is banned."
            )
        if "generation_config" not in generate_kwargs:
            generate_kwargs = {**self._generate_kwargs, **generate_kwargs}
        already_suppressed = self._get_set_generation_params(generate_kwargs).get("suppress_tokens") or []
        return sorted({*already_suppressed, *anonymisation_ids})

    def _forward(
        self,
        model_inputs: dict[str, torch.Tensor],
        generate_kwargs: dict | None = None,
        return_labels: bool = False,
        ban_anonymisation_token: bool = False,
        return_attention_maps: bool = False,
        return_grounding: bool = False,
    ) -> dict:
        grounding_inputs = {key: model_inputs.pop(key) for key in GROUNDING_INPUTS if key in model_inputs}
        generate_kwargs = generate_kwargs or {}
        overrides = {}
        if ban_anonymisation_token and (suppress_tokens := self.anonymisation_suppress_tokens(generate_kwargs)):
            overrides["suppress_tokens"] = suppress_tokens
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs, **overrides)
        if return_attention_maps:
            return self.forward_with_attention_maps(model_inputs["pixel_values"], generate_kwargs)
        if not (return_labels or return_grounding or getattr(self.model.config, "observation_sentences", None)):
            return {"generated_ids": self.model.generate(**model_inputs, **generate_kwargs)}
        # Encode the image once: the disease logits and the lesion features come from the encoder, whose output
        # `generate` then decodes
        encoder_outputs = self.model.get_encoder()(**model_inputs)
        generated_ids = self.model.generate(encoder_outputs=encoder_outputs, **generate_kwargs)
        outputs = {"generated_ids": generated_ids}
        if getattr(encoder_outputs, "disease_logits", None) is not None:
            outputs["disease_logits"] = encoder_outputs.disease_logits
        if return_grounding:
            sequences_per_study = len(generated_ids) // len(encoder_outputs.lesion_embeddings)
            reports = self.decode_reports(generated_ids, outputs.get("disease_logits"))
            outputs["grounding_scores"] = self.ground_sentences(reports, encoder_outputs, sequences_per_study)
            for key, value in grounding_inputs.items():  # one row per generated report, as `generated_ids`
                outputs[key] = value.repeat_interleave(sequences_per_study, dim=0)
        return outputs

    @torch.no_grad()
    def ground_report(self, study: dict, report: str) -> list[dict[str, Any]]:
        """
        The grounding of a given report (a reference, say) on one study's boxes, in the pipeline's `"grounding"`
        format: the study is encoded as for `return_grounding`, and the report's sentences are scored instead of a
        generated report's.

        Args:
            study (`dict`): `{"images": [...], "boxes": [...], ...}`, as the pipeline takes it.
            report (`str`): a cleaned report (its sentences are `consistency_cdan.split_sentences`).
        """
        self.check_grounding_model()
        model_inputs = self.preprocess(study, return_grounding=True)
        grounding_inputs = {key: model_inputs.pop(key)[0] for key in GROUNDING_INPUTS}
        encoder_outputs = self.model.get_encoder()(**self._ensure_tensor_on_device(model_inputs, self.device))
        scores = self.ground_sentences([report], encoder_outputs, sequences_per_study=1)[0].cpu()  # (S, V*K)
        boxes, positions = (grounding_inputs[key] for key in GROUNDING_INPUTS)
        return sentence_grounding(split_sentences(report), scores, boxes, positions)

    def decode_reports(self, generated_ids: torch.Tensor, disease_logits: torch.Tensor | None = None) -> list[str]:
        """
        The reports as the pipeline returns them: decoded, then, for a model with `observation_sentences`, edited to
        agree with its classifier.

        Args:
            generated_ids (`torch.LongTensor` of shape `(num_reports, length)`): `generate`'s output.
            disease_logits (`torch.Tensor` of shape `(num_studies, num_observations)`, *optional*): the classifier's
                logits; several reports of one study follow each other.
        """
        reports = self.processor.batch_decode(generated_ids, skip_special_tokens=True)
        config = self.model.config
        if disease_logits is None or not getattr(config, "observation_sentences", None):
            return reports
        decisions = self.model.diagnosis_decisions(disease_logits.float().cpu()).tolist()
        sequences_per_study = len(reports) // len(decisions)
        study_decisions = [decisions[index // sequences_per_study] for index in range(len(reports))]
        return align_reports_with_classifier(
            reports, study_decisions, config.observation_names, config.observation_sentences
        )

    def ground_sentences(self, reports: list[str], encoder_outputs: Any, sequences_per_study: int) -> torch.Tensor:
        """
        Each report's sentences (`split_sentences`) scored on its study's lesion rows by `model.alignment.ground`.

        Args:
            reports (`list[str]`): the reports, `sequences_per_study` per study in order.
            encoder_outputs: the encoder output, with `lesion_embeddings` `(B, V*K, E)` and `lesion_mask` `(B, V*K)`.
            sequences_per_study (`int`): reports per study.

        Returns:
            `torch.Tensor` of shape `(num_reports, S, V*K)`: `S` the most sentences of a report; a report's rows past
            its sentence count are 0.
        """
        num_sentences = max(1, *(len(split_sentences(report)) for report in reports))
        text_inputs = alignment_text_inputs(self.processor.context_tokenizer, reports, max_sentences=num_sentences)
        device = encoder_outputs.lesion_embeddings.device
        scores = []
        for index in range(len(reports)):
            study = index // sequences_per_study
            scores.append(
                self.model.alignment.ground(
                    encoder_outputs.lesion_embeddings[study],
                    encoder_outputs.lesion_mask[study],
                    text_inputs["sentence_input_ids"][index].to(device),
                    text_inputs["sentence_attention_mask"][index].to(device),
                )
            )  # (S, V*K)
        return torch.stack(scores).float()  # (N, S, V*K)

    def forward_with_attention_maps(self, pixel_values: torch.Tensor, generate_kwargs: dict) -> dict:
        """
        Generate as `_forward` does, and compute the attention maps (tensors only, which the pipeline can batch).

        The visual extractor runs once. The report is decoded from the encoder's ordinary output (so it is the text
        written without the maps); the reverse-attention weights come from a second pass of the layers after the
        extractor with `output_attentions=True`, and the cross-attention from one teacher-forced decoder pass.
        """
        features = feature_grid(self.model, pixel_values)  # ((B, N, C), (h, w))
        encoder_outputs = self.model.get_encoder()(visual_features=features[0])
        generated_ids = self.model.generate(encoder_outputs=encoder_outputs, **generate_kwargs)
        reverse_maps = reverse_attention_maps(self.model, pixel_values, features=features)
        weights = token_cross_attention(self.model, encoder_outputs, generated_ids)  # (S, T, 2N + k)
        token_maps = patch_maps_from_memory_weights(weights, pixel_values.shape[1], features[1])  # (S, T, V, h, w)
        return {
            "generated_ids": generated_ids,
            "disease_logits": encoder_outputs.disease_logits,
            "positive_maps": torch.from_numpy(reverse_maps["positive"]),  # (B, V, h, w)
            "negative_maps": torch.from_numpy(reverse_maps["negative"]),  # (B, V, h, w)
            "token_maps": token_maps,  # (S, T, V, h, w)
        }

    def postprocess(
        self,
        model_outputs: dict,
        return_labels: bool = False,
        return_attention_maps: bool = False,
        return_grounding: bool = False,
    ) -> list[dict]:
        # Reports edited to agree with the classifier when the model has `observation_sentences` (an option)
        reports = self.decode_reports(model_outputs["generated_ids"], model_outputs.get("disease_logits"))
        if "disease_logits" in model_outputs:
            config = self.model.config
            disease_logits = model_outputs["disease_logits"].float().cpu()
            decisions = self.model.diagnosis_decisions(disease_logits).tolist()  # what a diagnosis prompt reads
            # One encoder row per study; with several returned sequences each study has several reports
            sequences_per_study = len(reports) // len(disease_logits)
        results = [{"generated_text": report} for report in reports]
        if return_labels:
            for index, result in enumerate(results):
                study = index // sequences_per_study
                study_logits = disease_logits[study]
                result["labels"] = {
                    name: DIAGNOSIS_STATES[state] for name, state in zip(config.observation_names, decisions[study])
                }
                result["probabilities"] = dict(zip(config.observation_names, torch.sigmoid(study_logits).tolist()))
        if return_attention_maps:
            sentences = group_sentences(model_outputs["token_maps"], model_outputs["generated_ids"], self.processor)
            for index, result in enumerate(results):
                study = index // sequences_per_study
                result["attention_maps"] = {
                    "positive": list(model_outputs["positive_maps"][study].numpy()),
                    "negative": list(model_outputs["negative_maps"][study].numpy()),
                    "sentences": [
                        {"sentence": item["sentence"], "maps": list(item["maps"])} for item in sentences[index]
                    ],
                }
        if return_grounding:
            for index, result in enumerate(results):
                result["grounding"] = sentence_grounding(
                    split_sentences(result["generated_text"]),
                    model_outputs["grounding_scores"][index],
                    model_outputs["grounding_boxes"][index],
                    model_outputs["grounding_box_positions"][index],
                )
        return results

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """
        Save everything a Hub repository needs: `config.json` with `auto_map` and `custom_pipelines`, safetensors
        weights, `generation_config.json`, the processor and tokenizer files, the remote-code files
        (`configuration_cdan.py`, `modeling_cdan.py`, `processing_cdan.py`, `image_processing_cdan.py`,
        `tokenization_cdan.py`, `dicom_cdan.py`, `pipeline_cdan.py`) and a model card.

        Args:
            save_directory (`str` or `os.PathLike`): the folder to write.
            kwargs: passed to `model.save_pretrained` (for example `max_shard_size`); `model_card_kwargs` (a dict)
                is passed to [`build_model_card`].
        """
        model_card_kwargs = kwargs.pop("model_card_kwargs", None) or {}
        os.makedirs(save_directory, exist_ok=True)
        register_pipeline_in_config(self.model.config)
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)
        write_pipeline_files(save_directory, self.model, self.processor, **model_card_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str = "Upload CDAN report generator",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        model_card_kwargs: dict | None = None,
    ):
        """
        Publish the folder written by [`~CdanReportPipeline.save_pretrained`] to the Hugging Face Hub, model card
        included (the generic `push_to_hub` would replace it by a template).
        """
        api = HfApi(token=token if isinstance(token, str) else None)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as work_dir:
            self.save_pretrained(work_dir, model_card_kwargs=model_card_kwargs)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=work_dir,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
            )


def sentence_grounding(
    sentences: list[str], scores: torch.Tensor, boxes: torch.Tensor, positions: torch.Tensor
) -> list[dict[str, Any]]:
    """
    The `"grounding"` of one report (see [`CdanReportPipeline`]): per sentence its boxes in the study as given, best
    score first.

    Args:
        sentences (`list[str]`): the report's sentences.
        scores (`torch.Tensor` of shape `(S, V*K)`): their grounding scores on the lesion rows (`S >= len(sentences)`).
        boxes (`torch.Tensor` of shape `(V*K, 4)`): each row's box in pixels of its given image.
        positions (`torch.Tensor` of shape `(V*K, 2)`): each row's `(given view, index)`, -1 for padding rows.

    Returns:
        `list[dict]`: `{"sentence": str, "boxes": [{"view", "index", "box", "score"}, ...]}` per sentence. Rows of one
        given box (a view repeated to fill the study) are one entry with their scores summed.
    """
    real_rows = (positions[:, 0] >= 0).nonzero().flatten().tolist()
    grounding = []
    for sentence, sentence_scores in zip(sentences, scores.tolist()):
        entries: dict[tuple[int, int], dict[str, Any]] = {}
        for row in real_rows:
            view, index = positions[row].tolist()
            entry = entries.setdefault(
                (view, index), {"view": view, "index": index, "box": boxes[row].tolist(), "score": 0.0}
            )
            entry["score"] += sentence_scores[row]
        ranked = sorted(entries.values(), key=lambda entry: (-entry["score"], entry["view"], entry["index"]))
        grounding.append({"sentence": sentence, "boxes": ranked})
    return grounding


def model_card_architecture(config, input_size: str) -> tuple[str, str]:
    """The title and the architecture paragraph of a model card, for a CDAN, PriorRG or D2R-Net configuration."""
    if config.model_type == "priorrg":
        title = "PriorRG chest X-ray report generator"
        return title, f"""\
PriorRG (Liu et al., AAAI 2026) writes a draft *findings* section from the current study's
views{input_size}, the clinical context (indication, history) and the patient's prior study. It is a research
model: its reports are drafts for a radiologist to check, not diagnoses.

- Vision encoder: `{config.vision_config.model_type}` ({config.vision_config.num_hidden_layers} layers, width
  {config.vision_config.hidden_size}); text encoder: `{config.text_config.model_type}`
  ({config.text_config.num_hidden_layers} layers); {config.num_latents} Perceiver latents; decoder:
  `{config.decoder_config.model_type}` ({config.decoder_config.num_hidden_layers} layers)"""
    if config.model_type == "d2r_net":
        title = "D2R-Net chest X-ray report generator"
        lesion_branch = f"RoIAlign/{config.lesion_feature_mode}" if config.use_lesion_branch else "off"
        return title, f"""\
D2R-Net (Tang et al., J Imaging Inform Med 2025) writes a draft *findings* section from {config.num_views} chest X-ray
view(s) per study{input_size} and the lesion boxes a detector found on them, and can ground each sentence on the
boxes. It is a research model: its reports are drafts for a radiologist to check, not diagnoses.

- Visual extractor: `{config.visual_extractor}` with channel-prior convolutional attention; lesion branch:
  {lesion_branch}, up to {config.max_lesion_boxes} boxes per view; alignment blocks (GAB, LAB):
  {config.use_alignment}
- Memory-driven decoder (R2Gen): d_model {config.d_model}, {config.encoder_layers} encoder and
  {config.decoder_layers} decoder layers, {config.relational_memory_slots} memory slots"""
    ablation = {
        (False, False): "BASE",
        (True, False): "+RA",
        (False, True): "+SC",
        (True, True): "+RA+SC",
    }[(config.use_reverse_attention, config.use_semantic_consistency)]
    title = "CDAN chest X-ray report generator"
    return title, f"""\
A Cross-modal Discrepancy Attention Network (Chen, Huang & Tan, 2025) that writes a draft *findings* section from
{config.num_views} chest X-ray view(s) per study. It is a research model: its reports are drafts for a radiologist to
check, not diagnoses.

- Visual extractor: `{config.visual_extractor}`{input_size}, {config.num_views} view(s) per study
- Configuration: {ablation} (reverse attention: {config.use_reverse_attention}, semantic consistency:
  {config.use_semantic_consistency}), d_model {config.d_model}, {config.encoder_layers} encoder and
  {config.decoder_layers} decoder layers"""


def build_model_card(
    model,
    processor=None,
    metrics: dict[str, float] | None = None,
    dataset: str | None = None,
    license: str = "apache-2.0",
    base_model: str | None = None,
) -> ModelCard:
    """
    A model card for a CDAN checkpoint, with the Hub metadata the `image-to-text` widget and search need.

    Args:
        model (`CdanForConditionalGeneration`): the model being saved.
        processor (`CdanProcessor`, *optional*): its processor, for the input size.
        metrics (`dict[str, float]`, *optional*): test-split scores (e.g. `{"BLEU-4": 0.179}`), when known.
        dataset (`str`, *optional*): the training data set, e.g. `"iu_xray"`.
        license (`str`, *optional*): licence identifier of the weights. Models trained on IU X-Ray text inherit
            its CC BY-NC-ND 4.0 terms: pass `"cc-by-nc-nd-4.0"` for them.
        base_model (`str`, *optional*): Hub id of the model this one was fine-tuned from.
    """
    config = model.config
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-to-text",
        license=license,
        tags=["radiology-report-generation", "chest-x-ray", config.model_type, "custom_code"],
        datasets=[dataset] if dataset else None,
        base_model=base_model,
    )
    if metrics:
        card_data.metrics = sorted(metrics)
    metric_rows = (
        "\n".join(f"| {name} | {value:.3f} |" for name, value in metrics.items())
        if metrics
        else "| (not evaluated yet) | |"
    )
    input_size = f" at {processor.image_processor.image_size} px" if processor is not None else ""
    title, description = model_card_architecture(config, input_size)
    content = f"""---
{card_data.to_yaml()}
---

# {title}

{description}
- Training data: {dataset or "not recorded"}
- Requires `transformers>={MIN_TRANSFORMERS_VERSION}`, `timm`, and `trust_remote_code=True`

## Use

```python
from transformers import pipeline

reporter = pipeline("image-to-text", model="<this repo>", trust_remote_code=True)
reporter(("frontal.png", "lateral.png"))  # one study, several views
```

## Test-split metrics

| metric | value |
|---|---|
{metric_rows}
"""
    return ModelCard(content)


def save_checkpoint(model, processor, save_directory: str | os.PathLike, **model_card_kwargs) -> Path:
    """
    Write a complete, Hub-ready CDAN checkpoint folder (see [`CdanReportPipeline.save_pretrained`]).

    Args:
        model (`CdanForConditionalGeneration`): the trained model.
        processor (`CdanProcessor`): its processor (image processor and tokenizer).
        save_directory (`str` or `os.PathLike`): the folder to write.
        model_card_kwargs: passed to [`build_model_card`] (`metrics`, `dataset`, `license`, `base_model`).
    """
    reporter = CdanReportPipeline(model=model, processor=processor, device=model.device)
    reporter.save_pretrained(save_directory, model_card_kwargs=model_card_kwargs)
    return Path(save_directory)


def register_pipeline_in_config(config) -> None:
    """Record [`CdanReportPipeline`] as the checkpoint's `image-to-text` pipeline in `config.custom_pipelines`."""
    config.custom_pipelines = {
        "image-to-text": {
            "impl": f"{Path(__file__).stem}.{CdanReportPipeline.__name__}",
            "pt": [AutoModelForImageTextToText.__name__],
            "type": "multimodal",
        }
    }


def write_pipeline_files(save_directory: str | os.PathLike, model, processor=None, **model_card_kwargs) -> None:
    """
    Add what a saved model and processor still lack to be a Hub repository: `pipeline_cdan.py` (the remote code of
    the pipeline) with the modules it imports (`PIPELINE_MODULE_FILES`), and the model card.
    `config.custom_pipelines` must have been set before the model was saved.
    """
    for module_file in PIPELINE_MODULE_FILES:  # the pipeline's remote code and what it imports
        shutil.copy(Path(__file__).with_name(module_file), Path(save_directory) / module_file)
    build_model_card(model, processor, **model_card_kwargs).save(os.path.join(save_directory, "README.md"))


PIPELINE_REGISTRY.register_pipeline(
    "image-to-text", pipeline_class=CdanReportPipeline, pt_model=AutoModelForImageTextToText, type="multimodal"
)

__all__ = [
    "GROUNDING_INPUTS",
    "PIPELINE_MODULE_FILES",
    "STUDY_DETAIL_KEYS",
    "CdanReportPipeline",
    "build_model_card",
    "model_card_architecture",
    "reads_study_details",
    "register_pipeline_in_config",
    "save_checkpoint",
    "sentence_grounding",
    "write_pipeline_files",
]
