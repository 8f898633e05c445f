"""The embedded CDAN demo: verbatim IU X-Ray (Open-I) report text with SYNTHETIC images, as a `datasets` builder.

Source: `data/demo/reports.jsonl` in this repository (about 1,000 R2Gen IU X-Ray studies, made by
`scripts/make_demo_reports.py`); images are rendered at prepare time by [`render_study`] from each report's labels,
seeded with the CRC-32 of the study id, and written into `<prepared dir>/images/`.
Licence: reports CC BY-NC-ND 4.0 (Indiana University / NLM Open-i); images synthetic (data/demo/PROVENANCE.md).
Citation: Demner-Fushman et al., JAMIA 23(2), 2016; split from Chen et al., EMNLP 2020 (R2Gen).
Splits: the R2Gen split of each study (`train`, `validation`, `test`). Not for evaluation.

Columns: the IU X-Ray columns (`id`, `split`, `images`, `views`, `findings`, `impression`, `indication`, `comparison`,
`chexpert_labels`, `label_source`, `openi_uid`, `view_positions` blank, `mesh_major` empty) plus `synthetic`
(always True) and `boxes` (per view, the renderer's true lesion boxes, `List(BOX_FEATURES)`). Rendering runs in
`min(2, CPU count)` processes unless `download_and_prepare(num_proc=...)` says otherwise.

Prior studies (for PriorRG): a seeded ~60 % of the studies get a prior study of the same synthetic patient
(`prior_images`, `prior_views`, `prior_view_positions` blank, `prior_labels`; all None / empty otherwise), whose
labels follow [`demo_prior_labels`] and whose views are rendered with the study's own seed, so anatomy, pose and
noise are the current study's. The report text says nothing about change since the prior (Open-I findings rarely
compare), so demo priors test the plumbing, not any benefit of reading a prior. `history` is None (Open-I reports
have no history section).
"""

import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets.features import Image, List, Value

from labeler_cdan import (
    CHEXPERT_OBSERVATIONS,
    NEGATIVE,
    NO_FINDING,
    NOT_MENTIONED,
    PATHOLOGY_OBSERVATIONS,
    POSITIVE,
    UNCERTAIN,
)

from .base import (
    FRONTAL,
    LABEL_SOURCE_LABELER,
    LATERAL,
    SPLITS,
    CdanBuilder,
    CdanBuilderConfig,
    canonical_split,
    report_labels,
)
from .boxes import BOX_FEATURES, boxes_to_rows
from .iu_xray import IuXrayBuilder
from .synthetic_cxr import render_study, save_png


_patched_for_streaming = True
"""Opt out of `datasets`' streaming patches (see `data_cdan.base`)."""

DEMO_REPORTS_FILE = Path(__file__).resolve().parents[1] / "data" / "demo" / "reports.jsonl"

PRIOR_STUDY_FRACTION = 0.6
"""Default share of demo studies with a prior study (`DemoConfig.prior_fraction`)."""
NEW_FINDING_PROBABILITY = 0.5
"""Probability that a finding POSITIVE in the study was absent (NEGATIVE) from its prior: it is new."""
RESOLVED_FINDING_PROBABILITY = 0.3
"""Probability that the prior had one more POSITIVE finding, since resolved (NEGATIVE or not mentioned now)."""
PRIOR_RULE_STREAM = 9
"""Random stream of the prior rule (`numpy.random.default_rng([seed, PRIOR_RULE_STREAM])`), not the renderer's."""


def demo_prior_labels(
    labels: list[int], seed: int, prior_fraction: float = PRIOR_STUDY_FRACTION
) -> list[int] | None:
    """
    The CheXpert states of a demo study's prior study, or None when the study has no prior. Seeded, going back in
    time from the study's own labels, in this order of draws from `default_rng([seed, PRIOR_RULE_STREAM])`:

    1. the study has a prior with probability `prior_fraction` (else None);
    2. each pathology observation (`PATHOLOGY_OBSERVATIONS`: not "No Finding" nor "Support Devices") POSITIVE in
       the study is NEGATIVE in the prior with probability `NEW_FINDING_PROBABILITY` (a new finding);
    3. with probability `RESOLVED_FINDING_PROBABILITY`, one pathology observation not POSITIVE in the study, drawn
       uniformly, is POSITIVE in the prior (a finding that has since resolved);
    4. when a state changed, "No Finding" follows the labeler's rule on the prior's pathology states: NOT_MENTIONED
       if one is POSITIVE or UNCERTAIN, else POSITIVE. Other states are the study's.

    Args:
        labels (`list[int]`): the study's 14 states, in `CHEXPERT_OBSERVATIONS` order.
        seed (`int`): the study's seed (the CRC-32 of its id, as for rendering).
        prior_fraction (`float`, *optional*, defaults to 0.6): probability of having a prior.
    """
    rng = np.random.default_rng([seed, PRIOR_RULE_STREAM])
    if rng.random() >= prior_fraction:
        return None
    prior = list(labels)
    pathology = [CHEXPERT_OBSERVATIONS.index(name) for name in PATHOLOGY_OBSERVATIONS]
    for index in pathology:
        if labels[index] == POSITIVE and rng.random() < NEW_FINDING_PROBABILITY:
            prior[index] = NEGATIVE
    if rng.random() < RESOLVED_FINDING_PROBABILITY:
        candidates = [index for index in pathology if labels[index] != POSITIVE]
        if candidates:
            prior[candidates[int(rng.integers(len(candidates)))]] = POSITIVE
    if prior != list(labels):
        has_finding = any(prior[index] in (POSITIVE, UNCERTAIN) for index in pathology)
        prior[CHEXPERT_OBSERVATIONS.index(NO_FINDING)] = NOT_MENTIONED if has_finding else POSITIVE
    return prior


