"""What the CDAN builders share: the bad-input policy, the study checks, small helpers, the config and base builder."""

import functools
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
from datasets.exceptions import DatasetGenerationError
from datasets.features import Features, Image, List, Value

from labeler_cdan import CHEXPERT_OBSERVATIONS, NEGATIVE, NOT_MENTIONED, POSITIVE, UNCERTAIN, label_report


logger = logging.getLogger(__name__)

_patched_for_streaming = True
"""Opt out of `datasets`' streaming patches, which would replace `open`, `Path` and `os.path.*` in the namespace of
every builder module with fsspec-aware versions. These builders only read local files."""

SPLITS = ("train", "validation", "test")
"""Split names of every prepared `DatasetDict`."""

SPLIT_ALIASES = {
    "train": "train",
    "val": "validation",
    "valid": "validation",
    "validate": "validation",
    "validation": "validation",
    "test": "test",
}
"""Split names accepted in input files (R2Gen writes `val`, MIMIC-CXR's split table `validate`)."""

FRONTAL, LATERAL, UNKNOWN_VIEW = "frontal", "lateral", "unknown"
SKIPPED_FILENAME = "skipped.json"
LABEL_SOURCE_LABELER = "labeler_cdan"
LABEL_SOURCE_MIMIC = "mimic-cxr-2.0.0-chexpert"
SPLIT_RATIOS = (0.7, 0.1, 0.2)
"""Train / validation / test fractions of the seeded split (R2Gen's 7:1:2)."""

PROBLEM_POLICIES: dict[str, tuple[str, ...]] = {
    "missing_image": ("error", "skip"),
    "bad_image": ("error", "skip"),
    "bad_report": ("error", "skip"),
    "duplicate_id": ("error", "skip"),
    "unknown_split": ("error", "skip"),
    "unmatched_report": ("error", "skip"),
    "missing_metadata": ("error", "skip"),
    "empty_findings": ("skip", "error"),
    "too_few_images": ("skip", "error"),
    "missing_labels": ("skip", "error", "labeler"),
}
"""Each bad-input problem and its allowed actions; the first is the default (`on_<problem>` config fields)."""

STUDY_PROBLEM_MESSAGES = {
    "unknown_split": "unknown split {split_name!r} (known: " + ", ".join(sorted(SPLIT_ALIASES)) + ")",
    "duplicate_id": "id {study_id} appears more than once; the first is kept",
    "empty_findings": "the findings are empty",
    "too_few_images": "{image_count} image(s), fewer than min_images={min_images}",
}
"""The message of each problem [`check_study`] finds."""

_UNCHECKED = object()
"""Default of [`check_study`]'s `split`: the split is not checked."""


class CdanDataError(ValueError):
    """
    Bad input data. The message names the file and, where there is one, the study id.

    Args:
        message (`str`): the full message.
        problem (`str`, *optional*): the problem kind (a key of `PROBLEM_POLICIES`).
        item_id (`str`, *optional*): the study (or line, or archive member) concerned.
        path (`str`, *optional*): the file concerned.
    """

    def __init__(self, message: str, problem: str | None = None, item_id: str | None = None, path: str | None = None):
        super().__init__(message)
        self.problem = problem
        self.item_id = item_id
        self.path = path


