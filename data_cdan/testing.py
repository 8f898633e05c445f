"""Input writers for tests and benchmarks: IU X-Ray layouts and MIMIC-CXR files in their exact formats.

Real report text comes from the shared data folder's `iu_xray`; pixels come from the real chest X-ray PNGs in its
`cxr_images` (they stand in for IU X-Ray / MIMIC-CXR images, which are not available). MIMIC-CXR files are generated
(MIMIC data is credentialed and never stored here), following `mimic_cxr/FORMAT.md` there. The shared data folder is
`$CDAN_SHARED_DATA`, by default `../shared/data` beside the repository; nothing is read at import.
"""

import gzip
import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


SHARED_DATA_ENV = "CDAN_SHARED_DATA"


def shared_data_dir() -> Path:
    """The shared data folder: `$CDAN_SHARED_DATA`, else `../shared/data` beside the repository root."""
    configured = os.environ.get(SHARED_DATA_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data"


IU_XRAY = shared_data_dir() / "iu_xray"
ANNOTATION_FILE = IU_XRAY / "annotation.json"
REPORTS_ARCHIVE = IU_XRAY / "raw" / "NLMCXR_reports.tgz"
DICOM_METADATA_FILE = IU_XRAY / "raw" / "nlmcxr_dicom_metadata.csv.gz"
CROSSWALK_FILE = IU_XRAY / "r2gen_to_openi_crosswalk.json"
OPENI_REPORTS_JSONL = IU_XRAY / "openi_reports.jsonl"
CXR_IMAGES = shared_data_dir() / "cxr_images"
REAL_JPEG = CXR_IMAGES / "torchxrayvision_test_images" / "16747_3_1.jpg"

MIMIC_CHEXPERT_COLUMNS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
"""Column order of `mimic-cxr-2.0.0-chexpert.csv` (alphabetical, unlike `CHEXPERT_OBSERVATIONS`)."""


def real_pngs() -> list[Path]:
    """The real chest X-ray PNGs available as stand-in pixels (sorted)."""
    return sorted((CXR_IMAGES / "covid19_mhh_hannover" / "png").glob("*.png")) + sorted(
        (CXR_IMAGES / "torchxrayvision_test_images").glob("*.png")
    )


def link_images(destinations: Iterable[Path], sources: Sequence[Path]) -> int:
    """Symlink each new destination to one of `sources` in turn (parents created); returns how many were made."""
    count = 0
    for destination in destinations:
        if destination.is_symlink() or destination.exists():
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(sources[count % len(sources)], destination)
        count += 1
    return count


def load_annotation() -> dict[str, list[dict]]:
    """The real R2Gen IU X-Ray annotation."""
    return json.loads(ANNOTATION_FILE.read_text(encoding="utf-8"))


def write_r2gen_layout(root: Path, annotation: dict[str, list[dict]], sources: Sequence[Path]) -> Path:
    """R2Gen layout in `root`: `annotation.json` + `images/<id>/<k>.png` for every listed image path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "annotation.json").write_text(json.dumps(annotation, ensure_ascii=False), encoding="utf-8")
    link_images(
        (
            root / "images" / path
            for entries in annotation.values()
            for entry in entries
            for path in entry["image_path"]
        ),
        sources,
    )
    return root


def openi_reports() -> list[dict]:
    """The parsed Open-I reports shipped next to the archive (uid, sections, images)."""
    with open(OPENI_REPORTS_JSONL, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def write_png_folder(folder: Path, image_ids: Iterable[str], sources: Sequence[Path]) -> Path:
    """An `NLMCXR_png`-like folder: `<image id>.png` for each id."""
    folder.mkdir(parents=True, exist_ok=True)
    link_images((folder / f"{image_id}.png" for image_id in image_ids), sources)
    return folder


def read_archive_members(names: Iterable[str]) -> dict[str, bytes]:
    """Selected members of the real `NLMCXR_reports.tgz` (e.g. `ecgen-radiology/1.xml`)."""
    wanted = set(names)
    members = {}
    with tarfile.open(REPORTS_ARCHIVE, "r:gz") as archive:
        for member in archive:
            if member.name in wanted:
                members[member.name] = archive.extractfile(member).read()
    return members


def write_report_archive(path: Path, members: dict[str, bytes]) -> Path:
    """A `.tgz` with the given members, like `NLMCXR_reports.tgz`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def truncate_file(source: Path, destination: Path, keep_fraction: float = 0.5) -> Path:
    """Copy the first part of `source` to `destination` (a truncated image)."""
    data = Path(source).read_bytes()
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.is_symlink() or destination.exists():
        destination.unlink()
    destination.write_bytes(data[: int(len(data) * keep_fraction)])
    return destination


@dataclass
class MimicStudy:
    """
    One generated MIMIC-CXR study: its images (dicom ids and ViewPosition), date, labels, report and split, and
    optionally its free-text report file (`report_file_text`, written as `files/p<NN>/p<subject>/s<study>.txt`).
    """

    subject_id: int
    study_id: int
    study_date: int
    study_time: float
    dicom_ids: list[str]
    view_positions: list[str]
    labels: dict[str, float | None] = field(default_factory=dict)
    report: str = "The lungs are clear. No pleural effusion or pneumothorax."
    split: str = "train"
    in_annotation: bool = True
    in_chexpert: bool = True
    report_file_text: str | None = None


def mimic_image_path(study: MimicStudy, dicom_id: str) -> str:
    """R2Gen's `image_path`: `p<first two digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg`."""
    return f"p{str(study.subject_id)[:2]}/p{study.subject_id}/s{study.study_id}/{dicom_id}.jpg"


def write_mimic_fixture(
    root: Path,
    studies: Sequence[MimicStudy],
    image_source: Path = REAL_JPEG,
    compress: bool = False,
    seed: int = 0,
    write_images: bool = True,
) -> Path:
    """
    Write `annotation.json`, `files/p../p../s../<dicom_id>.jpg` and the three `mimic-cxr-2.0.0-*.csv(.gz)` tables.

    Metadata rows are shuffled so that row order never gives the study order away. Images are symlinks to one real
    JPEG. Splits are written as R2Gen does in the annotation (`val`) and as MIMIC does in the split table
    (`validate`). A study's `report_file_text` is written where the extracted `mimic-cxr-reports.zip` puts it,
    `files/p<NN>/p<subject_id>/s<study_id>.txt`.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    annotation: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    metadata_rows, split_rows, chexpert_rows = [], [], []
    for study in studies:
        if study.report_file_text is not None:
            report_path = root / "files" / f"p{str(study.subject_id)[:2]}" / f"p{study.subject_id}"
            report_path.mkdir(parents=True, exist_ok=True)
            (report_path / f"s{study.study_id}.txt").write_text(study.report_file_text, encoding="utf-8")
        for dicom_id, view_position in zip(study.dicom_ids, study.view_positions):
            path = mimic_image_path(study, dicom_id)
            if study.in_annotation:
                annotation[study.split].append(
                    {
                        "id": dicom_id,
                        "study_id": study.study_id,
                        "subject_id": study.subject_id,
                        "report": study.report,
                        "image_path": [path],
                        "split": study.split,
                    }
                )
            if write_images:
                destination = root / "files" / path
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(image_source, destination)
            metadata_rows.append(
                {
                    "dicom_id": dicom_id,
                    "subject_id": study.subject_id,
                    "study_id": study.study_id,
                    "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
                    "ViewPosition": view_position,
                    "Rows": 3056,
                    "Columns": 2544,
                    "StudyDate": study.study_date,
                    "StudyTime": f"{study.study_time:.3f}",
                    "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                    "ViewCodeSequence_CodeMeaning": "postero-anterior" if view_position == "PA" else "lateral",
                    "PatientOrientationCodeSequence_CodeMeaning": "Erect",
                }
            )
            split_rows.append(
                {
                    "dicom_id": dicom_id,
                    "study_id": study.study_id,
                    "subject_id": study.subject_id,
                    "split": "validate" if study.split == "val" else study.split,
                }
            )
        if study.in_chexpert:
            chexpert_rows.append(
                {
                    "subject_id": study.subject_id,
                    "study_id": study.study_id,
                    **{name: study.labels.get(name) for name in MIMIC_CHEXPERT_COLUMNS},
                }
            )
    (root / "annotation.json").write_text(json.dumps(annotation), encoding="utf-8")
    metadata = pd.DataFrame(metadata_rows)
    metadata = metadata.iloc[rng.permutation(len(metadata))]
    suffix = ".csv.gz" if compress else ".csv"
    tables = {
        "mimic-cxr-2.0.0-metadata": metadata,
        "mimic-cxr-2.0.0-split": pd.DataFrame(split_rows),
        "mimic-cxr-2.0.0-chexpert": pd.DataFrame(
            chexpert_rows, columns=["subject_id", "study_id", *MIMIC_CHEXPERT_COLUMNS]
        ),
    }
    for name, table in tables.items():
        text = table.to_csv(index=False)
        if compress:
            with gzip.open(root / f"{name}{suffix}", "wt", encoding="utf-8") as handle:
                handle.write(text)
        else:
            (root / f"{name}{suffix}").write_text(text, encoding="utf-8")
    return root


def generate_mimic_studies(num_images: int, seed: int = 0) -> list[MimicStudy]:
    """
    About `num_images` generated images: patients with 1-4 studies of 1-2 images (PA + LATERAL), random dates and
    four-state labels, split by patient about 8:1:1.
    """
    rng = np.random.default_rng(seed)
    studies: list[MimicStudy] = []
    images = 0
    subject = 10000000
    study_id = 50000000
    label_values = np.array([1.0, 0.0, -1.0, np.nan])
    while images < num_images:
        subject += 1
        split = str(rng.choice(["train", "val", "test"], p=[0.8, 0.1, 0.1]))
        for _ in range(int(rng.integers(1, 5))):
            study_id += 1
            count = int(rng.integers(1, 3))
            dicom_ids = ["-".join(f"{int(value):08x}" for value in rng.integers(0, 2**32, 5)) for _ in range(count)]
            values = label_values[rng.integers(0, 4, len(MIMIC_CHEXPERT_COLUMNS))]
            studies.append(
                MimicStudy(
                    subject_id=subject,
                    study_id=study_id,
                    study_date=int(
                        21000101 + rng.integers(0, 9) * 10000 + rng.integers(0, 12) * 100 + rng.integers(0, 28)
                    ),
                    study_time=float(rng.integers(0, 24) * 10000 + rng.integers(0, 60) * 100 + rng.random() * 59),
                    dicom_ids=dicom_ids,
                    view_positions=["PA", "LATERAL"][:count],
                    labels={
                        name: (None if np.isnan(value) else float(value))
                        for name, value in zip(MIMIC_CHEXPERT_COLUMNS, values)
                    },
                    report=f"Study {study_id}: the lungs are clear. No pleural effusion. Heart size is normal.",
                    split=split,
                )
            )
            images += count
    return studies


__all__ = [
    "ANNOTATION_FILE",
    "CROSSWALK_FILE",
    "CXR_IMAGES",
    "DICOM_METADATA_FILE",
    "IU_XRAY",
    "MIMIC_CHEXPERT_COLUMNS",
    "OPENI_REPORTS_JSONL",
    "REAL_JPEG",
    "REPORTS_ARCHIVE",
    "SHARED_DATA_ENV",
    "MimicStudy",
    "generate_mimic_studies",
    "link_images",
    "load_annotation",
    "mimic_image_path",
    "openi_reports",
    "read_archive_members",
    "real_pngs",
    "shared_data_dir",
    "truncate_file",
    "write_mimic_fixture",
    "write_png_folder",
    "write_r2gen_layout",
    "write_report_archive",
]
