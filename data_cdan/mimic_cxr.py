"""MIMIC-CXR-JPG in R2Gen's MIMIC-CXR split as a `datasets` builder, with each study's prior study.

Source: R2Gen's MIMIC `annotation.json`, the MIMIC-CXR-JPG tree `files/p<NN>/p<subject_id>/s<study_id>/<dicom_id>.jpg`
and the tables `mimic-cxr-2.0.0-{metadata,chexpert,split}.csv(.gz)`; optionally the free-text reports of MIMIC-CXR
(`mimic-cxr-reports.zip`, extracted: `files/p<NN>/p<subject_id>/s<study_id>.txt`) for the INDICATION and HISTORY
sections. Nothing is downloaded.
Licence: PhysioNet Credentialed Health Data License 1.5.0; never redistributed (`push_to_hub` refuses it).
Citation: Johnson et al., "MIMIC-CXR-JPG, a large publicly available database of labeled chest radiographs",
arXiv:1901.07042, 2019; R2Gen split: Chen et al., EMNLP 2020.
Splits: one example per annotation entry (one image each, as in R2Gen), in the entry's split.

Columns: `id` (the DICOM id), `split`, `images` (`List(Image())`, paths), `views` (from `ViewPosition`), `findings`
(the annotation's report), `impression` / `comparison` (None), `indication` and `history` (from the free-text report,
see [`report_context_sections`]; None without the report or the section), `chexpert_labels` (MIMIC's CheXpert table,
four states), `label_source`, `subject_id`, `study_id`, `view_positions`, `prior_study_id` (the patient's latest
strictly earlier study, None for the first), `prior_image_paths` (not opened or checked) and `prior_view_positions`
(their `ViewPosition`, aligned); with the `boxes_file` option (a detector's JSON-lines box file, see
`data_cdan.boxes.read_box_file`) also `boxes`, per image a list of `BOX_FEATURES` dicts, like the demo's.
Memory stays compact: only the needed columns of the tables are kept, as numpy / Arrow arrays, and the annotation
entries wait on disk (one Arrow IPC file per split) until their split is generated.
"""

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import datasets
from datasets.features import List, Value

from labeler_cdan import CHEXPERT_OBSERVATIONS, NEGATIVE, NOT_MENTIONED, POSITIVE, UNCERTAIN

from .annotation import annotation_entry_split, iter_r2gen_annotation
from .base import (
    LABEL_SOURCE_LABELER,
    LABEL_SOURCE_MIMIC,
    SPLITS,
    CdanBuilder,
    CdanBuilderConfig,
    CdanDataError,
    canonical_split,
    first_existing,
    report_labels,
    view_from_code,
)
from .boxes import BOX_FEATURES, box_file_image_counts, read_box_file, study_box_rows


_patched_for_streaming = True
"""Opt out of `datasets`' streaming patches (see `data_cdan.base`)."""

MIMIC_TABLE_NAMES = {
    "chexpert": "mimic-cxr-2.0.0-chexpert",
    "metadata": "mimic-cxr-2.0.0-metadata",
    "split": "mimic-cxr-2.0.0-split",
}
MIMIC_METADATA_COLUMNS = {
    "dicom_id": "string",
    "subject_id": "int64",
    "study_id": "int64",
    "ViewPosition": "string",
    "StudyDate": "float64",
    "StudyTime": "float64",
}
"""The metadata columns read, with their types."""

ANNOTATION_ENTRY_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("problem", pa.string()),
        ("report", pa.string()),
        ("image_path", pa.list_(pa.string())),
        ("study_id", pa.int64()),
        ("subject_id", pa.int64()),
    ]
)
"""One row per annotation entry of a split: its id (or position), why it is malformed (or null) and its fields."""