class ProblemLog:
    """
    Applies the bad-input policies and keeps the list of dropped studies.

    Args:
        dataset_name (`str`): used in messages.
        policies (`dict[str, str]`): action per problem kind (see `PROBLEM_POLICIES`).
    """

    def __init__(self, dataset_name: str, policies: dict[str, str]):
        self.dataset_name = dataset_name
        self.policies = dict(policies)
        self.records: list[dict[str, str | None]] = []

    def report(self, problem: str, item_id: Any, detail: str, path: Any = None) -> str:
        """
        Handle one problem: raise [`CdanDataError`] under `"error"`, otherwise record it.

        Returns:
            `str`: the action taken (`"skip"` or `"labeler"`).
        """
        action = self.policies[problem]
        path_text = None if path is None else str(path)
        if action == "error":
            where = f"study {item_id!s}" + (f", file {path_text}" if path_text else "")
            alternatives = " or ".join(repr(option) for option in PROBLEM_POLICIES[problem] if option != "error")
            raise CdanDataError(
                f"{self.dataset_name}: {detail} ({where}). Pass on_{problem}={alternatives} to drop such studies "
                f"instead; they are then listed in {SKIPPED_FILENAME}.",
                problem=problem,
                item_id=str(item_id),
                path=path_text,
            )
        self.records.append({"id": str(item_id), "reason": problem, "detail": detail, "file": path_text})
        return action

    def note(self, reason: str, item_id: Any, detail: str, path: Any = None) -> None:
        """Record a study left out by design (no policy applies), e.g. an Open-I report outside the annotation."""
        self.records.append(
            {"id": str(item_id), "reason": reason, "detail": detail, "file": None if path is None else str(path)}
        )

    def summary(self) -> dict[str, Any]:
        """The content of `skipped.json`: count, counts by reason and the records (`labeler` fallbacks excluded)."""
        dropped = [record for record in self.records if self.policies.get(record["reason"]) != "labeler"]
        relabelled = [record for record in self.records if self.policies.get(record["reason"]) == "labeler"]
        return {
            "dataset": self.dataset_name,
            "count": len(dropped),
            "counts_by_reason": dict(Counter(record["reason"] for record in dropped)),
            "skipped": dropped,
            "labelled_by_labeler": relabelled,
        }

    def write(self, directory: str | os.PathLike, final_directory: str | os.PathLike | None = None) -> Path:
        """Write `skipped.json` into `directory` and log the count (naming `final_directory` when given)."""
        summary = self.summary()
        path = Path(directory) / SKIPPED_FILENAME
        path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        shown = Path(final_directory or directory) / SKIPPED_FILENAME
        if summary["count"] or summary["labelled_by_labeler"]:
            logger.warning(
                "%s: skipped %d studies %s, labelled %d with labeler_cdan; ids and reasons in %s",
                self.dataset_name,
                summary["count"],
                summary["counts_by_reason"],
                len(summary["labelled_by_labeler"]),
                shown,
            )
        else:
            logger.info("%s: no study skipped (%s)", self.dataset_name, shown)
        return path

    def check(self, study_id: Any, path: Any = None, **facts) -> bool:
        """
        Run [`check_study`] on the facts given and report the problem found, if any.

        Returns:
            `bool`: True when the study passed (False when a problem was found and the study is skipped).
        """
        problem = check_study(study_id, **facts)
        if problem is None:
            return True
        self.report(problem[0], study_id, problem[1], path)
        return False


