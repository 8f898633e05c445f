"""CDAN training data as Hugging Face `datasets` builders: IU X-Ray, MIMIC-CXR and the embedded demo.

Three `datasets.GeneratorBasedBuilder` subclasses turn chest X-ray studies into a `datasets.DatasetDict` with the
splits `train`, `validation` and `test` (R2Gen's `val` is renamed `validation`). There are no loading scripts
(`datasets` 4+ dropped them): the builders are instantiated directly, or through the one-line
[`load_cdan_dataset`], and prepared with `download_and_prepare()` / `as_dataset()`. Nothing is downloaded; each
builder reads files the user already has.

References:
    - R2Gen (Chen et al., EMNLP 2020, "Generating Radiology Reports via Memory-driven Transformer"): the
      `annotation.json` layout and the IU X-Ray split (2069 / 296 / 590 studies) and MIMIC-CXR split used by CDAN.
    - IU X-Ray / Open-I (Demner-Fushman et al., JAMIA 2016): `NLMCXR_reports.tgz` (`ecgen-radiology/*.xml`) and the
      `NLMCXR_png` image folder. Reports are CC BY-NC-ND 4.0.
    - MIMIC-CXR-JPG 2.0.0 (Johnson et al., 2019): `files/p<NN>/p<subject_id>/s<study_id>/<dicom_id>.jpg` and the
      `mimic-cxr-2.0.0-{chexpert,metadata,split}.csv(.gz)` tables. Credentialed data: never redistributed here.
    - CheXpert (Irvin et al., AAAI 2019): the 14 observations and their four label states.

Columns shared by every builder:
    - `id` (string): the study id (R2Gen id for IU X-Ray with an annotation file, `CXR<uid>` for Open-I reports
      without one, the DICOM id for MIMIC-CXR as in R2Gen's MIMIC annotation).
    - `split` (string): `train`, `validation` or `test`.
    - `images` (`List(Image())`): the views, stored as file paths and decoded lazily (on access).
    - `views` (`List(string)`): per image `frontal`, `lateral` or `unknown` (rules below).
    - `findings` (string): the report CDAN generates. `impression`, `indication`, `comparison` (string or None).
    - `chexpert_labels` (`List(int8, length=14)`): states in the order of `CHEXPERT_OBSERVATIONS`, with
      `POSITIVE=1, NEGATIVE=0, UNCERTAIN=-1, NOT_MENTIONED=-2` (from `labeler_cdan`).
    - `label_source` (string): `labeler_cdan` (from `label_report` over findings + impression) or
      `mimic-cxr-2.0.0-chexpert` (MIMIC's own CheXpert table, four states kept).

Builder-specific columns: IU X-Ray adds `openi_uid`, `view_positions` (DICOM "View Position", `""` if unknown) and
`mesh_major`; MIMIC-CXR adds `subject_id`, `study_id`, `view_positions` (metadata `ViewPosition`),
`prior_study_id` (None for a patient's first study) and `prior_image_paths`; the demo has the IU X-Ray columns
(`view_positions` blank, `mesh_major` empty) plus `synthetic` (always True).

IU X-Ray layouts ([`IuXrayBuilder`]):
    (a) R2Gen: `annotation.json` + `images/<id>/0.png, 1.png`. Findings are the annotation's `report` (R2Gen's
        cleaned FINDINGS); impression, indication and comparison are not in this layout (None). Views follow R2Gen's
        convention `0.png` = frontal, `1.png` = lateral (a convention R2Gen's data does not record; switch it off
        with `r2gen_view_convention=False` to get `unknown`).
    (b) Open-I: `NLMCXR_reports.tgz` (or the extracted `ecgen-radiology/` folder) + `NLMCXR_png/<image id>.png`,
        optionally `nlmcxr_dicom_metadata.csv(.gz)` for views. Sections are the XML's `AbstractText` elements
        (COMPARISON, INDICATION, FINDINGS, IMPRESSION), read as UTF-8 and kept verbatim (outer whitespace stripped).
        With an R2Gen `annotation.json`, each annotation id is mapped to its report through the image names: R2Gen's
        id is the NLMCXR image name without its last `-NNNN` part, so the report is the one with an image named
        `<id>-...`, and the study's images are exactly those images; the report's FINDINGS must equal the
        annotation's `report` up to whitespace. This reproduces R2Gen's split (2069 / 296 / 590). Without an
        annotation file the split is a seeded 7:1:2 split by patient (below).
    With `layout="auto"` the Open-I layout is used when its report archive and image folder are found, otherwise
    the R2Gen layout.

Split rule without an annotation (IU X-Ray, layout b): Open-I de-identified every report as its own patient (the
    DICOM "Patient ID" equals the report number for all 7469 images), so a patient is a report `uid` and splitting by
    report is splitting by patient. The studies eligible from the reports alone (the XML parses, FINDINGS is
    not empty, at least `min_images` images referenced, uid not duplicated) are sorted by uid, permuted with
    `numpy.random.default_rng(split_seed)`, and the first `floor(0.7 n + 0.5)` go to train, the next
    `floor(0.1 n + 0.5)` to validation and the rest to test. Image problems are checked afterwards, so a missing
    image file removes that study only and never moves another study to a different split. `min_images=2` selects
    R2Gen's 2955 studies (and the same split sizes, though not the same members).

View rule (IU X-Ray, layout b): DICOM "View Position" is often blank and often PA on both images of a study, so a
    code is trusted as follows: LL / RL / anything with LAT is `lateral`; PA / AP (and PA.../AP... variants) is
    `frontal` only when the study also has a lateral code or has exactly one frontal code; everything else is
    `unknown`. For a two-image study whose caption names both a frontal (PA/AP/frontal) and a lateral view, when
    one image is known the other gets the other view. Images are then ordered frontal, lateral, unknown (stable
    within each group); `max_images` keeps the first frontal, the first lateral, then the others. MIMIC-CXR:
    `ViewPosition` with LAT, LL or RL is `lateral`, PA/AP variants `frontal`, other values (blank, SWIMMERS, LAO,
    RAO, LPO, ...) `unknown`. Demo: the rendered views are named by the renderer.

MIMIC-CXR ([`MimicCxrBuilder`]): one example per entry of R2Gen's MIMIC `annotation.json` (one image each, as in
    R2Gen). The builder streams: the annotation is parsed entry by entry (never loaded whole, reports never held),
    only the needed columns of the CSV tables are read, in chunks, and kept compact (numbers as numpy arrays, ids
    as Arrow strings, about 120 bytes per metadata row and no Python object per row), and entries are joined with
    them in batches of `lookup_batch_size`. The prior study is the patient's latest study whose
    (StudyDate, StudyTime) is strictly earlier, over all studies in the metadata table; studies without a date have
    no prior and are nobody's prior. `prior_image_paths` lists the prior study's images from the metadata table;
    they are not opened or checked (the prior may not be in the annotation).

Demo ([`DemoBuilder`]): reads `data/demo/reports.jsonl` next to this file (verbatim Open-I text), labels each report
    with `label_report`, renders the views with `synthetic_cxr.render_study(labels, seed=crc32(id))` and writes the
    PNGs into the prepared dataset's own folder (`<prepared dir>/images/`), so `Image()` stores paths. Rendering runs
    in `min(2, CPU count)` processes unless `download_and_prepare(num_proc=...)` says otherwise.

Bad input ([`CdanBuilderConfig`] `on_<problem>` policies): each problem either raises [`CdanDataError`] with a
    message naming the file and the study id (`"error"`), or drops the study (`"skip"`); `missing_labels` can also
    fall back to `"labeler"`. Problems: `missing_image` (a referenced image file is absent), `bad_image`
    (unreadable or truncated image; checked when `verify_images`), `bad_report` (a report XML or JSON line that
    does not parse, an annotation entry without the expected fields), `duplicate_id` (the first occurrence is
    kept), `unknown_split`, `unmatched_report` (annotation id without a matching Open-I report), `missing_metadata`
    (MIMIC image absent from the metadata table), `empty_findings`, `too_few_images` and `missing_labels` (MIMIC
    study absent from the CheXpert table). Defaults: `empty_findings` and `too_few_images` skip (R2Gen drops such
    studies), `missing_labels` skips, everything else raises. Every preparation writes `skipped.json` (count, counts
    by reason and one record per dropped study: id, reason, detail, file) into the prepared dataset's folder and
    logs the count; Open-I reports left out because they are not in the given annotation are listed there too
    (reason `not_in_annotation`).

Where prepared data lives: `datasets`' cache layout, `<cache_dir>/<iu_xray|mimic_cxr|demo>/<config id>/<version>/`
    (`cache_dir` defaults to `HF_DATASETS_CACHE`); the config id hashes every option, so different policies or
    inputs never share a cache. Input files are not fingerprinted: pass `download_mode="force_redownload"` after
    editing them.

Sharing: [`export_to_parquet`] writes `data/<split>-NNNNN-of-NNNNN.parquet` shards with the image bytes embedded,
    and [`push_to_hub`] pushes Parquet (never a script); it refuses MIMIC-CXR, whose licence forbids redistribution.
"""