REPORT_SECTION_FIELDS = {
    "INDICATION": "indication",
    "INDICATIONS": "indication",
    "REASON FOR EXAMINATION": "indication",
    "REASON FOR EXAM": "indication",
    "REASON FOR THIS EXAMINATION": "indication",
    "HISTORY": "history",
    "CLINICAL HISTORY": "history",
    "CLINICAL INFORMATION": "history",
    "UNDERLYING MEDICAL CONDITION": "history",
}
"""MIMIC-CXR report section headers (upper case, without the colon) and the column their text goes to. A section
ends at the next header; when a report has several sections for one column, their texts are joined in report order.
Headers such as `INDICATION/HISTORY:` or `CLINICAL HISTORY/INDICATION:` are not split: they are not listed, so they
end the previous section and are dropped."""

REPORT_HEADER_PATTERN = re.compile(r"^[ \t]*([A-Z][A-Z /&()'-]*[A-Z)]):", flags=re.MULTILINE)
"""A section header: an upper-case phrase at the start of a line, followed by a colon (`" INDICATION:  ..."`)."""


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
        reports_dir (`str`, *optional*): the folder holding the free-text reports `p<NN>/p<subject_id>/s<study_id>.txt`
            (the `files/` folder of the extracted `mimic-cxr-reports.zip`). Defaults to
            `<data_dir>/mimic-cxr-reports/files` when present, else the image folder (the reports extracted into the
            same `files/` tree as the JPEGs). A study whose report is missing gets None as indication and history.
        boxes_file (`str`, *optional*): a box file as `detection_cdan.write_box_file` writes it (`study_id` = the
            row's `id`, the DICOM id; `image_index` 0); adds the `boxes` column (images without a line get an empty
            list; boxes of a resized copy of an image are rescaled to it, those of an image of another aspect ratio
            refused, see [`study_box_rows`]). Without it there is no `boxes` column and the prepared data is
            unchanged. Rebuild with `download_mode="force_redownload"` after the file changed.
    """

    verify_images: bool = False
    annotation_file: str | None = None
    images_dir: str | None = None
    chexpert_file: str | None = None
    metadata_file: str | None = None
    split_file: str | None = None
    lookup_batch_size: int = 5000
    reports_dir: str | None = None
    boxes_file: str | None = None


def read_table_columns(path: Path, columns: dict[str, str], chunk_rows: int = 10000) -> dict[str, Any]:
    """
    Only `columns` of a CSV(.gz) table, parsed in chunks by pandas' C reader and kept compact: numeric columns as
    numpy arrays (blank -> NaN for floats), text columns as Arrow string arrays (blank -> "").

    Args:
        path (`Path`): the table.
        columns (`dict[str, str]`): column -> `"string"`, `"int64"` or `"float64"`.
        chunk_rows (`int`, *optional*): rows parsed at a time.
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


def annotation_entry_problem(entry: Any) -> str | None:
    """Why an R2Gen MIMIC annotation entry lacks the expected fields, or None when it has them."""
    if not isinstance(entry.get("id"), str) or not entry["id"].strip():
        return "annotation entry has no string 'id'"
    if not isinstance(entry.get("report"), str):
        return "annotation entry has no string 'report'"
    if not isinstance(entry.get("image_path"), list) or not all(isinstance(path, str) for path in entry["image_path"]):
        return "annotation entry has no 'image_path' list"
    try:
        int(entry["study_id"]), int(entry["subject_id"])
    except (KeyError, TypeError, ValueError):
        return "annotation entry has no integer 'study_id' and 'subject_id'"
    return None


def report_context_sections(report: str) -> dict[str, str | None]:
    """
    The clinical context of a MIMIC-CXR free-text report: the text of its indication and history sections (see
    `REPORT_SECTION_FIELDS`), whitespace collapsed, the `___` de-identification runs kept.

    Args:
        report (`str`): the whole text of a report file, whose sections start with a header line such as
            ` INDICATION:  ___F with cough.`

    Returns:
        `dict` with `"indication"` and `"history"`: the section text, or None when the report has no such section
        or it is empty.
    """
    headers = list(REPORT_HEADER_PATTERN.finditer(report))
    parts: dict[str, list[str]] = {"indication": [], "history": []}
    for position, header in enumerate(headers):
        field = REPORT_SECTION_FIELDS.get(" ".join(header.group(1).split()))
        if field is None:
            continue
        end = headers[position + 1].start() if position + 1 < len(headers) else len(report)
        text = " ".join(report[header.end() : end].split())
        if text:
            parts[field].append(text)
    return {field: " ".join(texts) if texts else None for field, texts in parts.items()}