def check_study(
    study_id: Any,
    *,
    split: str | None | object = _UNCHECKED,
    split_name: Any = None,
    is_duplicate: bool = False,
    findings: str | None = None,
    image_count: int | None = None,
    min_images: int = 1,
) -> tuple[str, str] | None:
    """
    The checks every builder makes of a study, in this order; only those whose facts are given are made.

    Args:
        study_id (`Any`): the study, for messages.
        split (`str`, *optional*): the canonical split (see [`canonical_split`]); None is `unknown_split`.
        split_name (`Any`, *optional*): the split as written in the input, for the message.
        is_duplicate (`bool`, *optional*): whether the id was seen before (`duplicate_id`).
        findings (`str`, *optional*): the findings; empty or blank is `empty_findings`.
        image_count (`int`, *optional*): the number of images; fewer than `min_images` is `too_few_images`.
        min_images (`int`, *optional*, defaults to 1): the fewest images a study may have.

    Returns:
        `tuple[str, str]` or None: the first problem found and its message (from `STUDY_PROBLEM_MESSAGES`).
    """
    if split is None:
        problem = "unknown_split"
    elif is_duplicate:
        problem = "duplicate_id"
    elif findings is not None and not findings.strip():
        problem = "empty_findings"
    elif image_count is not None and image_count < min_images:
        problem = "too_few_images"
    else:
        return None
    details = {"study_id": study_id, "split_name": split_name, "image_count": image_count, "min_images": min_images}
    return problem, STUDY_PROBLEM_MESSAGES[problem].format(**details)


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace to one space and strip (how R2Gen's `report` relates to Open-I FINDINGS)."""
    return " ".join(text.split())


def canonical_split(name: Any) -> str | None:
    """`train` / `validation` / `test` for an accepted split name (see `SPLIT_ALIASES`), otherwise None."""
    return SPLIT_ALIASES.get(str(name).strip().lower()) if name is not None else None


def first_existing(*candidates: Path | None) -> Path | None:
    """The first candidate path that exists, or None."""
    for candidate in candidates:
        if candidate is not None and candidate.exists():
            return candidate
    return None

@functools.lru_cache(maxsize=16384)
def _label_text(text: str) -> tuple[int, ...]:
    states = tuple(int(state) for state in label_report(text))
    if len(states) != len(CHEXPERT_OBSERVATIONS):
        raise ValueError(f"label_report returned {len(states)} states, expected {len(CHEXPERT_OBSERVATIONS)}.")
    return states


def report_labels(findings: str | None, impression: str | None = None) -> list[int]:
    """
    The 14 CheXpert states of a report from `labeler_cdan.label_report` over findings and impression.

    Args:
        findings (`str`, *optional*): the FINDINGS section.
        impression (`str`, *optional*): the IMPRESSION section (joined after the findings with a newline).

    Returns:
        `list[int]`: one state per entry of `CHEXPERT_OBSERVATIONS`.
    """
    text = "\n".join(part.strip() for part in (findings, impression) if part and part.strip())
    return list(_label_text(text))


def check_image_file(path: str | os.PathLike) -> str | None:
    """
    Check that an image file opens and is complete, without decoding it fully where the format allows.

    PNG files are checked with PIL's `verify()` (chunk structure and CRCs up to IEND: catches truncation, ~1 ms for
    a 640 px PNG); other formats, whose `verify()` checks little (JPEG), are decoded.

    Returns:
        `str` or None: why the file is unreadable, or None when it is fine.
    """
    try:
        with PIL.Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            else:
                image.load()
            if image.size[0] == 0 or image.size[1] == 0:
                return "the image is empty (zero width or height)"
    except (OSError, SyntaxError, EOFError, ValueError, PIL.Image.DecompressionBombError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def view_from_code(code: str | None) -> str:
    """`frontal`, `lateral` or `unknown` from a DICOM View Position / MIMIC `ViewPosition` value."""
    text = (code or "").strip().upper()
    if not text:
        return UNKNOWN_VIEW
    if "LAT" in text or text in {"LL", "RL"}:
        return LATERAL
    if text.split()[0] in {"PA", "AP"}:
        return FRONTAL
    return UNKNOWN_VIEW


def seeded_split(ids: Iterable[Any], seed: int, ratios: Sequence[float] = SPLIT_RATIOS) -> dict[Any, str]:
    """
    The documented seeded split: sort the ids, permute them with `numpy.random.default_rng(seed)`, cut 7:1:2.

    Args:
        ids (`Iterable`): one id per patient (all of one type, sortable).
        seed (`int`): the permutation seed.
        ratios (`Sequence[float]`, *optional*): train and validation fractions (the test split takes the rest).

    Returns:
        `dict`: id -> `train` / `validation` / `test`; `floor(0.7 n + 0.5)` train ids and `floor(0.1 n + 0.5)`
        validation ids.
    """
    ordered = sorted(set(ids))
    count = len(ordered)
    train_count = math.floor(count * ratios[0] + 0.5)
    validation_count = min(math.floor(count * ratios[1] + 0.5), count - train_count)
    permutation = np.random.default_rng(seed).permutation(count)
    assignment = {}
    for position, index in enumerate(permutation):
        if position < train_count:
            split = "train"
        elif position < train_count + validation_count:
            split = "validation"
        else:
            split = "test"
        assignment[ordered[int(index)]] = split
    return assignment


@dataclass
class CdanBuilderConfig(datasets.BuilderConfig):
    """
    Options shared by the CDAN builders.

    Args:
        verify_images (`bool`, *optional*, defaults to `True`):
            Open every input image at prepare time (see [`check_image_file`]); unreadable ones are `bad_image`.
        max_studies_per_split (`int`, *optional*):
            Keep at most this many studies per split (the first ones, in input order), for quick runs.
        on_missing_image, on_bad_image, on_bad_report, on_duplicate_id, on_unknown_split, on_unmatched_report,
        on_missing_metadata (`str`, *optional*, default to `"error"`):
            `"error"` or `"skip"` for each bad-input problem (docs/data.md).
        on_empty_findings, on_too_few_images (`str`, *optional*, default to `"skip"`):
            `"skip"` or `"error"`.
        on_missing_labels (`str`, *optional*, defaults to `"skip"`):
            `"skip"`, `"error"` or `"labeler"` (label the findings with `labeler_cdan` instead).
    """

    verify_images: bool = True
    max_studies_per_split: int | None = None
    on_missing_image: str = "error"
    on_bad_image: str = "error"
    on_bad_report: str = "error"
    on_duplicate_id: str = "error"
    on_unknown_split: str = "error"
    on_unmatched_report: str = "error"
    on_missing_metadata: str = "error"
    on_empty_findings: str = "skip"
    on_too_few_images: str = "skip"
    on_missing_labels: str = "skip"

    def __post_init__(self):
        super().__post_init__()
        for problem, allowed in PROBLEM_POLICIES.items():
            value = getattr(self, f"on_{problem}")
            if value not in allowed:
                raise ValueError(f"on_{problem} must be one of {list(allowed)}, got {value!r}.")
        if self.max_studies_per_split is not None and self.max_studies_per_split < 1:
            raise ValueError(f"max_studies_per_split must be positive, got {self.max_studies_per_split}.")

    def policies(self) -> dict[str, str]:
        """The action per problem kind."""
        return {problem: getattr(self, f"on_{problem}") for problem in PROBLEM_POLICIES}


def core_features() -> dict[str, Any]:
    """The columns every CDAN dataset has."""
    return {
        "id": Value("string"),
        "split": Value("string"),
        "images": List(Image()),
        "views": List(Value("string")),
        "findings": Value("string"),
        "impression": Value("string"),
        "indication": Value("string"),
        "comparison": Value("string"),
        "chexpert_labels": List(Value("int8"), length=len(CHEXPERT_OBSERVATIONS)),
        "label_source": Value("string"),
    }


LABEL_DESCRIPTION = (
    "chexpert_labels holds one state per observation, in this order: "
    + ", ".join(CHEXPERT_OBSERVATIONS)
    + f"; states POSITIVE={POSITIVE}, NEGATIVE={NEGATIVE}, UNCERTAIN={UNCERTAIN}, NOT_MENTIONED={NOT_MENTIONED}."
)


class CdanBuilder(datasets.GeneratorBasedBuilder):
    """
    Base of the CDAN builders: names the cache folder after the dataset, applies the bad-input policies, writes
    `skipped.json` into the prepared folder and lets [`CdanDataError`] through unwrapped.

    Args:
        cache_dir (`str`, *optional*): root of the prepared data (defaults to `HF_DATASETS_CACHE`).
        data_dir (`str`, *optional*): folder with the input files.
        **config_kwargs: fields of the builder's config class.
    """

    DATASET_NAME = "cdan"
    BUILDER_CONFIG_CLASS = CdanBuilderConfig
    VERSION = datasets.Version("1.1.0")  # 1.1: history, prior-study and box columns
    EXTRA_FEATURES: dict[str, Any] = {}
    """Columns of this dataset after those of [`core_features`]."""
    DESCRIPTION = ""
    HOMEPAGE = ""
    LICENSE = ""
    CITATION = ""

    def __init__(self, *args, dataset_name: str | None = None, **kwargs):
        super().__init__(*args, dataset_name=dataset_name or self.DATASET_NAME, **kwargs)
        self.problems = ProblemLog(self.DATASET_NAME, self.config.policies())

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=f"{self.DESCRIPTION} {LABEL_DESCRIPTION}",
            features=Features({**core_features(), **self.EXTRA_FEATURES}),
            homepage=self.HOMEPAGE,
            license=self.LICENSE,
            citation=self.CITATION,
        )

    @property
    def prepared_dir(self) -> Path:
        """The folder of the prepared data (Arrow files, `dataset_info.json`, `skipped.json`)."""
        return Path(self._final_output_dir())

    @property
    def skipped_file(self) -> Path:
        """`skipped.json` of the prepared data."""
        return self.prepared_dir / SKIPPED_FILENAME

    def _final_output_dir(self) -> str:
        output_dir = str(self._output_dir)
        return output_dir.removesuffix(".incomplete")

    def _data_dir(self) -> Path | None:
        return Path(self.config.data_dir).expanduser() if self.config.data_dir else None

    def _option_path(self, value: str | None) -> Path | None:
        return Path(value).expanduser() if value else None

    def _split_generators(self, dl_manager):
        self.problems = ProblemLog(self.DATASET_NAME, self.config.policies())
        gen_kwargs_by_split = self._plan()
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"split": split, **gen_kwargs_by_split[split]})
            for split in SPLITS
        ]

    def _plan(self) -> dict[str, dict[str, Any]]:
        """Read and check the inputs once; returns the `gen_kwargs` of each split (besides `split`)."""
        raise NotImplementedError

    def _as_dataset(self, split=datasets.Split.TRAIN, in_memory: bool = False) -> datasets.Dataset:
        split_info = self.info.splits.get(str(split)) if self.info.splits else None
        if split_info is not None and not split_info.num_examples:
            # `datasets` cannot read back a split with no example.
            info = self.info.copy()
            return datasets.Dataset.from_dict(
                {name: [] for name in self.info.features}, features=self.info.features, info=info, split=str(split)
            )
        return super()._as_dataset(split=split, in_memory=in_memory)

    def _prepare_split(self, split_generator, **kwargs):
        try:
            return super()._prepare_split(split_generator, **kwargs)
        except DatasetGenerationError as error:
            if isinstance(error.__cause__, CdanDataError):
                raise error.__cause__ from None
            raise

    def _download_and_prepare(self, dl_manager, verification_mode, **prepare_split_kwargs):
        super()._download_and_prepare(dl_manager, verification_mode, **prepare_split_kwargs)
        self.problems.write(self._output_dir, self._final_output_dir())

    def _check_images(self, study_id: str, paths: Sequence[Path]) -> bool:
        """Existence (always) and readability (when `verify_images`) of a study's images; False when skipped."""
        for path in paths:
            if not path.is_file():
                self.problems.report("missing_image", study_id, f"image file {path} does not exist", path)
                return False
        if self.config.verify_images:
            for path in paths:
                reason = check_image_file(path)
                if reason is not None:
                    self.problems.report("bad_image", study_id, f"image file {path} is unreadable: {reason}", path)
                    return False
        return True


__all__ = [
    "FRONTAL",
    "LABEL_DESCRIPTION",
    "LABEL_SOURCE_LABELER",
    "LABEL_SOURCE_MIMIC",
    "LATERAL",
    "PROBLEM_POLICIES",
    "SKIPPED_FILENAME",
    "SPLITS",
    "SPLIT_ALIASES",
    "SPLIT_RATIOS",
    "STUDY_PROBLEM_MESSAGES",
    "UNKNOWN_VIEW",
    "CdanBuilder",
    "CdanBuilderConfig",
    "CdanDataError",
    "ProblemLog",
    "canonical_split",
    "check_image_file",
    "check_study",
    "core_features",
    "first_existing",
    "normalize_whitespace",
    "report_labels",
    "seeded_split",
    "view_from_code",
]
