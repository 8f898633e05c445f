"""IU X-Ray (Indiana University chest X-ray collection, Open-I) as a `datasets` builder.

Source: R2Gen's `annotation.json` + `images/<id>/<k>.png`, or the Open-I download (`NLMCXR_reports.tgz` with
`ecgen-radiology/<n>.xml`, `NLMCXR_png/`, optionally `nlmcxr_dicom_metadata.csv(.gz)` for the views).
Licence: CC BY-NC-ND 4.0 (reports and images, Indiana University / NLM Open-i).
Citation: Demner-Fushman et al., "Preparing a collection of radiology examinations for distribution and retrieval",
JAMIA 23(2), 2016; R2Gen split: Chen et al., "Generating Radiology Reports via Memory-driven Transformer", EMNLP 2020.
Splits: R2Gen's 2069 / 296 / 590 studies with an annotation, else a seeded 7:1:2 split by report (= patient).

Columns: `id` (R2Gen id, or `CXR<uid>` without an annotation), `split`, `images` (`List(Image())`, paths decoded
lazily), `views` (`frontal` / `lateral` / `unknown`), `findings`, `impression`, `indication`, `comparison` (None when
absent; the R2Gen layout has only the findings), `chexpert_labels` (14 states from `labeler_cdan`), `label_source`,
`openi_uid`, `view_positions` (DICOM "View Position", `""` if unknown), `mesh_major`, `history` (always None: Open-I
reports have only COMPARISON, INDICATION, FINDINGS and IMPRESSION sections). No prior studies: Open-I does not link
a patient's studies. With the `boxes_file` option (a detector's JSON-lines box file, see
`data_cdan.boxes.read_box_file`), also `boxes`: per image a list of `BOX_FEATURES` dicts, like the demo's. Layouts,
split and view rules: docs/data.md.
"""

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets.features import List, Value

from .annotation import annotation_entry_split, iter_r2gen_annotation
from .base import (
    FRONTAL,
    LABEL_SOURCE_LABELER,
    LATERAL,
    SPLITS,
    UNKNOWN_VIEW,
    CdanBuilder,
    CdanBuilderConfig,
    first_existing,
    report_labels,
    seeded_split,
)
from .boxes import BOX_FEATURES, box_file_image_counts, read_box_file, study_box_rows
from .openi import (
    OpenIReport,
    iu_views_from_dicom,
    match_openi_entry,
    openi_prefix_index,
    read_iu_view_positions,
    read_openi_reports,
    select_view_indices,
)


logger = logging.getLogger(__name__)

_patched_for_streaming = True
"""Opt out of `datasets`' streaming patches (see `data_cdan.base`)."""


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
        boxes_file (`str`, *optional*): a box file as `detection_cdan.write_box_file` writes it (`study_id` = the
            row's `id`, `image_index` = the position in `images`); adds the `boxes` column (images without a line get
            an empty list; boxes of a resized copy of an image are rescaled to it, those of an image of another
            aspect ratio refused, see [`study_box_rows`]). Without it there is no `boxes` column and the prepared
            data is unchanged. Rebuild with `download_mode="force_redownload"` after the file changed.
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
    boxes_file: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {self.max_images}.")
        if self.layout not in ("auto", "r2gen", "openi"):
            raise ValueError(f"layout must be 'auto', 'r2gen' or 'openi', got {self.layout!r}.")
        if self.min_images < 1:
            raise ValueError(f"min_images must be at least 1, got {self.min_images}.")