@dataclass
class DemoConfig(CdanBuilderConfig):
    """
    Demo options.

    Args:
        reports_file (`str`, *optional*): JSON-lines reports (defaults to `data/demo/reports.jsonl` in the
            repository); fields r2gen_id, openi_uid, split, findings, impression, indication, comparison.
        image_size (`int`, *optional*, defaults to 256): side of the rendered views.
        view_names (`tuple[str, ...]`, *optional*): views rendered per study (`("frontal", "lateral")`).
        prior_fraction (`float`, *optional*, defaults to 0.6): share of studies given a prior study (see
            [`demo_prior_labels`]); 0 gives none.
    """

    reports_file: str | None = None
    image_size: int = 256
    view_names: tuple[str, ...] = (FRONTAL, LATERAL)
    prior_fraction: float = PRIOR_STUDY_FRACTION

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.prior_fraction <= 1.0:
            raise ValueError(f"prior_fraction must be between 0 and 1, got {self.prior_fraction}.")


class DemoBuilder(CdanBuilder):
    """
    The embedded demo: verbatim Open-I report text with synthetic images rendered from each report's labels.

    Example:

    ```python
    >>> dataset = load_cdan_dataset("demo", max_studies_per_split=8)
    ```
    """

    DATASET_NAME = "demo"
    EXTRA_FEATURES = {
        **IuXrayBuilder.EXTRA_FEATURES,
        "synthetic": Value("bool"),
        "boxes": List(BOX_FEATURES),
        "prior_images": List(Image()),
        "prior_views": List(Value("string")),
        "prior_view_positions": List(Value("string")),
        "prior_labels": List(Value("int8"), length=len(CHEXPERT_OBSERVATIONS)),
    }
    DESCRIPTION = (
        "CDAN demo: Open-I report text (verbatim) with SYNTHETIC images rendered from the report's labels by "
        "synthetic_cxr; not for evaluation. About 60 % of the studies have a synthetic prior study of the same "
        "patient with changed labels; the report text states no change since the prior, so the priors test the "
        "plumbing only."
    )
    LICENSE = "Reports: CC BY-NC-ND 4.0 (Indiana University / NLM Open-i); images: synthetic."
    BUILDER_CONFIG_CLASS = DemoConfig

    def download_and_prepare(self, *args, num_proc: int | None = None, **kwargs):
        """`download_and_prepare`, rendering in `min(2, CPU count)` processes unless `num_proc` is given."""
        if num_proc is None:
            num_proc = min(2, os.cpu_count() or 1)
        return super().download_and_prepare(*args, num_proc=num_proc if num_proc > 1 else None, **kwargs)

    def _plan(self) -> dict[str, dict[str, Any]]:
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
                if not self.problems.check(
                    study_id, reports_file, split=split, split_name=record.get("split"), is_duplicate=study_id in seen
                ):
                    continue
                seen.add(study_id)
                findings = (record.get("findings") or "").strip()
                if not self.problems.check(study_id, reports_file, findings=findings):
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
        return {split: {"studies": studies} for split, studies in studies_by_split.items()}

    def _generate_examples(self, split: str, studies: list[dict[str, Any]]):
        written_dir = Path(self._output_dir) / "images"
        stored_dir = Path(self._final_output_dir() if self._file_format == "arrow" else self._output_dir) / "images"
        written_dir.mkdir(parents=True, exist_ok=True)
        view_names = tuple(self.config.view_names)
        for study in studies:
            labels = report_labels(study["findings"], study["impression"])
            seed = zlib.crc32(study["id"].encode("utf-8"))
            images, drawn = render_study(
                labels, seed=seed, image_size=self.config.image_size, views=view_names, return_metadata=True
            )
            safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", study["id"])
            paths = []
            for view, image in zip(view_names, images):
                name = f"{safe_id}_{view}.png"
                save_png(image, written_dir / name, extra_text={"Study": study["id"]}, compress_level=1)
                paths.append(str(stored_dir / name))
            prior_labels = demo_prior_labels(labels, seed, self.config.prior_fraction)
            prior_paths = []
            if prior_labels == labels:  # same seed and labels: the prior's pixels are the study's
                prior_paths = paths
            elif prior_labels is not None:
                prior_images = render_study(
                    prior_labels, seed=seed, image_size=self.config.image_size, views=view_names
                )
                for view, image in zip(view_names, prior_images):
                    name = f"{safe_id}_prior_{view}.png"
                    extra_text = {"Study": f"{study['id']} prior"}
                    save_png(image, written_dir / name, extra_text=extra_text, compress_level=1)
                    prior_paths.append(str(stored_dir / name))
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
                    "boxes": [boxes_to_rows(view["boxes"]) for view in drawn],
                    "history": None,
                    "prior_images": prior_paths,
                    "prior_views": list(view_names) if prior_paths else [],
                    "prior_view_positions": [""] * len(prior_paths),
                    "prior_labels": prior_labels,
                },
            )


__all__ = [
    "DEMO_REPORTS_FILE",
    "NEW_FINDING_PROBABILITY",
    "PRIOR_STUDY_FRACTION",
    "RESOLVED_FINDING_PROBABILITY",
    "DemoBuilder",
    "DemoConfig",
    "demo_prior_labels",
]