import functools
import json
import logging
import math
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import datasets
import numpy as np
import pandas as pd
import PIL.Image
import pyarrow as pa
import pyarrow.compute as pc
from datasets.exceptions import DatasetGenerationError
from datasets.features import Features, Image, List, Value
from datasets.table import embed_table_storage

try:
    from .labeler_cdan import CHEXPERT_OBSERVATIONS, NEGATIVE, NOT_MENTIONED, POSITIVE, UNCERTAIN, label_report
except ImportError:
    from labeler_cdan import CHEXPERT_OBSERVATIONS, NEGATIVE, NOT_MENTIONED, POSITIVE, UNCERTAIN, label_report

try:
    from .synthetic_cxr import render_study, save_png
except ImportError:
    from synthetic_cxr import render_study, save_png


logger = logging.getLogger(__name__)

_patched_for_streaming = True
"""Opt out of `datasets`' streaming patches: instantiating a builder would otherwise replace `open`, `Path`,
`os.path.*` and `pandas.read_csv` in this module's namespace with fsspec-aware versions (slower, and surprising for the
helpers this module exports). These builders only read local files."""

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

DEMO_REPORTS_FILE = Path(__file__).resolve().parent / "data" / "demo" / "reports.jsonl"

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

MIMIC_TABLE_NAMES = {
    "chexpert": "mimic-cxr-2.0.0-chexpert",
    "metadata": "mimic-cxr-2.0.0-metadata",
    "split": "mimic-cxr-2.0.0-split",
}
MIMIC_METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime")

_WHITESPACE = re.compile(r"[ \t\r\n]*")
_JSON_DECODER = json.JSONDecoder()