class IuXrayBuilder(CdanBuilder):
    """
    IU X-Ray from the R2Gen layout or the original Open-I download (layouts, split and view rules: docs/data.md).

    Example:

    ```python
    >>> builder = IuXrayBuilder(data_dir="iu_xray", cache_dir="cache")  # annotation.json + images/
    >>> builder.download_and_prepare()
    >>> dataset = builder.as_dataset()  # DatasetDict: train / validation / test
    ```
    """

    DATASET_NAME = "iu_xray"
    EXTRA_FEATURES = {
        "openi_uid": Value("int32"),
        "view_positions": List(Value("string")),
        "mesh_major": List(Value("string")),
        "history": Value("string"),
    }
    DESCRIPTION = "IU X-Ray (Indiana University chest X-ray collection, Open-I) studies for CDAN."
    HOMEPAGE = "https://openi.nlm.nih.gov/faq#collection"
    LICENSE = "CC BY-NC-ND 4.0 (reports and images, Indiana University / NLM Open-i)"
    CITATION = (
        "Demner-Fushman et al., Preparing a collection of radiology examinations for distribution and retrieval, "
        "JAMIA 23(2), 2016."
    )
    BUILDER_CONFIG_CLASS = IuXrayConfig

    def _info(self) -> datasets.DatasetInfo:
        info = super()._info()
        if self.config.boxes_file:
            info.features["boxes"] = List(BOX_FEATURES)
        return info

    def _resolve_inputs(self) -> dict[str, Any]:
        config = self.config
        data_dir = self._data_dir()

        def in_data_dir(*names: str) -> Path | None:
            return first_existing(*(data_dir / name for name in names)) if data_dir else None

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

    def _plan(self) -> dict[str, dict[str, Any]]:
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
        box_index = read_box_file(self._option_path(self.config.boxes_file)) if self.config.boxes_file else None
        return {split: {"studies": studies, "box_index": box_index} for split, studies in studies_by_split.items()}

    def _annotation_entries(self, annotation: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        """Annotation entries with a known split, a unique id and the expected fields, as (split, entry)."""
        seen: set[str] = set()
        for key, index, entry in iter_r2gen_annotation(annotation):
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"].strip():
                label = f"{key}[{index}]"
                self.problems.report("bad_report", label, "annotation entry has no string 'id'", annotation)
                continue
            study_id = entry["id"]
            if not isinstance(entry.get("report"), str):
                self.problems.report("bad_report", study_id, "annotation entry has no string 'report'", annotation)
                continue
            split, disagreement = annotation_entry_split(key, entry)
            if disagreement is not None:
                self.problems.report("unknown_split", study_id, disagreement, annotation)
                continue
            is_duplicate = study_id in seen
            if not self.problems.check(study_id, annotation, split=split, split_name=key, is_duplicate=is_duplicate):
                continue
            seen.add(study_id)
            yield split, entry

    def _r2gen_candidates(self, inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        annotation, images_dir = inputs["annotation"], inputs["images"]
        min_images = self.config.min_images
        for split, entry in self._annotation_entries(annotation):
            study_id = entry["id"]
            image_paths = entry.get("image_path")
            if not isinstance(image_paths, list) or not all(isinstance(path, str) for path in image_paths):
                self.problems.report("bad_report", study_id, "annotation entry has no 'image_path' list", annotation)
                continue
            findings = entry["report"].strip()
            if not self.problems.check(
                study_id, annotation, findings=findings, image_count=len(image_paths), min_images=min_images
            ):
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
                "history": None,
            }

    def _openi_study(
        self,
        study_id: str,
        split: str,
        report: OpenIReport,
        image_ids: list[str],
        images_dir: Path,
        view_positions_by_image: dict[str, str],
    ) -> dict[str, Any]:
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
            "images": [str(images_dir / f"{image_ids[index]}.png") for index in order],
            "views": [views[index] for index in order],
            "view_positions": [codes[index] for index in order],
            "findings": report.findings,
            "impression": report.impression or None,
            "indication": report.indication or None,
            "comparison": report.comparison or None,
            "openi_uid": report.uid,
            "mesh_major": report.mesh_major,
            "history": None,
        }

    def _read_reports(self, inputs: dict[str, Any]) -> tuple[list[OpenIReport], dict[str, str]]:
        """The Open-I reports and the DICOM View Position per image id (empty without a metadata file)."""
        reports = read_openi_reports(inputs["reports"], self.problems)
        view_positions = read_iu_view_positions(inputs["metadata"]) if inputs["metadata"] else {}
        return reports, view_positions

    def _openi_annotation_candidates(self, inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        annotation = inputs["annotation"]
        reports_list, view_positions = self._read_reports(inputs)
        reports = {report.uid: report for report in reports_list}
        by_prefix = openi_prefix_index(reports_list)
        used: set[int] = set()
        candidates = []
        for split, entry in self._annotation_entries(annotation):
            study_id = entry["id"]
            report, image_ids, reason = match_openi_entry(study_id, entry["report"], by_prefix, reports)
            if report is None:
                self.problems.report("unmatched_report", study_id, reason, annotation)
                continue
            used.add(report.uid)
            if not self.problems.check(
                study_id,
                report.source,
                findings=report.findings,
                image_count=len(image_ids),
                min_images=self.config.min_images,
            ):
                continue
            candidates.append(
                self._openi_study(study_id, split, report, image_ids, inputs["images"], view_positions)
            )
        for report in reports_list:
            if report.uid not in used:
                self.problems.note(
                    "not_in_annotation", f"CXR{report.uid}", f"report not in {annotation.name}", report.source
                )
        return iter(candidates)

    def _openi_seeded_candidates(self, inputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        reports, view_positions = self._read_reports(inputs)
        eligible = [
            report
            for report in reports
            if self.problems.check(
                f"CXR{report.uid}",
                report.source,
                findings=report.findings,
                image_count=len(report.image_ids),
                min_images=self.config.min_images,
            )
        ]
        assignment = seeded_split((report.uid for report in eligible), self.config.split_seed)
        return (
            self._openi_study(
                f"CXR{report.uid}", assignment[report.uid], report, report.image_ids, inputs["images"], view_positions
            )
            for report in eligible
        )

    def _generate_examples(self, split: str, studies: list[dict[str, Any]], box_index: dict | None = None):
        image_counts = box_file_image_counts(box_index) if box_index is not None else None
        for study in studies:
            labels = report_labels(study["findings"], study["impression"])
            example = {**study, "chexpert_labels": labels, "label_source": LABEL_SOURCE_LABELER}
            if box_index is not None:
                example["boxes"] = study_box_rows(
                    box_index, study["id"], study["images"], self.config.boxes_file, image_counts
                )
            yield study["id"], example


__all__ = ["IuXrayBuilder", "IuXrayConfig"]
