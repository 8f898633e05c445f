"""CheXpert labels from Open-I's MeSH tags, to validate the labeler (`labeler_cdan`).

Open-I's expert MeSH indexing (``mesh_major``) of IU X-Ray reports is turned into 0/1 ground truth for the 14 CheXpert
observations; `scripts/evaluate_labeler.py` scores the labeler against it. The mapping and the measured scores are in
``docs/labeler.md``.

References: Demner-Fushman et al., "Preparing a collection of radiology examinations for distribution and retrieval",
JAMIA 23(2), 2016 (IU X-Ray / Open-I and its MeSH indexing); Irvin et al., CheXpert, AAAI 2019 (the observations).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from labeler_cdan import CHEXPERT_OBSERVATIONS


MESH_TO_OBSERVATIONS: dict[str, tuple[str, ...]] = {
    "normal": ("No Finding",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Mediastinum": ("Enlarged Cardiomediastinum",),
    "Opacity": ("Lung Opacity",),
    "Density": ("Lung Opacity",),
    "Airspace Disease": ("Lung Opacity",),
    "Infiltrate": ("Lung Opacity",),
    "Consolidation": ("Consolidation", "Lung Opacity"),
    "Pneumonia": ("Pneumonia", "Lung Opacity"),
    "Nodule": ("Lung Lesion",),
    "Mass": ("Lung Lesion",),
    "Pulmonary Edema": ("Edema",),
    "Pulmonary Congestion": ("Edema",),
    "Heart Failure": ("Edema",),
    "Pulmonary Atelectasis": ("Atelectasis",),
    "Pneumothorax": ("Pneumothorax",),
    "Hydropneumothorax": ("Pneumothorax", "Pleural Effusion"),
    "Hemopneumothorax": ("Pneumothorax", "Pleural Effusion"),
    "Pleural Effusion": ("Pleural Effusion",),
    "Hemothorax": ("Pleural Effusion",),
    "Pleura": ("Pleural Other",),
    "Fractures, Bone": ("Fracture",),
    "Catheters, Indwelling": ("Support Devices",),
    "Implanted Medical Device": ("Support Devices",),
    "Surgical Instruments": ("Support Devices",),
    "Tube, Inserted": ("Support Devices",),
    "Stents": ("Support Devices",),
    "Medical Device": ("Support Devices",),
    "Sutures": ("Support Devices",),
}
"""Open-I MeSH term (first component of a ``mesh_major`` entry) -> CheXpert observations. Qualified cases
("Cardiac Shadow/enlarged", pleural "Thickening"/"Cicatrix", the site filter of "Opacity", "Density", "Nodule" and
"Mass") are handled in `labels_from_mesh`."""

NON_LUNG_SITES = frozenset(
    {
        "ribs",
        "thoracic vertebrae",
        "lumbar vertebrae",
        "spine",
        "clavicle",
        "sternum",
        "shoulder",
        "humerus",
        "mediastinum",
        "adipose tissue",
        "breast",
        "heart",
        "mitral valve",
        "paratracheal",
        "supracardiac",
        "neck",
        "abdomen",
        "pleura",
        "thorax",
        "anterior",
        "posterior",
        "soft tissue",
    }
)
"""MeSH qualifiers that put an "Opacity", "Density", "Nodule" or "Mass" outside the lung."""

LUNG_SITES = frozenset({"lung", "retrocardiac", "costophrenic angle", "pulmonary alveoli", "pleural sinus", "sulcus"})
"""MeSH qualifiers that put an "Opacity", "Density", "Nodule" or "Mass" in the lung."""

NO_INDEXING = "No Indexing"
"""The ``mesh_major`` entry of reports the indexers left unindexed; they are not evaluated."""


def labels_from_mesh(mesh_terms: Iterable[str]) -> list[int]:
    """Ground-truth 0/1 labels of one IU X-Ray report from its expert MeSH terms.

    An observation is 1 when at least one term maps to it (`MESH_TO_OBSERVATIONS`, plus: "Cardiac Shadow" qualified
    "enlarged" -> Cardiomegaly; "Thickening" or "Cicatrix" qualified "pleura" -> Pleural Other). "Opacity", "Density",
    "Nodule" and "Mass" count only inside the lung: a qualifier in `LUNG_SITES`, or no qualifier in
    `NON_LUNG_SITES`.

    Args:
        mesh_terms (`Iterable[str]`):
            The report's ``mesh_major`` entries, e.g. ``["Cardiomegaly/mild", "Opacity/lung/base/left"]``.

    Returns:
        `list[int]`: 14 values in `CHEXPERT_OBSERVATIONS` order.
    """
    positive: set[str] = set()
    for term in mesh_terms:
        parts = [part.strip() for part in term.split("/")]
        head, qualifiers = parts[0], set(parts[1:])
        outside_lung = not (qualifiers & LUNG_SITES) and bool(qualifiers & NON_LUNG_SITES)
        if head in ("Opacity", "Density", "Nodule", "Mass") and outside_lung:
            continue
        if head == "Cardiac Shadow" and "enlarged" in qualifiers:
            positive.add("Cardiomegaly")
        if head in ("Thickening", "Cicatrix") and "pleura" in qualifiers:
            positive.add("Pleural Other")
        positive.update(MESH_TO_OBSERVATIONS.get(head, ()))
    return [int(name in positive) for name in CHEXPERT_OBSERVATIONS]


def report_text(report: dict) -> str:
    """The text an IU X-Ray report is labeled from: its findings and impression, one per line."""
    return "\n".join(part for part in (report.get("findings") or "", report.get("impression") or "") if part.strip())


def load_mesh_validation_set(data_dir: str | Path, splits: Iterable[str] = ("train", "val", "outside")) -> list[dict]:
    """Open-I reports that have expert MeSH tags, with the R2Gen split of each.

    Args:
        data_dir (`str` or `Path`):
            Folder with ``openi_reports.jsonl`` and ``r2gen_to_openi_crosswalk.json``.
        splits (`Iterable[str]`, *optional*, defaults to `("train", "val", "outside")`):
            R2Gen splits to keep; ``"outside"`` is the Open-I reports that R2Gen does not use. The R2Gen test split
            has no tags here. Reports indexed "No Indexing" are left out.

    Returns:
        `list[dict]`: The kept reports (Open-I fields plus ``"split"``), in file order.
    """
    data_dir = Path(data_dir)
    with open(data_dir / "r2gen_to_openi_crosswalk.json", encoding="utf-8") as handle:
        split_of_uid = {entry["uid"]: entry["split"] for entry in json.load(handle)}
    wanted = set(splits)
    reports = []
    with open(data_dir / "openi_reports.jsonl", encoding="utf-8") as handle:
        for line in handle:
            report = json.loads(line)
            report["split"] = split_of_uid.get(report["uid"], "outside")
            mesh = report.get("mesh_major")
            if report["split"] not in wanted or not mesh or NO_INDEXING in mesh:
                continue
            reports.append(report)
    return reports


__all__ = [
    "LUNG_SITES",
    "MESH_TO_OBSERVATIONS",
    "NON_LUNG_SITES",
    "NO_INDEXING",
    "labels_from_mesh",
    "load_mesh_validation_set",
    "report_text",
]