# --------------------------------------------------------------------------------------------------------------------
# Errors and the record of skipped studies
# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------------------------------
def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace to one space and strip (how R2Gen's `report` relates to Open-I FINDINGS)."""
    return " ".join(text.split())


def canonical_split(name: Any) -> str | None:
    """`train` / `validation` / `test` for an accepted split name (see `SPLIT_ALIASES`), otherwise None."""
    return SPLIT_ALIASES.get(str(name).strip().lower()) if name is not None else None


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


_FRONTAL_IN_CAPTION = re.compile(r"\b(pa|ap|frontal)\b", re.IGNORECASE)
_LATERAL_IN_CAPTION = re.compile(r"\blat(eral)?\b", re.IGNORECASE)


def iu_views_from_dicom(codes: Sequence[str], caption: str = "") -> list[str]:
    """
    Views of one Open-I study's images from their DICOM View Position codes and the study caption.

    See the module docstring (view rule): lateral codes are trusted, frontal codes only when the study also has a
    lateral code or exactly one frontal code, and a two-view caption completes a two-image study with one known view.

    Args:
        codes (`Sequence[str]`): View Position per image (`""` when unknown).
        caption (`str`, *optional*): the study caption (e.g. "Xray Chest PA and Lateral").

    Returns:
        `list[str]`: `frontal` / `lateral` / `unknown` per image.
    """
    raw = [view_from_code(code) for code in codes]
    has_lateral = LATERAL in raw
    frontal_count = raw.count(FRONTAL)
    views = [
        view if view == LATERAL or (view == FRONTAL and (has_lateral or frontal_count == 1)) else UNKNOWN_VIEW
        for view in raw
    ]
    two_view_caption = bool(_FRONTAL_IN_CAPTION.search(caption or "")) and bool(
        _LATERAL_IN_CAPTION.search(caption or "")
    )
    if len(views) == 2 and two_view_caption and views.count(UNKNOWN_VIEW) == 1:
        known = views[0] if views[1] == UNKNOWN_VIEW else views[1]
        other = LATERAL if known == FRONTAL else FRONTAL
        views = [other if view == UNKNOWN_VIEW else view for view in views]
    return views


def frontal_first_order(views: Sequence[str]) -> list[int]:
    """Indices ordering views frontal, lateral, unknown (stable within each group)."""
    rank = {FRONTAL: 0, LATERAL: 1}
    return sorted(range(len(views)), key=lambda index: (rank.get(views[index], 2), index))


def select_view_indices(views: Sequence[str], count: int | None) -> list[int]:
    """
    Which images of a study to keep: the first frontal, the first lateral, then the others in order.

    Args:
        views (`Sequence[str]`): `frontal` / `lateral` / `unknown` per image.
        count (`int`, *optional*): how many to keep (None keeps all).

    Returns:
        `list[int]`: the kept indices, in frontal, lateral, unknown order (stable).
    """
    order = frontal_first_order(views)
    if count is None or count >= len(order):
        return order
    preferred = [
        next(index for index in order if views[index] == view) for view in (FRONTAL, LATERAL) if view in views
    ]
    chosen = (preferred + [index for index in order if index not in preferred])[:count]
    return [index for index in order if index in chosen]


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


# --------------------------------------------------------------------------------------------------------------------
# Streaming reader of R2Gen's annotation.json
# --------------------------------------------------------------------------------------------------------------------
class _JsonTextStream:
    """A UTF-8 text file read in chunks, from which JSON values are decoded one at a time."""

    def __init__(self, file, path: Path, chunk_chars: int):
        self.file = file
        self.path = path
        self.chunk_chars = chunk_chars
        self.buffer = ""
        self.position = 0
        self.offset = 0
        self.at_end = False

    def error(self, message: str, position: int | None = None) -> CdanDataError:
        where = self.offset + (self.position if position is None else position)
        return CdanDataError(
            f"{self.path} is not an R2Gen annotation file: {message} at character {where}.",
            problem="bad_report",
            path=str(self.path),
        )

    def read_more(self) -> bool:
        if self.at_end:
            return False
        try:
            chunk = self.file.read(self.chunk_chars)
        except UnicodeDecodeError as error:
            raise CdanDataError(f"{self.path} is not valid UTF-8: {error}.", path=str(self.path)) from error
        if not chunk:
            self.at_end = True
            return False
        self.buffer = self.buffer[self.position :] + chunk
        self.offset += self.position
        self.position = 0
        return True

    def peek(self) -> str:
        while True:
            self.position = _WHITESPACE.match(self.buffer, self.position).end()
            if self.position < len(self.buffer):
                return self.buffer[self.position]
            if not self.read_more():
                raise self.error("unexpected end of file")

    def take(self, expected: str) -> str:
        character = self.peek()
        if character not in expected:
            wanted = " or ".join(repr(item) for item in expected)
            raise self.error(f"expected {wanted}, found {character!r}")
        self.position += 1
        return character

    def decode(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = _JSON_DECODER.raw_decode(self.buffer, self.position)
                if end < len(self.buffer) or self.at_end:
                    self.position = end
                    return value
            except json.JSONDecodeError as error:
                if self.at_end:
                    raise self.error(f"invalid JSON ({error.msg})", error.pos) from None
            self.read_more()


def iter_r2gen_annotation(path: str | os.PathLike, chunk_chars: int = 1 << 20) -> Iterator[tuple[str, int, Any]]:
    """
    Stream the entries of an R2Gen `annotation.json` (`{"train": [...], "val": [...], "test": [...]}`).

    Memory stays bounded by the largest entry and `chunk_chars`, whatever the number of entries (MIMIC-CXR's file
    has ~270k); entries are decoded one at a time with `json.JSONDecoder.raw_decode`.

    Args:
        path (`str` or `os.PathLike`): the annotation file (UTF-8).
        chunk_chars (`int`, *optional*): characters read at a time.

    Yields:
        `tuple[str, int, Any]`: the split key as written in the file, the entry's index in that split, the entry.

    Raises:
        `CdanDataError`: the file is not valid UTF-8 JSON in this layout (the message names the file and position).
    """
    path = Path(path)
    with open(path, encoding="utf-8") as file:
        stream = _JsonTextStream(file, path, chunk_chars)
        stream.take("{")
        if stream.peek() == "}":
            return
        while True:
            key = stream.decode()
            if not isinstance(key, str):
                raise stream.error("expected a split name")
            stream.take(":")
            stream.take("[")
            index = 0
            if stream.peek() == "]":
                stream.take("]")
            else:
                while True:
                    yield key, index, stream.decode()
                    index += 1
                    if stream.take(",]") == "]":
                        break
            if stream.take(",}") == "}":
                return


def annotation_entry_split(key: str, entry: Any) -> str | None:
    """The canonical split of an annotation entry, or None when its key or its own `split` field is unknown."""
    key_split = canonical_split(key)
    if key_split is None:
        return None
    if isinstance(entry, dict) and "split" in entry and canonical_split(entry["split"]) != key_split:
        return None
    return key_split


# --------------------------------------------------------------------------------------------------------------------
# Open-I report XML
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class OpenIReport:
    """One parsed `ecgen-radiology/<n>.xml` report."""

    uid: int
    comparison: str
    indication: str
    findings: str
    impression: str
    mesh_major: list[str]
    image_ids: list[str]
    captions: list[str]
    source: str


def parse_openi_report(data: bytes, source: str) -> OpenIReport:
    """
    Parse one Open-I report XML.

    Args:
        data (`bytes`): the XML document (its declared encoding, UTF-8 in Open-I, is honoured).
        source (`str`): where it comes from, for messages.

    Returns:
        [`OpenIReport`]: uid (from `<uId id="CXR<uid>">`), the four `AbstractText` sections (empty string when
        absent), MeSH major terms and the `parentImage` ids (NLMCXR_png file stems) with their captions.

    Raises:
        `ValueError`: the XML does not parse or has no `uId` of the form `CXR<number>`.
    """
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        raise ValueError(f"the report XML {source} does not parse ({error})") from error
    uid_element = root.find("uId")
    uid_text = uid_element.get("id", "") if uid_element is not None else ""
    match = re.fullmatch(r"CXR(\d+)", uid_text.strip())
    if match is None:
        raise ValueError(f'the report XML {source} has no <uId id="CXR<number>"> (found {uid_text!r})')
    sections = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").strip().upper()
        if label:
            sections[label] = "".join(node.itertext()).strip()
    mesh_major = [node.text.strip() for node in root.findall("MeSH/major") if node.text and node.text.strip()]
    image_ids, captions = [], []
    for node in root.findall("parentImage"):
        image_id = (node.get("id") or "").strip()
        if image_id:
            image_ids.append(image_id)
            captions.append((node.findtext("caption") or "").strip())
    return OpenIReport(
        uid=int(match.group(1)),
        comparison=sections.get("COMPARISON", ""),
        indication=sections.get("INDICATION", ""),
        findings=sections.get("FINDINGS", ""),
        impression=sections.get("IMPRESSION", ""),
        mesh_major=mesh_major,
        image_ids=image_ids,
        captions=captions,
        source=source,
    )


def iter_openi_report_files(reports_path: str | os.PathLike) -> Iterator[tuple[str, str, bytes]]:
    """
    The report XML files of an Open-I download: `NLMCXR_reports.tgz` or its extracted folder.

    Yields:
        `tuple[str, str, bytes]`: a short name (archive member or file name), a source description for messages
        and the raw bytes.
    """
    reports_path = Path(reports_path)
    if reports_path.is_dir():
        for path in sorted(reports_path.rglob("*.xml")):
            yield path.name, str(path), path.read_bytes()
        return
    try:
        with tarfile.open(reports_path, "r:*") as archive:
            for member in archive:
                if member.isfile() and member.name.endswith(".xml"):
                    handle = archive.extractfile(member)
                    yield member.name, f"{member.name} in {reports_path}", handle.read()
    except tarfile.TarError as error:
        raise CdanDataError(f"{reports_path} is not a readable report archive: {error}.", path=str(reports_path))


def read_openi_reports(reports_path: str | os.PathLike, problems: ProblemLog | None = None) -> list[OpenIReport]:
    """
    Parse every report XML of an Open-I download, sorted by uid.

    Args:
        reports_path (`str` or `os.PathLike`): `NLMCXR_reports.tgz` or the extracted `ecgen-radiology` folder.
        problems ([`ProblemLog`], *optional*): applies `bad_report` / `duplicate_id`; without it both raise.

    Returns:
        `list[OpenIReport]`
    """
    problems = problems or ProblemLog("iu_xray", {name: "error" for name in PROBLEM_POLICIES})
    reports: dict[int, OpenIReport] = {}
    for name, source, data in iter_openi_report_files(reports_path):
        try:
            report = parse_openi_report(data, source)
        except ValueError as error:
            problems.report("bad_report", name, str(error), reports_path)
            continue
        if report.uid in reports:
            problems.report(
                "duplicate_id",
                f"CXR{report.uid}",
                f"report uid CXR{report.uid} appears twice ({reports[report.uid].source} and {source}); the first "
                "is kept",
                reports_path,
            )
            continue
        reports[report.uid] = report
    return [reports[uid] for uid in sorted(reports)]


def read_iu_view_positions(metadata_path: str | os.PathLike) -> dict[str, str]:
    """DICOM "View Position" per NLMCXR image id from `nlmcxr_dicom_metadata.csv(.gz)` (imageid, View Position)."""
    try:
        table = pd.read_csv(
            metadata_path, usecols=["imageid", "View Position"], dtype=str, keep_default_na=False, encoding="utf-8"
        )
    except ValueError as error:
        raise CdanDataError(
            f"{metadata_path} lacks the columns 'imageid' and 'View Position': {error}.", path=str(metadata_path)
        ) from error
    return dict(zip(table["imageid"].str.strip(), table["View Position"].str.strip()))


def _image_prefixes(image_id: str) -> Iterator[str]:
    """`CXR1_1_IM-0001-3001` -> `CXR1_1_IM-0001`, `CXR1_1_IM`: the candidate R2Gen ids an image can belong to."""
    parts = image_id.split("-")
    for end in range(len(parts) - 1, 0, -1):
        yield "-".join(parts[:end])


def _match_entry(
    study_id: str, report_text: str, reports_by_prefix: dict[str, set[int]], reports: dict[int, OpenIReport]
) -> tuple[OpenIReport | None, list[str], str]:
    """Match one R2Gen annotation entry to its Open-I report; returns (report, image ids, reason if unmatched)."""
    candidates = sorted(reports_by_prefix.get(study_id, ()))
    if not candidates:
        return None, [], f"no Open-I report has an image named {study_id}-*"
    wanted = normalize_whitespace(report_text)
    same_text = [uid for uid in candidates if normalize_whitespace(reports[uid].findings) == wanted]
    if len(candidates) > 1 and len(same_text) != 1:
        return None, [], f"images named {study_id}-* belong to several reports ({candidates})"
    report = reports[same_text[0] if same_text else candidates[0]]
    if normalize_whitespace(report.findings) != wanted:
        return (
            None,
            [],
            f"the annotation report differs from the FINDINGS of report CXR{report.uid} ({report.source})",
        )
    image_ids = [image_id for image_id in report.image_ids if image_id.startswith(study_id + "-")]
    return report, image_ids, ""


def _prefix_index(reports: Iterable[OpenIReport]) -> dict[str, set[int]]:
    index: dict[str, set[int]] = {}
    for report in reports:
        for image_id in report.image_ids:
            for prefix in _image_prefixes(image_id):
                index.setdefault(prefix, set()).add(report.uid)
    return index


def match_r2gen_to_openi(
    annotation_file: str | os.PathLike, reports_path: str | os.PathLike
) -> dict[str, dict[str, Any]]:
    """
    Derive the R2Gen id <-> Open-I report mapping from an R2Gen annotation and the Open-I report XMLs.

    The R2Gen id is an NLMCXR image name without its last `-NNNN` part (the annotation's `image_path` folders use
    it), so the report is the one with an image named `<id>-...`; that report's FINDINGS must equal the
    annotation's `report` up to whitespace, which also settles the rare id shared by two reports.

    Args:
        annotation_file (`str` or `os.PathLike`): R2Gen `annotation.json`.
        reports_path (`str` or `os.PathLike`): `NLMCXR_reports.tgz` or the extracted folder.

    Returns:
        `dict[str, dict]`: R2Gen id -> `{"uid": int, "split": <annotation key>, "files": [<image id>.png, ...]}`
        (files in report order). Entries that cannot be matched raise [`CdanDataError`].
    """
    reports_list = read_openi_reports(reports_path)
    reports = {report.uid: report for report in reports_list}
    by_prefix = _prefix_index(reports_list)
    mapping = {}
    for key, index, entry in iter_r2gen_annotation(annotation_file):
        study_id = entry.get("id") if isinstance(entry, dict) else None
        report, image_ids, reason = _match_entry(str(study_id), str(entry.get("report", "")), by_prefix, reports)
        if report is None:
            raise CdanDataError(
                f"iu_xray: {reason} (study {study_id}, file {annotation_file}).", "unmatched_report", study_id
            )
        mapping[study_id] = {"uid": report.uid, "split": key, "files": [f"{image_id}.png" for image_id in image_ids]}
    return mapping


# --------------------------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------------------------
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
            `"error"` or `"skip"` for each bad-input problem (module docstring).
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


@dataclass
class IuXrayConfig(CdanBuilderConfig):
    """
    IU X-Ray options (file options default to the usual names inside `data_dir`).

    Args:
        layout (`str`, *optional*, defaults to `"auto"`): `"r2gen"` (annotation + `images/<id>/<k>.png`),
            `"openi"` (report XMLs + `NLMCXR_png`) or `"auto"`.
        annotation_file (`str`, *optional*): R2Gen `annotation.json` (required for `"r2gen"`; for `"openi"` it
            selects R2Gen's split). Defaults to `<data_dir>/annotation.json` when present.
        reports_file (`str`, *optional*): `NLMCXR_reports.tgz` or the extracted `ecgen-radiology` folder.
        images_dir (`str`, *optional*): `<data_dir>/images` (R2Gen) or `<data_dir>/NLMCXR_png` (Open-I).
        dicom_metadata_file (`str`, *optional*): `nlmcxr_dicom_metadata.csv(.gz)` with View Position per image.
        use_annotation (`bool`, *optional*, defaults to `True`): with `False` the Open-I layout ignores any
            annotation file and uses the seeded split.
        split_seed (`int`, *optional*, defaults to 42): seed of the 7:1:2 split when there is no annotation.
        min_images (`int`, *optional*, defaults to 1): fewer images is `too_few_images` (2 selects R2Gen's studies).
        r2gen_view_convention (`bool`, *optional*, defaults to `True`): R2Gen layout: `0.png` frontal, `1.png`
            lateral; `False` gives `unknown`.
        max_images (`int`, *optional*): Open-I layout: keep at most this many images per study, chosen by
            [`select_view_indices`] (first frontal, first lateral, then the rest); R2Gen kept 2. None keeps all
            (R2Gen's studies have 2-5 Open-I images).
    """

    layout: str = "auto"
    annotation_file: str | None = None
    reports_file: str | None = None
    images_dir: str | None = None
    dicom_metadata_file: str | None = None
    use_annotation: bool = True
    split_seed: int = 42
    min_images: int = 1
    r2gen_view_convention: bool = True
    max_images: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {self.max_images}.")
        if self.layout not in ("auto", "r2gen", "openi"):
            raise ValueError(f"layout must be 'auto', 'r2gen' or 'openi', got {self.layout!r}.")
        if self.min_images < 1:
            raise ValueError(f"min_images must be at least 1, got {self.min_images}.")


@dataclass
class MimicCxrConfig(CdanBuilderConfig):
    """
    MIMIC-CXR options (file options default to the usual names inside `data_dir`).

    Args:
        annotation_file (`str`, *optional*): R2Gen's MIMIC `annotation.json` (`<data_dir>/annotation.json`).
        images_dir (`str`, *optional*): the folder holding `p10/p10000032/...`: `<data_dir>/images` when present
            (R2Gen), else `<data_dir>/files` (MIMIC-CXR-JPG).
        chexpert_file, metadata_file, split_file (`str`, *optional*): `mimic-cxr-2.0.0-{chexpert,metadata,split}`
            `.csv` or `.csv.gz` in `data_dir`. The split table is optional; when present each entry's split must
            agree with it (else `unknown_split`).
        lookup_batch_size (`int`, *optional*, defaults to 5000): annotation entries joined with the tables at once.
        verify_images (`bool`, *optional*, defaults to `False`): off here (377k JPEGs decode for hours).
    """

    verify_images: bool = False
    annotation_file: str | None = None
    images_dir: str | None = None
    chexpert_file: str | None = None
    metadata_file: str | None = None
    split_file: str | None = None
    lookup_batch_size: int = 5000


@dataclass
class DemoConfig(CdanBuilderConfig):
    """
    Demo options.

    Args:
        reports_file (`str`, *optional*): JSON-lines reports (defaults to `data/demo/reports.jsonl` next to this
            module); fields r2gen_id, openi_uid, split, findings, impression, indication, comparison.
        image_size (`int`, *optional*, defaults to 256): side of the rendered views.
        view_names (`tuple[str, ...]`, *optional*): views rendered per study (`("frontal", "lateral")`).
    """

    reports_file: str | None = None
    image_size: int = 256
    view_names: tuple[str, ...] = (FRONTAL, LATERAL)


# --------------------------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------------------------
def _core_features() -> dict[str, Any]:
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


_LABEL_DESCRIPTION = (
    "chexpert_labels holds one state per observation, in this order: "
    + ", ".join(CHEXPERT_OBSERVATIONS)
    + f"; states POSITIVE={POSITIVE}, NEGATIVE={NEGATIVE}, UNCERTAIN={UNCERTAIN}, NOT_MENTIONED={NOT_MENTIONED}."
)


def _first_existing(*candidates: Path | None) -> Path | None:
    for candidate in candidates:
        if candidate is not None and candidate.exists():
            return candidate
    return None


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
    VERSION = datasets.Version("1.0.1")

    def __init__(self, *args, dataset_name: str | None = None, **kwargs):
        super().__init__(*args, dataset_name=dataset_name or self.DATASET_NAME, **kwargs)
        self.problems = ProblemLog(self.DATASET_NAME, self.config.policies())

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
        studies_by_split = self._plan()
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"split": split, "studies": studies_by_split.get(split)})
            for split in SPLITS
        ]

    def _plan(self) -> dict[str, list | None]:
        """Studies per split, checked (or None for builders that check while generating)."""
        raise NotImplementedError

    def _as_dataset(self, split=datasets.Split.TRAIN, in_memory: bool = False) -> datasets.Dataset:
        split_info = self.info.splits.get(str(split)) if self.info.splits else None
        if split_info is not None and not split_info.num_examples:
            # `datasets` cannot read a split with no example back; give an empty split with the same features.
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