def read_report_context(reports_dir: Path | None, subject_id: int, study_id: int) -> dict[str, str | None]:
    """
    [`report_context_sections`] of the report `<reports_dir>/p<NN>/p<subject_id>/s<study_id>.txt`; both None when
    there is no reports folder or no report file.
    """
    if reports_dir is not None:
        path = reports_dir / f"p{str(subject_id)[:2]}" / f"p{subject_id}" / f"s{study_id}.txt"
        try:
            return report_context_sections(path.read_text(encoding="utf-8", errors="replace"))
        except FileNotFoundError:
            pass
    return {"indication": None, "history": None}


@dataclass(frozen=True, eq=False)
class MimicTables:
    """
    What the MIMIC-CXR tables say, read once per preparation and shared by the splits (numpy / Arrow columns).

    Attributes:
        annotation_file, images_dir, metadata_file, chexpert_file, split_file (`Path`): the inputs.
        dicom_ids, view_positions (`pa.Array`), study_ids (`np.ndarray`): per metadata row.
        rows_by_study (`np.ndarray`): metadata rows sorted by study; `sorted_study_ids` their studies.
        study_keys, prior_study_ids (`np.ndarray`): per study (sorted), the prior study or -1.
        chexpert_study_ids (`np.ndarray`), chexpert_states (`np.ndarray` of int8, one column per observation).
        split_dicom_ids, split_values (`pa.Array`, *optional*): the official split table, when given.
        reports_dir (`Path`, *optional*): the folder of the free-text reports, when there is one.
    """

    annotation_file: Path
    images_dir: Path
    metadata_file: Path
    dicom_ids: pa.Array
    view_positions: pa.Array
    study_ids: np.ndarray
    rows_by_study: np.ndarray
    sorted_study_ids: np.ndarray
    study_keys: np.ndarray
    prior_study_ids: np.ndarray
    chexpert_file: Path
    chexpert_study_ids: np.ndarray
    chexpert_states: np.ndarray
    split_file: Path | None = None
    split_dicom_ids: pa.Array | None = None
    split_values: pa.Array | None = None
    reports_dir: Path | None = None

    @classmethod
    def read(
        cls,
        annotation_file: Path,
        images_dir: Path,
        metadata_file: Path,
        chexpert_file: Path,
        split_file: Path | None,
        reports_dir: Path | None = None,
    ) -> "MimicTables":
        """Read the three tables (the split table is optional) and derive the prior study of every study."""
        table = read_table_columns(metadata_file, MIMIC_METADATA_COLUMNS)
        study_ids = table["study_id"]
        rows_by_study = np.argsort(study_ids, kind="stable")
        study_keys, prior_study_ids = prior_studies(
            study_ids, table["subject_id"], table["StudyDate"], table["StudyTime"]
        )
        chexpert_study_ids, chexpert_states = read_chexpert_states(chexpert_file)
        split_table = read_table_columns(split_file, {"dicom_id": "string", "split": "string"}) if split_file else {}
        return cls(
            annotation_file=annotation_file,
            images_dir=images_dir,
            metadata_file=metadata_file,
            dicom_ids=table["dicom_id"],
            view_positions=table["ViewPosition"],
            study_ids=study_ids,
            rows_by_study=rows_by_study,
            sorted_study_ids=study_ids[rows_by_study],
            study_keys=study_keys,
            prior_study_ids=prior_study_ids,
            chexpert_file=chexpert_file,
            chexpert_study_ids=chexpert_study_ids,
            chexpert_states=chexpert_states,
            split_file=split_file,
            split_dicom_ids=split_table.get("dicom_id"),
            split_values=split_table.get("split"),
            reports_dir=reports_dir,
        )

    def prior_study(self, study_id: int) -> int:
        """The prior study of a study, or -1 (none, or the study is not in the metadata table)."""
        position = int(np.searchsorted(self.study_keys, study_id))
        if position < len(self.study_keys) and self.study_keys[position] == study_id:
            return int(self.prior_study_ids[position])
        return -1

    def study_rows(self, study_id: int) -> pa.Array:
        """The metadata rows of a study's images, in metadata-table order."""
        low = int(np.searchsorted(self.sorted_study_ids, study_id, side="left"))
        high = int(np.searchsorted(self.sorted_study_ids, study_id, side="right"))
        return pa.array(self.rows_by_study[low:high], type=pa.int64())

    def study_view_positions(self, study_id: int) -> list[str]:
        """The `ViewPosition` of a study's images, aligned with [`~MimicTables.study_image_paths`]."""
        return self.view_positions.take(self.study_rows(study_id)).to_pylist()

    def study_image_paths(self, study_id: int, subject_id: int) -> list[str]:
        """The image paths of a study's metadata rows (`<images_dir>/p<NN>/p<subject>/s<study>/<dicom_id>.jpg`)."""
        dicom_ids = self.dicom_ids.take(self.study_rows(study_id)).to_pylist()
        folder = f"{self.images_dir}{os.sep}p{str(subject_id)[:2]}{os.sep}p{subject_id}{os.sep}s{study_id}{os.sep}"
        return [f"{folder}{dicom_id}.jpg" for dicom_id in dicom_ids]


