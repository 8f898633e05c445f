"""Open-I (IU X-Ray) inputs: report XML parsing, the view rule, and the R2Gen id <-> Open-I report matching.

View rule: DICOM "View Position" LL / RL / anything with LAT is `lateral`; PA / AP (and variants) is `frontal` only
when the study also has a lateral code or exactly one frontal code; everything else is `unknown`. A two-image study
whose caption names both a frontal and a lateral view gets the other view for its one unknown image.
"""

import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pandas as pd

from .annotation import iter_r2gen_annotation
from .base import (
    FRONTAL,
    LATERAL,
    PROBLEM_POLICIES,
    UNKNOWN_VIEW,
    CdanDataError,
    ProblemLog,
    normalize_whitespace,
    view_from_code,
)


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


def match_openi_entry(
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


def openi_prefix_index(reports: Iterable[OpenIReport]) -> dict[str, set[int]]:
    """Candidate R2Gen id (image name prefix) -> uids of the reports with such an image."""
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
    by_prefix = openi_prefix_index(reports_list)
    mapping = {}
    for key, index, entry in iter_r2gen_annotation(annotation_file):
        study_id = entry.get("id") if isinstance(entry, dict) else None
        report, image_ids, reason = match_openi_entry(str(study_id), str(entry.get("report", "")), by_prefix, reports)
        if report is None:
            raise CdanDataError(
                f"iu_xray: {reason} (study {study_id}, file {annotation_file}).", "unmatched_report", study_id
            )
        mapping[study_id] = {"uid": report.uid, "split": key, "files": [f"{image_id}.png" for image_id in image_ids]}
    return mapping


_FRONTAL_IN_CAPTION = re.compile(r"\b(pa|ap|frontal)\b", re.IGNORECASE)
_LATERAL_IN_CAPTION = re.compile(r"\blat(eral)?\b", re.IGNORECASE)


def iu_views_from_dicom(codes: Sequence[str], caption: str = "") -> list[str]:
    """
    Views of one Open-I study's images from their DICOM View Position codes and the study caption.

    See the view rule in the module docstring.

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


__all__ = [
    "OpenIReport",
    "frontal_first_order",
    "iter_openi_report_files",
    "iu_views_from_dicom",
    "match_openi_entry",
    "match_r2gen_to_openi",
    "openi_prefix_index",
    "parse_openi_report",
    "read_iu_view_positions",
    "read_openi_reports",
    "select_view_indices",
]