class IuXrayBuilder(CdanBuilder):
    """
    IU X-Ray from the R2Gen layout or the original Open-I download (module docstring: layouts, split and view rules).

    Example:

    ```python
    >>> builder = IuXrayBuilder(data_dir="iu_xray", cache_dir="cache")  # annotation.json + images/
    >>> builder.download_and_prepare()
    >>> dataset = builder.as_dataset()  # DatasetDict: train / validation / test
    ```
    """

    DATASET_NAME = "iu_xray"
    BUILDER_CONFIG_CLASS = IuXrayConfig

    def _info(self) -> datasets.DatasetInfo:
        features = _core_features()
        features.update(
            {
                "openi_uid": Value("int32"),
                "view_positions": List(Value("string")),
                "mesh_major": List(Value("string")),
            }
        )
        return datasets.DatasetInfo(
            description="IU X-Ray (Indiana University chest X-ray collection, Open-I) studies for CDAN. "
            + _LABEL_DESCRIPTION,
            features=Features(features),
            homepage="https://openi.nlm.nih.gov/faq#collection",
            license="CC BY-NC-ND 4.0 (reports and images, Indiana University / NLM Open-i)",
            citation="Demner-Fushman et al., Preparing a collection of radiology examinations for distribution and "
            "retrieval, JAMIA 23(2), 2016.",
        )

    # -- inputs ----------------------------------------------------------------------------------------------------
    def _resolve_inputs(self) -> dict[str, Any]:
        config = self.config
        data_dir = self._data_dir()

        def in_data_dir(*names: str) -> Path | None:
            return _first_existing(*(data_dir / name for name in names)) if data_dir else None

        annotation = self._option_path(config.annotation_file) or in_data_dir("annotation.json")
        reports = self._option_path(config.reports_file) or in_data_dir(
            "NLMCXR_reports.tgz", "NLMCXR_reports.tar.gz", "ecgen-radiology"
        )
        images = self._option_path(config.images_dir)
        openi_images = images or in_data_dir("NLMCXR_png")
        r2gen_images = images or in_data_dir("images")
        layout = config.layout
        if layout == "auto":
            if reports is not None and openi_images is not None:
                layout = "openi"
            elif annotation is not None and r2gen_images is not None:
                layout = "r2gen"
            else:
                raise FileNotFoundError(
                    f"iu_xray: no input found in data_dir={data_dir}: expected either annotation.json and images/ "
                    "(R2Gen layout) or NLMCXR_reports.tgz and NLMCXR_png/ (Open-I layout), or the file options."
                )
        if layout == "r2gen":
            if annotation is None or not annotation.is_file():
                raise FileNotFoundError(f"iu_xray: R2Gen layout needs annotation.json (data_dir={data_dir}).")
            if r2gen_images is None or not r2gen_images.is_dir():
                raise FileNotFoundError(f"iu_xray: R2Gen layout needs the images/ folder (data_dir={data_dir}).")
            return {"layout": layout, "annotation": annotation, "images": r2gen_images}
        if reports is None or not reports.exists():
            raise FileNotFoundError(
                f"iu_xray: Open-I layout needs NLMCXR_reports.tgz or ecgen-radiology/ (data_dir={data_dir})."
            )
        if openi_images is None or not openi_images.is_dir():
            raise FileNotFoundError(f"iu_xray: Open-I layout needs the NLMCXR_png/ folder (data_dir={data_dir}).")
        metadata = self._option_path(config.dicom_metadata_file) or in_data_dir(
            "nlmcxr_dicom_metadata.csv.gz", "nlmcxr_dicom_metadata.csv"
        )
        if metadata is not None and not metadata.is_file():
            raise FileNotFoundError(f"iu_xray: DICOM metadata file {metadata} does not exist.")
        if annotation is not None and not annotation.is_file():
            raise FileNotFoundError(f"iu_xray: annotation file {annotation} does not exist.")
        return {
            "layout": layout,
            "annotation": annotation if config.use_annotation else None,
            "reports": reports,
            "images": openi_images,
            "metadata": metadata,
        }

    # -- planning --------------------------------------------------------------------------------------------------
    def _plan(self) -> dict[str, list | None]:
        inputs = self._resolve_inputs()
        logger.info("iu_xray: %s layout from %s", inputs["layout"], {k: str(v) for k, v in inputs.items()})
        if inputs["layout"] == "r2gen":
            candidates = self._r2gen_candidates(inputs)
        elif inputs["annotation"] is not None:
            candidates = self._openi_annotation_candidates(inputs)
        else:
            candidates = self._openi_seeded_candidates(inputs)
        studies_by_split: dict[str, list] = {split: [] for split in SPLITS}
        limit = self.config.max_studies_per_split
        for study in candidates:
            kept = studies_by_split[study["split"]]
            if limit is not None and len(kept) >= limit:
                continue
            paths = [Path(path) for path in study["images"]]
            if self._check_images(study["id"], paths):
                kept.append(study)
        return studies_by_split

    def _annotation_entries(self, annotation: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        """Annotation entries with a known split, a unique id and the expected fields, as (split, entry)."""
        seen: set[str] = set()
        for key, index, entry in iter_r2gen_annotation(annotation):
            label = f"{key}[{index}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"].strip():
                self.problems.report("bad_report", label, "annotation entry has no string 'id'", annotation)
                continue
            study_id = entry["id"]
            if not isinstance(entry.get("report"), str):
                self.problems.report("bad_report", study_id, "annotation entry has no string 'report'", annotation)
                continue
            split = annotation_entry_split(key, entry)
            if split is None:
                self.problems.report(
                    "unknown_split",
                    study_id,
                    f"annotation entry under {key!r} has unknown split {entry.get('split', key)!r} "
                    f"(known: {sorted(SPLIT_ALIASES)})",
                    annotation,
                )
                continue
            if study_id in seen:
                self.problems.report(
                    "duplicate_id", study_id, f"id {study_id} appears more than once; the first is kept", annotation
                )
                continue
            seen.add(study_id)
            yield split, entry

    def _r2gen_candidates(self, inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        annotation, images_dir = inputs["annotation"], inputs["images"]
        for split, entry in self._annotation_entries(annotation):
            study_id = entry["id"]
            image_paths = entry.get("image_path")
            if not isinstance(image_paths, list) or not all(isinstance(path, str) for path in image_paths):
                self.problems.report("bad_report", study_id, "annotation entry has no 'image_path' list", annotation)
                continue
            findings = entry["report"].strip()
            if not findings:
                self.problems.report("empty_findings", study_id, "the report (findings) is empty", annotation)
                continue
            if len(image_paths) < self.config.min_images:
                self.problems.report(
                    "too_few_images",
                    study_id,
                    f"{len(image_paths)} image(s), fewer than min_images={self.config.min_images}",
                    annotation,
                )
                continue
            if self.config.r2gen_view_convention:
                views = [{0: FRONTAL, 1: LATERAL}.get(index, UNKNOWN_VIEW) for index in range(len(image_paths))]
            else:
                views = [UNKNOWN_VIEW] * len(image_paths)
            uid_match = re.match(r"CXR(\d+)_", study_id)
            yield {
                "id": study_id,
                "split": split,
                "images": [str(images_dir / path) for path in image_paths],
                "views": views,
                "view_positions": [""] * len(image_paths),
                "findings": findings,
                "impression": None,
                "indication": None,
                "comparison": None,
                "openi_uid": int(uid_match.group(1)) if uid_match else None,
                "mesh_major": [],
            }

    def _openi_study(
        self, study_id: str, split: str, report: OpenIReport, image_ids: list[str], inputs: dict[str, Any]
    ) -> dict[str, Any]:
        view_positions_by_image = self._view_positions
        codes = [view_positions_by_image.get(image_id, "") for image_id in image_ids]
        if view_positions_by_image:
            caption = report.captions[0] if report.captions else ""
            views = iu_views_from_dicom(codes, caption)
        else:
            views = [UNKNOWN_VIEW] * len(image_ids)
        order = select_view_indices(views, self.config.max_images)
        return {
            "id": study_id,
            "split": split,
            "images": [str(inputs["images"] / f"{image_ids[index]}.png") for index in order],
            "views": [views[index] for index in order],
            "view_positions": [codes[index] for index in order],
            "findings": report.findings,
            "impression": report.impression or None,
            "indication": report.indication or None,
            "comparison": report.comparison or None,
            "openi_uid": report.uid,
            "mesh_major": report.mesh_major,
        }

    def _read_reports(self, inputs: dict[str, Any]) -> list[OpenIReport]:
        reports = read_openi_reports(inputs["reports"], self.problems)
        self._view_positions = read_iu_view_positions(inputs["metadata"]) if inputs["metadata"] else {}
        return reports

    def _openi_annotation_candidates(self, inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        annotation = inputs["annotation"]
        reports_list = self._read_reports(inputs)
        reports = {report.uid: report for report in reports_list}
        by_prefix = _prefix_index(reports_list)
        used: set[int] = set()
        candidates = []
        for split, entry in self._annotation_entries(annotation):
            study_id = entry["id"]
            report, image_ids, reason = _match_entry(study_id, entry["report"], by_prefix, reports)
            if report is None:
                self.problems.report("unmatched_report", study_id, reason, annotation)
                continue
            used.add(report.uid)
            if not report.findings.strip():
                self.problems.report("empty_findings", study_id, "FINDINGS is empty", report.source)
                continue
            if len(image_ids) < self.config.min_images:
                self.problems.report(
                    "too_few_images",
                    study_id,
                    f"{len(image_ids)} image(s), fewer than min_images={self.config.min_images}",
                    report.source,
                )
                continue
            candidates.append(self._openi_study(study_id, split, report, image_ids, inputs))
        for report in reports_list:
            if report.uid not in used:
                self.problems.note(
                    "not_in_annotation", f"CXR{report.uid}", f"report not in {annotation.name}", report.source
                )
        return iter(candidates)

    def _openi_seeded_candidates(self, inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        eligible = []
        for report in self._read_reports(inputs):
            study_id = f"CXR{report.uid}"
            if not report.findings.strip():
                self.problems.report("empty_findings", study_id, "FINDINGS is empty", report.source)
                continue
            if len(report.image_ids) < self.config.min_images:
                self.problems.report(
                    "too_few_images",
                    study_id,
                    f"{len(report.image_ids)} image(s), fewer than min_images={self.config.min_images}",
                    report.source,
                )
                continue
            eligible.append(report)
        assignment = seeded_split((report.uid for report in eligible), self.config.split_seed)
        return (
            self._openi_study(f"CXR{report.uid}", assignment[report.uid], report, report.image_ids, inputs)
            for report in eligible
        )

    # -- generation ------------------------------------------------------------------------------------------------
    def _generate_examples(self, split: str, studies: list[dict[str, Any]]):
        for study in studies:
            labels = report_labels(study["findings"], study["impression"])
            yield study["id"], {**study, "chexpert_labels": labels, "label_source": LABEL_SOURCE_LABELER}


class MimicCxrBuilder(CdanBuilder):
    """
    MIMIC-CXR from R2Gen's MIMIC `annotation.json` + the MIMIC-CXR-JPG tree and tables, streamed (module docstring).

    Example:

    ```python
    >>> builder = MimicCxrBuilder(data_dir="mimic_cxr", cache_dir="cache")
    >>> builder.download_and_prepare()
    >>> dataset = builder.as_dataset()
    ```
    """

    DATASET_NAME = "mimic_cxr"
    BUILDER_CONFIG_CLASS = MimicCxrConfig

    def _info(self) -> datasets.DatasetInfo:
        features = _core_features()
        features.update(
            {
                "subject_id": Value("int64"),
                "study_id": Value("int64"),
                "view_positions": List(Value("string")),
                "prior_study_id": Value("int64"),
                "prior_image_paths": List(Value("string")),
            }
        )
        return datasets.DatasetInfo(
            description="MIMIC-CXR-JPG studies in R2Gen's MIMIC-CXR split for CDAN, with the patient's prior study. "
            + _LABEL_DESCRIPTION,
            features=Features(features),
            homepage="https://physionet.org/content/mimic-cxr-jpg/2.0.0/",
            license="PhysioNet Credentialed Health Data License 1.5.0 (no redistribution)",
            citation="Johnson et al., MIMIC-CXR-JPG, a large publicly available database of labeled chest "
            "radiographs, arXiv:1901.07042, 2019.",
        )

    # -- inputs ----------------------------------------------------------------------------------------------------
    def _table_path(self, option: str | None, kind: str, required: bool) -> Path | None:
        path = self._option_path(option)
        if path is None and self._data_dir() is not None:
            stem = MIMIC_TABLE_NAMES[kind]
            path = _first_existing(self._data_dir() / f"{stem}.csv.gz", self._data_dir() / f"{stem}.csv")
        if path is None or not path.is_file():
            if required:
                raise FileNotFoundError(
                    f"mimic_cxr: {MIMIC_TABLE_NAMES[kind]}.csv(.gz) not found (data_dir={self._data_dir()}, "
                    f"option {kind}_file={option})."
                )
            return None
        return path

    def _read_table(self, path: Path, columns: dict[str, str], chunk_rows: int = 10000) -> dict[str, Any]:
        """
        Only `columns` of a CSV(.gz) table, parsed in chunks by pandas' C reader and kept compact: numeric columns as
        numpy arrays (blank -> NaN for floats), text columns as Arrow string arrays (blank -> "").

        Args:
            columns (`dict[str, str]`): column -> `"string"`, `"int64"` or `"float64"`.
        """
        numeric = [name for name, kind in columns.items() if kind != "string"]
        parts: dict[str, list] = {name: [] for name in columns}
        try:
            chunks = pd.read_csv(
                path,
                usecols=list(columns),
                dtype={name: (str if kind == "string" else kind) for name, kind in columns.items()},
                keep_default_na=False,
                na_values={name: [""] for name in numeric},
                chunksize=chunk_rows,
                encoding="utf-8",
            )
            for chunk in chunks:
                for name, kind in columns.items():
                    values = chunk[name].to_numpy()
                    parts[name].append(pa.array(values, type=pa.string()) if kind == "string" else values)
        except (ValueError, TypeError) as error:
            raise CdanDataError(
                f"mimic_cxr: {path} cannot be read with the columns {columns}: {error}", path=str(path)
            ) from error
        table = {}
        for name, kind in columns.items():
            if kind == "string":
                table[name] = pa.chunked_array(parts[name], type=pa.string()).combine_chunks()
            else:
                table[name] = np.concatenate(parts[name]) if parts[name] else np.zeros(0, dtype=kind)
        return table

    def _plan(self) -> dict[str, list | None]:
        config = self.config
        data_dir = self._data_dir()
        self._annotation = self._option_path(config.annotation_file) or (
            data_dir / "annotation.json" if data_dir else None
        )
        if self._annotation is None or not self._annotation.is_file():
            raise FileNotFoundError(f"mimic_cxr: annotation.json not found (data_dir={data_dir}).")
        self._images_dir = self._option_path(config.images_dir) or (
            _first_existing(data_dir / "images", data_dir / "files") if data_dir else None
        )
        if self._images_dir is None or not self._images_dir.is_dir():
            raise FileNotFoundError(f"mimic_cxr: image folder images/ or files/ not found (data_dir={data_dir}).")
        self._load_metadata(self._table_path(config.metadata_file, "metadata", required=True))
        self._load_chexpert(self._table_path(config.chexpert_file, "chexpert", required=True))
        self._load_official_split(self._table_path(config.split_file, "split", required=False))
        self._seen_rows = np.zeros(len(self._meta_dicom), dtype=bool)
        for key, index, entry in iter_r2gen_annotation(self._annotation):
            if annotation_entry_split(key, entry) is None:
                item_id = entry.get("id") if isinstance(entry, dict) else f"{key}[{index}]"
                self.problems.report(
                    "unknown_split",
                    item_id,
                    f"annotation entry under {key!r} has unknown split "
                    f"{entry.get('split', key) if isinstance(entry, dict) else key!r}",
                    self._annotation,
                )
        return {split: None for split in SPLITS}

    def _load_metadata(self, path: Path) -> None:
        table = self._read_table(
            path,
            {
                "dicom_id": "string",
                "subject_id": "int64",
                "study_id": "int64",
                "ViewPosition": "string",
                "StudyDate": "float64",
                "StudyTime": "float64",
            },
        )
        self._meta_path = path
        self._meta_dicom = table["dicom_id"]
        self._meta_view = table["ViewPosition"]
        self._meta_study = table["study_id"]
        self._meta_subject = table["subject_id"]
        # Rows sorted by study, for the images of a prior study.
        self._meta_by_study = np.argsort(self._meta_study, kind="stable")
        self._meta_study_sorted = self._meta_study[self._meta_by_study]
        # One row per study with its earliest (date, time), then the prior study per patient (numpy only).
        date_all = table["StudyDate"]
        time_all = table["StudyTime"]
        del table
        order = np.lexsort((time_all, date_all, self._meta_study))  # NaN dates sort last
        first = np.ones(len(order), dtype=bool)
        first[1:] = self._meta_study[order][1:] != self._meta_study[order][:-1]
        earliest = order[first]
        study = self._meta_study[earliest]
        subject = self._meta_subject[earliest]
        date = date_all[earliest]
        time = np.nan_to_num(time_all[earliest], nan=0.0)
        del date_all, time_all, order, first, earliest
        order = np.lexsort((study, time, date, subject))
        study, subject, date, time = study[order], subject[order], date[order], time[order]
        count = len(study)
        dated = ~np.isnan(date)
        new_block = np.ones(count, dtype=bool)
        if count > 1:
            new_block[1:] = (subject[1:] != subject[:-1]) | (date[1:] != date[:-1]) | (time[1:] != time[:-1])
        block_start = np.maximum.accumulate(np.where(new_block, np.arange(count), 0)) if count else np.zeros(0, int)
        previous = np.clip(block_start - 1, 0, None)
        has_prior = (block_start > 0) & (subject[previous] == subject) & dated & dated[previous]
        prior = np.where(has_prior, study[previous], -1)
        by_study = np.argsort(study, kind="stable")
        self._study_keys = study[by_study]
        self._study_prior = prior[by_study]
        self._study_subject = subject[by_study]

    def _load_chexpert(self, path: Path) -> None:
        table = self._read_table(path, {"study_id": "int64", **{name: "float64" for name in CHEXPERT_OBSERVATIONS}})
        study = table["study_id"]
        values = np.stack([table[name] for name in CHEXPERT_OBSERVATIONS], axis=1).astype(np.float64)
        states = np.full(values.shape, NOT_MENTIONED, dtype=np.int8)
        for value, state in ((1.0, POSITIVE), (0.0, NEGATIVE), (-1.0, UNCERTAIN)):
            states[values == value] = state
        invalid = ~np.isnan(values) & ~np.isin(values, (1.0, 0.0, -1.0))
        if invalid.any():
            row, column = np.argwhere(invalid)[0]
            raise CdanDataError(
                f"mimic_cxr: {path} has the value {values[row, column]} for {CHEXPERT_OBSERVATIONS[column]} of study "
                f"{study[row]}; allowed are 1.0, 0.0, -1.0 and blank.",
                item_id=str(study[row]),
                path=str(path),
            )
        order = np.argsort(study, kind="stable")
        self._chexpert_path = path
        self._chexpert_study = study[order]
        self._chexpert_states = states[order]

    def _load_official_split(self, path: Path | None) -> None:
        self._split_path = path
        if path is None:
            self._split_dicom = None
            return
        table = self._read_table(path, {"dicom_id": "string", "split": "string"})
        self._split_dicom = table["dicom_id"]
        self._split_value = table["split"]

    # -- generation ------------------------------------------------------------------------------------------------
    def _generate_examples(self, split: str, studies: None):
        batch: list[dict[str, Any]] = []
        produced = 0
        limit = self.config.max_studies_per_split
        for key, index, entry in iter_r2gen_annotation(self._annotation):
            if annotation_entry_split(key, entry) != split:
                continue
            batch.append(entry if isinstance(entry, dict) else {"_label": f"{key}[{index}]"})
            if len(batch) >= self.config.lookup_batch_size:
                for study_id, example in self._examples_from_batch(batch, split):
                    if limit is not None and produced >= limit:
                        return
                    produced += 1
                    yield study_id, example
                batch = []
        for study_id, example in self._examples_from_batch(batch, split):
            if limit is not None and produced >= limit:
                return
            produced += 1
            yield study_id, example

    def _valid_entries(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        valid = []
        for entry in batch:
            study_id = entry.get("id")
            problem = None
            if not isinstance(study_id, str) or not study_id.strip():
                study_id, problem = entry.get("_label", "?"), "annotation entry has no string 'id'"
            elif not isinstance(entry.get("report"), str):
                problem = "annotation entry has no string 'report'"
            elif not isinstance(entry.get("image_path"), list) or not all(
                isinstance(path, str) for path in entry["image_path"]
            ):
                problem = "annotation entry has no 'image_path' list"
            else:
                try:
                    entry["study_id"], entry["subject_id"] = int(entry["study_id"]), int(entry["subject_id"])
                except (KeyError, TypeError, ValueError):
                    problem = "annotation entry has no integer 'study_id' and 'subject_id'"
            if problem:
                self.problems.report("bad_report", study_id, problem, self._annotation)
            else:
                valid.append(entry)
        return valid

    def _study_row(self, study_id: int) -> int | None:
        position = int(np.searchsorted(self._study_keys, study_id))
        if position < len(self._study_keys) and self._study_keys[position] == study_id:
            return position
        return None

    def _prior_image_paths(self, prior_study: int, subject: int) -> list[str]:
        low = int(np.searchsorted(self._meta_study_sorted, prior_study, side="left"))
        high = int(np.searchsorted(self._meta_study_sorted, prior_study, side="right"))
        rows = self._meta_by_study[low:high]
        dicom_ids = self._meta_dicom.take(pa.array(rows, type=pa.int64())).to_pylist()
        folder = f"{self._images_dir}{os.sep}p{str(subject)[:2]}{os.sep}p{subject}{os.sep}s{prior_study}{os.sep}"
        return [f"{folder}{dicom_id}.jpg" for dicom_id in dicom_ids]

    def _examples_from_batch(self, batch: list[dict[str, Any]], split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        entries = self._valid_entries(batch)
        if not entries:
            return
        ids = pa.array([entry["id"] for entry in entries], type=pa.string())
        meta_rows = pc.index_in(ids, value_set=self._meta_dicom).to_numpy(zero_copy_only=False)
        if self._split_dicom is not None:
            split_rows = pc.index_in(ids, value_set=self._split_dicom).to_numpy(zero_copy_only=False)
        study_ids = np.array([entry["study_id"] for entry in entries], dtype=np.int64)
        label_positions = np.searchsorted(self._chexpert_study, study_ids)
        annotation = self._annotation
        for position, entry in enumerate(entries):
            study_id = entry["id"]
            meta_row = meta_rows[position]
            if meta_row is None or np.isnan(meta_row):
                self.problems.report(
                    "missing_metadata", study_id, f"dicom_id {study_id} is not in the metadata table", self._meta_path
                )
                continue
            meta_row = int(meta_row)
            if self._seen_rows[meta_row]:
                self.problems.report(
                    "duplicate_id", study_id, f"id {study_id} appears more than once; the first is kept", annotation
                )
                continue
            self._seen_rows[meta_row] = True
            if int(self._meta_study[meta_row]) != entry["study_id"]:
                self.problems.report(
                    "missing_metadata",
                    study_id,
                    f"the annotation gives study {entry['study_id']} but the metadata table study "
                    f"{int(self._meta_study[meta_row])}",
                    self._meta_path,
                )
                continue
            if self._split_dicom is not None:
                split_row = split_rows[position]
                if split_row is not None and not np.isnan(split_row):
                    official = self._split_value[int(split_row)].as_py()
                    if canonical_split(official) != split:
                        self.problems.report(
                            "unknown_split",
                            study_id,
                            f"the annotation puts it in {split} but {self._split_path.name} in {official!r}",
                            self._split_path,
                        )
                        continue
            findings = entry["report"].strip()
            if not findings:
                self.problems.report("empty_findings", study_id, "the report (findings) is empty", annotation)
                continue
            if len(entry["image_path"]) < 1:
                self.problems.report("too_few_images", study_id, "the entry lists no image", annotation)
                continue
            image_paths = [self._images_dir / path for path in entry["image_path"]]
            if not self._check_images(study_id, image_paths):
                continue
            label_position = int(label_positions[position])
            if (
                label_position < len(self._chexpert_study)
                and self._chexpert_study[label_position] == entry["study_id"]
            ):
                labels = self._chexpert_states[label_position].tolist()
                label_source = LABEL_SOURCE_MIMIC
            else:
                action = self.problems.report(
                    "missing_labels",
                    study_id,
                    f"study {entry['study_id']} is not in the CheXpert table",
                    self._chexpert_path,
                )
                if action != "labeler":
                    continue
                labels, label_source = report_labels(findings), LABEL_SOURCE_LABELER
            study_row = self._study_row(entry["study_id"])
            prior = int(self._study_prior[study_row]) if study_row is not None else -1
            view_position = self._meta_view[meta_row].as_py()
            yield (
                study_id,
                {
                    "id": study_id,
                    "split": split,
                    "images": [str(path) for path in image_paths],
                    "views": [view_from_code(view_position)] * len(image_paths),
                    "view_positions": [view_position] * len(image_paths),
                    "findings": findings,
                    "impression": None,
                    "indication": None,
                    "comparison": None,
                    "chexpert_labels": labels,
                    "label_source": label_source,
                    "subject_id": entry["subject_id"],
                    "study_id": entry["study_id"],
                    "prior_study_id": prior if prior >= 0 else None,
                    "prior_image_paths": self._prior_image_paths(prior, entry["subject_id"]) if prior >= 0 else [],
                },
            )


class DemoBuilder(CdanBuilder):
    """
    The embedded demo: verbatim Open-I report text with synthetic images rendered from each report's labels.

    Example:

    ```python
    >>> dataset = load_cdan_dataset("demo", max_studies_per_split=8)
    ```
    """

    DATASET_NAME = "demo"
    BUILDER_CONFIG_CLASS = DemoConfig

    def download_and_prepare(self, *args, num_proc: int | None = None, **kwargs):
        """`download_and_prepare`, rendering in `min(2, CPU count)` processes unless `num_proc` is given."""
        if num_proc is None:
            num_proc = min(2, os.cpu_count() or 1)
        return super().download_and_prepare(*args, num_proc=num_proc if num_proc > 1 else None, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        features = _core_features()
        features.update(
            {
                "openi_uid": Value("int32"),
                "view_positions": List(Value("string")),
                "mesh_major": List(Value("string")),
                "synthetic": Value("bool"),
            }
        )
        return datasets.DatasetInfo(
            description="CDAN demo: Open-I report text (verbatim) with SYNTHETIC images rendered from the report's "
            "labels by synthetic_cxr; not for evaluation. " + _LABEL_DESCRIPTION,
            features=Features(features),
            license="Reports: CC BY-NC-ND 4.0 (Indiana University / NLM Open-i); images: synthetic.",
        )

    def _plan(self) -> dict[str, list | None]:
        reports_file = self._option_path(self.config.reports_file) or DEMO_REPORTS_FILE
        if not reports_file.is_file():
            raise FileNotFoundError(f"demo: reports file {reports_file} does not exist.")
        studies_by_split: dict[str, list] = {split: [] for split in SPLITS}
        seen: set[str] = set()
        limit = self.config.max_studies_per_split
        with open(reports_file, encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                label = f"line {line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    self.problems.report(
                        "bad_report", label, f"line {line_number} is not JSON ({error})", reports_file
                    )
                    continue
                if not isinstance(record, dict) or not isinstance(record.get("r2gen_id"), str):
                    self.problems.report(
                        "bad_report", label, f"line {line_number} has no string 'r2gen_id'", reports_file
                    )
                    continue
                study_id = record["r2gen_id"]
                split = canonical_split(record.get("split"))
                if split is None:
                    self.problems.report(
                        "unknown_split", study_id, f"unknown split {record.get('split')!r}", reports_file
                    )
                    continue
                if study_id in seen:
                    self.problems.report(
                        "duplicate_id",
                        study_id,
                        f"id {study_id} appears more than once; the first is kept",
                        reports_file,
                    )
                    continue
                seen.add(study_id)
                findings = (record.get("findings") or "").strip()
                if not findings:
                    self.problems.report("empty_findings", study_id, "the findings are empty", reports_file)
                    continue
                if limit is not None and len(studies_by_split[split]) >= limit:
                    continue
                uid = record.get("openi_uid")
                studies_by_split[split].append(
                    {
                        "id": study_id,
                        "split": split,
                        "findings": findings,
                        "impression": (record.get("impression") or "").strip() or None,
                        "indication": (record.get("indication") or "").strip() or None,
                        "comparison": (record.get("comparison") or "").strip() or None,
                        "openi_uid": int(uid) if isinstance(uid, (int, str)) and str(uid).isdigit() else None,
                    }
                )
        return studies_by_split

    def _generate_examples(self, split: str, studies: list[dict[str, Any]]):
        written_dir = Path(self._output_dir) / "images"
        stored_dir = Path(self._final_output_dir() if self._file_format == "arrow" else self._output_dir) / "images"
        written_dir.mkdir(parents=True, exist_ok=True)
        view_names = tuple(self.config.view_names)
        for study in studies:
            labels = report_labels(study["findings"], study["impression"])
            seed = zlib.crc32(study["id"].encode("utf-8"))
            images = render_study(labels, seed=seed, image_size=self.config.image_size, views=view_names)
            safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", study["id"])
            paths = []
            for view, image in zip(view_names, images):
                name = f"{safe_id}_{view}.png"
                save_png(image, written_dir / name, extra_text={"Study": study["id"]}, compress_level=1)
                paths.append(str(stored_dir / name))
            yield (
                study["id"],
                {
                    **study,
                    "images": paths,
                    "views": list(view_names),
                    "view_positions": [""] * len(view_names),
                    "mesh_major": [],
                    "chexpert_labels": labels,
                    "label_source": LABEL_SOURCE_LABELER,
                    "synthetic": True,
                },
            )


# --------------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------------
BUILDERS: dict[str, type[CdanBuilder]] = {"iu_xray": IuXrayBuilder, "mimic_cxr": MimicCxrBuilder, "demo": DemoBuilder}


def get_cdan_builder(
    name: str, data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, **options
) -> CdanBuilder:
    """
    The builder for `name` (`"iu_xray"`, `"mimic_cxr"` or `"demo"`), not yet prepared.

    Args:
        name (`str`): the dataset.
        data_dir (`str` or `os.PathLike`, *optional*): folder with the input files.
        cache_dir (`str` or `os.PathLike`, *optional*): root of the prepared data.
        **options: fields of the builder's config (policies `on_<problem>`, `verify_images`, file options, ...).
    """
    if name not in BUILDERS:
        raise ValueError(f"Unknown CDAN dataset {name!r}; choose one of {sorted(BUILDERS)}.")
    options = {key: str(value) if isinstance(value, os.PathLike) else value for key, value in options.items()}
    if isinstance(options.get("view_names"), list):
        options["view_names"] = tuple(options["view_names"])
    return BUILDERS[name](
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        data_dir=str(data_dir) if data_dir is not None else None,
        **options,
    )


def load_cdan_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download_mode: str | None = None,
    **options,
) -> datasets.DatasetDict:
    """
    Prepare (once, then from cache) and load a CDAN dataset.

    Args:
        name (`str`): `"iu_xray"`, `"mimic_cxr"` or `"demo"`.
        data_dir (`str` or `os.PathLike`, *optional*): folder with the input files (not needed for the demo).
        cache_dir (`str` or `os.PathLike`, *optional*): root of the prepared data (`HF_DATASETS_CACHE` by default).
        download_mode (`str`, *optional*): `"force_redownload"` rebuilds after the inputs changed.
        **options: config fields, e.g. `on_missing_image="skip"`, `verify_images=False`, `max_studies_per_split=8`.

    Returns:
        `datasets.DatasetDict`: `train`, `validation`, `test`.

    Example:

    ```python
    >>> dataset = load_cdan_dataset("iu_xray", data_dir="data/iu_xray")
    >>> dataset["train"][0]["images"]  # decoded lazily into PIL images
    ```
    """
    builder = get_cdan_builder(name, data_dir=data_dir, cache_dir=cache_dir, **options)
    builder.download_and_prepare(download_mode=download_mode)
    return builder.as_dataset()


def _estimated_row_bytes(dataset: datasets.Dataset, embed_images: bool, sample_size: int = 64) -> float:
    if len(dataset) == 0:
        return 1.0
    sample = dataset.select(range(min(sample_size, len(dataset)))).with_format("arrow")[:]
    total = float(sample.nbytes)
    if embed_images:
        for column, feature in dataset.features.items():
            if isinstance(feature, List) and isinstance(feature.feature, Image):
                for images in sample.column(column).to_pylist():
                    for image in images or []:
                        if image and image.get("bytes"):
                            total += len(image["bytes"])
                        elif image and image.get("path") and os.path.isfile(image["path"]):
                            total += os.path.getsize(image["path"])
    return max(total / sample.num_rows, 1.0)


def export_to_parquet(
    dataset_dict: datasets.DatasetDict,
    output_dir: str | os.PathLike,
    embed_images: bool = True,
    max_shard_size: int = 500 * 1024 * 1024,
) -> dict[str, list[Path]]:
    """
    Write each split as Parquet shards `<output_dir>/data/<split>-NNNNN-of-NNNNN.parquet` (the Hub layout).

    Args:
        dataset_dict (`datasets.DatasetDict`): e.g. from [`load_cdan_dataset`].
        output_dir (`str` or `os.PathLike`): destination folder.
        embed_images (`bool`, *optional*, defaults to `True`): store the image bytes in the files (self-contained,
            as `push_to_hub` does) instead of local paths.
        max_shard_size (`int`, *optional*): approximate bytes per shard.

    Returns:
        `dict[str, list[Path]]`: the shard files per split.
    """
    data_dir = Path(output_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for split, dataset in dataset_dict.items():
        row_bytes = _estimated_row_bytes(dataset, embed_images)
        num_shards = max(1, math.ceil(len(dataset) * row_bytes / max_shard_size))
        num_shards = min(num_shards, max(1, len(dataset)))
        written[split] = []
        for index in range(num_shards):
            shard = dataset.shard(num_shards=num_shards, index=index, contiguous=True)
            if embed_images:
                shard_format = shard.format
                shard = shard.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True)
                shard = shard.with_format(**shard_format)
            path = data_dir / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
            shard.to_parquet(str(path))
            written[split].append(path)
    return written


def _is_mimic(dataset_dict: datasets.DatasetDict) -> bool:
    for dataset in dataset_dict.values():
        if dataset.info.dataset_name == MimicCxrBuilder.DATASET_NAME or "prior_study_id" in dataset.column_names:
            return True
    return False


def push_to_hub(
    dataset_dict: datasets.DatasetDict,
    repo_id: str,
    private: bool = True,
    token: str | None = None,
    max_shard_size: int | str = "500MB",
    **kwargs,
):
    """
    Push a prepared CDAN dataset to the Hugging Face Hub as Parquet with the images embedded (never as a script).

    Refuses MIMIC-CXR: the PhysioNet licence forbids redistributing it. IU X-Ray is CC BY-NC-ND 4.0 (keep the
    licence on the dataset card).

    Args:
        dataset_dict (`datasets.DatasetDict`): the prepared splits.
        repo_id (`str`): `<namespace>/<name>` of the dataset repository.
        private (`bool`, *optional*, defaults to `True`): create the repository private.
        token (`str`, *optional*): Hub token.
        max_shard_size (`int` or `str`, *optional*): Parquet shard size.
        **kwargs: more arguments of `datasets.DatasetDict.push_to_hub`.

    Returns:
        What `datasets.DatasetDict.push_to_hub` returns (the commit info).
    """
    if _is_mimic(dataset_dict):
        raise ValueError(
            "MIMIC-CXR may not be redistributed (PhysioNet Credentialed Health Data License); nothing was pushed."
        )
    return dataset_dict.push_to_hub(
        repo_id, private=private, token=token, max_shard_size=max_shard_size, embed_external_files=True, **kwargs
    )


__all__ = [
    "BUILDERS",
    "DEMO_REPORTS_FILE",
    "PROBLEM_POLICIES",
    "SKIPPED_FILENAME",
    "SPLITS",
    "CdanBuilder",
    "CdanBuilderConfig",
    "CdanDataError",
    "DemoBuilder",
    "DemoConfig",
    "IuXrayBuilder",
    "IuXrayConfig",
    "MimicCxrBuilder",
    "MimicCxrConfig",
    "OpenIReport",
    "ProblemLog",
    "canonical_split",
    "check_image_file",
    "export_to_parquet",
    "get_cdan_builder",
    "iter_openi_report_files",
    "iter_r2gen_annotation",
    "iu_views_from_dicom",
    "load_cdan_dataset",
    "match_r2gen_to_openi",
    "parse_openi_report",
    "push_to_hub",
    "read_iu_view_positions",
    "read_openi_reports",
    "report_labels",
    "seeded_split",
    "select_view_indices",
    "view_from_code",
]