def prior_studies(
    study_ids: np.ndarray, subject_ids: np.ndarray, dates: np.ndarray, times: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """
    The prior study of every study: the patient's latest study whose (StudyDate, StudyTime) is strictly earlier;
    studies without a date have no prior and are nobody's prior. Numpy only, over one row per image.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: the sorted study ids and, aligned, their prior study (-1 for none).
    """
    order = np.lexsort((times, dates, study_ids))  # NaN dates sort last
    first = np.ones(len(order), dtype=bool)
    first[1:] = study_ids[order][1:] != study_ids[order][:-1]
    earliest = order[first]
    study = study_ids[earliest]
    subject = subject_ids[earliest]
    date = dates[earliest]
    time = np.nan_to_num(times[earliest], nan=0.0)
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
    return study[by_study], prior[by_study]


def read_chexpert_states(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The CheXpert table as sorted study ids and their int8 states in `CHEXPERT_OBSERVATIONS` order."""
    table = read_table_columns(path, {"study_id": "int64", **{name: "float64" for name in CHEXPERT_OBSERVATIONS}})
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
    return study[order], states[order]


class MimicCxrBuilder(CdanBuilder):
    """
    MIMIC-CXR from R2Gen's MIMIC `annotation.json` + the MIMIC-CXR-JPG tree and tables.

    The annotation is streamed once and each split's entries written to an Arrow IPC file in a temporary folder of
    the cache (removed when the preparation ends); that file and the tables ([`MimicTables`]) reach each split
    through `gen_kwargs`, and entries are read back and joined with the tables in batches of `lookup_batch_size`.

    Example:

    ```python
    >>> builder = MimicCxrBuilder(data_dir="mimic_cxr", cache_dir="cache")
    >>> builder.download_and_prepare()
    >>> dataset = builder.as_dataset()
    ```
    """

    DATASET_NAME = "mimic_cxr"
    EXTRA_FEATURES = {
        "subject_id": Value("int64"),
        "study_id": Value("int64"),
        "view_positions": List(Value("string")),
        "prior_study_id": Value("int64"),
        "prior_image_paths": List(Value("string")),
        "prior_view_positions": List(Value("string")),
        "history": Value("string"),
    }
    DESCRIPTION = "MIMIC-CXR-JPG studies in R2Gen's MIMIC-CXR split for CDAN, with the patient's prior study."
    HOMEPAGE = "https://physionet.org/content/mimic-cxr-jpg/2.0.0/"
    LICENSE = "PhysioNet Credentialed Health Data License 1.5.0 (no redistribution)"
    CITATION = (
        "Johnson et al., MIMIC-CXR-JPG, a large publicly available database of labeled chest radiographs, "
        "arXiv:1901.07042, 2019."
    )
    BUILDER_CONFIG_CLASS = MimicCxrConfig
    _entry_files_dir: tempfile.TemporaryDirectory | None = None
    """Holds the split entry files from `_plan` until the preparation ends."""

    def _info(self) -> datasets.DatasetInfo:
        info = super()._info()
        if self.config.boxes_file:
            info.features["boxes"] = List(BOX_FEATURES)
        return info


    def _table_path(self, option: str | None, kind: str, required: bool) -> Path | None:
        path = self._option_path(option)
        if path is None and self._data_dir() is not None:
            stem = MIMIC_TABLE_NAMES[kind]
            path = first_existing(self._data_dir() / f"{stem}.csv.gz", self._data_dir() / f"{stem}.csv")
        if path is None or not path.is_file():
            if required:
                raise FileNotFoundError(
                    f"mimic_cxr: {MIMIC_TABLE_NAMES[kind]}.csv(.gz) not found (data_dir={self._data_dir()}, "
                    f"option {kind}_file={option})."
                )
            return None
        return path


    def _reports_dir(self, images_dir: Path) -> Path | None:
        """The free-text reports folder: the `reports_dir` option (which must exist), else the default places."""
        option = self._option_path(self.config.reports_dir)
        if option is not None:
            if not option.is_dir():
                raise FileNotFoundError(f"mimic_cxr: reports_dir {option} is not a folder.")
            return option
        data_dir = self._data_dir()
        return first_existing(*([data_dir / "mimic-cxr-reports" / "files"] if data_dir else []), images_dir)

    def _plan(self) -> dict[str, dict[str, Any]]:
        config = self.config
        data_dir = self._data_dir()
        annotation = self._option_path(config.annotation_file) or (data_dir / "annotation.json" if data_dir else None)
        if annotation is None or not annotation.is_file():
            raise FileNotFoundError(f"mimic_cxr: annotation.json not found (data_dir={data_dir}).")
        images_dir = self._option_path(config.images_dir) or (
            first_existing(data_dir / "images", data_dir / "files") if data_dir else None
        )
        if images_dir is None or not images_dir.is_dir():
            raise FileNotFoundError(f"mimic_cxr: image folder images/ or files/ not found (data_dir={data_dir}).")
        tables = MimicTables.read(
            annotation,
            images_dir,
            metadata_file=self._table_path(config.metadata_file, "metadata", required=True),
            chexpert_file=self._table_path(config.chexpert_file, "chexpert", required=True),
            split_file=self._table_path(config.split_file, "split", required=False),
            reports_dir=self._reports_dir(images_dir),
        )
        if self._entry_files_dir is None:
            self._entry_files_dir = tempfile.TemporaryDirectory(prefix="mimic_cxr-entries-", dir=self._cache_dir_root)
        entry_files = self._write_split_entries(annotation, Path(self._entry_files_dir.name))
        seen_metadata_rows = np.zeros(len(tables.dicom_ids), dtype=bool)
        box_index = read_box_file(self._option_path(config.boxes_file)) if config.boxes_file else None
        return {
            split: {
                "entry_file": entry_files[split],
                "tables": tables,
                "seen_metadata_rows": seen_metadata_rows,
                "box_index": box_index,
            }
            for split in SPLITS
        }

    def _download_and_prepare(self, dl_manager, verification_mode, **prepare_split_kwargs):
        try:
            super()._download_and_prepare(dl_manager, verification_mode, **prepare_split_kwargs)
        finally:
            if self._entry_files_dir is not None:
                self._entry_files_dir.cleanup()
                self._entry_files_dir = None

    def _write_split_entries(self, annotation: Path, folder: Path) -> dict[str, str]:
        """
        One pass over the annotation: entries of an unknown split are reported, the others written per split to
        `<folder>/<split>.arrow` (Arrow IPC file, `ANNOTATION_ENTRY_SCHEMA`) in record batches of `lookup_batch_size`
        rows; malformed entries are kept with their problem, reported when generated. Returns the file of each split.
        """
        batch_size = self.config.lookup_batch_size
        entry_files = {split: str(folder / f"{split}.arrow") for split in SPLITS}
        rows: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
        with contextlib.ExitStack() as stack:
            writers = {
                split: stack.enter_context(pa.ipc.new_file(path, ANNOTATION_ENTRY_SCHEMA))
                for split, path in entry_files.items()
            }
            for key, index, entry in iter_r2gen_annotation(annotation):
                split, disagreement = annotation_entry_split(key, entry)
                if split is None:
                    item_id = entry.get("id") if isinstance(entry, dict) else f"{key}[{index}]"
                    if disagreement is not None:
                        self.problems.report("unknown_split", item_id, disagreement, annotation)
                    else:
                        self.problems.check(item_id, annotation, split=None, split_name=key)
                    continue
                if not isinstance(entry, dict):
                    row = {"item_id": f"{key}[{index}]", "problem": "annotation entry has no string 'id'"}
                elif (problem := annotation_entry_problem(entry)) is not None:
                    has_id = isinstance(entry.get("id"), str) and entry["id"].strip()
                    row = {"item_id": entry["id"] if has_id else "?", "problem": problem}
                else:
                    row = {
                        "item_id": entry["id"],
                        "report": entry["report"],
                        "image_path": entry["image_path"],
                        "study_id": int(entry["study_id"]),
                        "subject_id": int(entry["subject_id"]),
                    }
                rows[split].append(row)
                if len(rows[split]) == batch_size:
                    writers[split].write_batch(pa.RecordBatch.from_pylist(rows[split], schema=ANNOTATION_ENTRY_SCHEMA))
                    rows[split] = []
            for split in SPLITS:
                if rows[split]:
                    writers[split].write_batch(pa.RecordBatch.from_pylist(rows[split], schema=ANNOTATION_ENTRY_SCHEMA))
        return entry_files

    def _generate_examples(
        self,
        split: str,
        entry_file: str,
        tables: MimicTables,
        seen_metadata_rows: np.ndarray,
        box_index: dict | None = None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        image_counts = box_file_image_counts(box_index) if box_index is not None else None
        produced = 0
        limit = self.config.max_studies_per_split
        # Each record batch is one lookup batch (see `_write_split_entries`). Read with plain file reads, not
        # memory-mapped: the mapped pages read would stay in the resident memory until the split ends.
        with pa.OSFile(entry_file) as source:
            reader = pa.ipc.open_file(source)
            for index in range(reader.num_record_batches):
                batch = reader.get_batch(index).to_pylist()
                for study_id, example in self._examples_from_batch(batch, split, tables, seen_metadata_rows):
                    if limit is not None and produced >= limit:
                        return
                    produced += 1
                    if box_index is not None:
                        example["boxes"] = study_box_rows(
                            box_index, study_id, example["images"], self.config.boxes_file, image_counts
                        )
                    yield study_id, example

    def _examples_from_batch(
        self, batch: list[dict[str, Any]], split: str, tables: MimicTables, seen_metadata_rows: np.ndarray
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        annotation = tables.annotation_file
        entries = []
        for entry in batch:
            if entry["problem"] is None:
                entries.append(entry)
            else:
                self.problems.report("bad_report", entry["item_id"], entry["problem"], annotation)
        if not entries:
            return
        ids = pa.array([entry["item_id"] for entry in entries], type=pa.string())
        meta_rows = pc.index_in(ids, value_set=tables.dicom_ids).to_numpy(zero_copy_only=False)
        if tables.split_dicom_ids is not None:
            split_rows = pc.index_in(ids, value_set=tables.split_dicom_ids).to_numpy(zero_copy_only=False)
        study_ids = np.array([entry["study_id"] for entry in entries], dtype=np.int64)
        label_positions = np.searchsorted(tables.chexpert_study_ids, study_ids)
        context_by_study: dict[int, dict[str, str | None]] = {}  # a study's images share its report
        for position, entry in enumerate(entries):
            study_id = entry["item_id"]
            meta_row = meta_rows[position]
            if meta_row is None or np.isnan(meta_row):
                self.problems.report(
                    "missing_metadata",
                    study_id,
                    f"dicom_id {study_id} is not in the metadata table",
                    tables.metadata_file,
                )
                continue
            meta_row = int(meta_row)
            if not self.problems.check(study_id, annotation, is_duplicate=bool(seen_metadata_rows[meta_row])):
                continue
            seen_metadata_rows[meta_row] = True
            if int(tables.study_ids[meta_row]) != entry["study_id"]:
                self.problems.report(
                    "missing_metadata",
                    study_id,
                    f"the annotation gives study {entry['study_id']} but the metadata table study "
                    f"{int(tables.study_ids[meta_row])}",
                    tables.metadata_file,
                )
                continue
            if tables.split_dicom_ids is not None:
                split_row = split_rows[position]
                if split_row is not None and not np.isnan(split_row):
                    official = tables.split_values[int(split_row)].as_py()
                    if canonical_split(official) != split:
                        self.problems.report(
                            "unknown_split",
                            study_id,
                            f"the annotation puts it in {split} but {tables.split_file.name} in {official!r}",
                            tables.split_file,
                        )
                        continue
            findings = entry["report"].strip()
            if not self.problems.check(study_id, annotation, findings=findings, image_count=len(entry["image_path"])):
                continue
            image_paths = [tables.images_dir / path for path in entry["image_path"]]
            if not self._check_images(study_id, image_paths):
                continue
            label_position = int(label_positions[position])
            if (
                label_position < len(tables.chexpert_study_ids)
                and tables.chexpert_study_ids[label_position] == entry["study_id"]
            ):
                labels = tables.chexpert_states[label_position].tolist()
                label_source = LABEL_SOURCE_MIMIC
            else:
                action = self.problems.report(
                    "missing_labels",
                    study_id,
                    f"study {entry['study_id']} is not in the CheXpert table",
                    tables.chexpert_file,
                )
                if action != "labeler":
                    continue
                labels, label_source = report_labels(findings), LABEL_SOURCE_LABELER
            prior = tables.prior_study(entry["study_id"])
            view_position = tables.view_positions[meta_row].as_py()
            if entry["study_id"] not in context_by_study:
                context_by_study[entry["study_id"]] = read_report_context(
                    tables.reports_dir, entry["subject_id"], entry["study_id"]
                )
            context = context_by_study[entry["study_id"]]
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
                    "indication": context["indication"],
                    "comparison": None,
                    "chexpert_labels": labels,
                    "label_source": label_source,
                    "subject_id": entry["subject_id"],
                    "study_id": entry["study_id"],
                    "prior_study_id": prior if prior >= 0 else None,
                    "prior_image_paths": tables.study_image_paths(prior, entry["subject_id"]) if prior >= 0 else [],
                    "prior_view_positions": tables.study_view_positions(prior) if prior >= 0 else [],
                    "history": context["history"],
                },
            )


__all__ = [
    "ANNOTATION_ENTRY_SCHEMA",
    "MIMIC_TABLE_NAMES",
    "REPORT_SECTION_FIELDS",
    "MimicCxrBuilder",
    "MimicCxrConfig",
    "MimicTables",
    "annotation_entry_problem",
    "prior_studies",
    "read_chexpert_states",
    "read_report_context",
    "read_table_columns",
    "report_context_sections",
]
