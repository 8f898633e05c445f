"""The CDAN dataset builders (`data_cdan`): IU X-Ray in both layouts, MIMIC-CXR, demo, bad input, export (offline).

Report text is real (IU X-Ray / Open-I in ../shared); pixels are real chest X-ray PNGs from ../shared standing in for
the IU X-Ray images, which are not available. MIMIC-CXR inputs are generated in the exact MIMIC-CXR-JPG / R2Gen
formats (`data_cdan.testing`).
"""

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import HfApi
from PIL import Image

from data_cdan import (
    DEMO_REPORTS_FILE,
    CdanDataError,
    DemoBuilder,
    IuXrayBuilder,
    MimicCxrBuilder,
    check_study,
    export_to_parquet,
    get_cdan_builder,
    iter_r2gen_annotation,
    iu_views_from_dicom,
    load_cdan_dataset,
    match_r2gen_to_openi,
    push_to_hub,
    seeded_split,
    select_view_indices,
)
from data_cdan import iu_xray as iu_module
from data_cdan import mimic_cxr as mimic_module
from data_cdan.testing import (
    ANNOTATION_FILE,
    CROSSWALK_FILE,
    DICOM_METADATA_FILE,
    REPORTS_ARCHIVE,
    MimicStudy,
    load_annotation,
    openi_reports,
    read_archive_members,
    real_pngs,
    truncate_file,
    write_mimic_fixture,
    write_png_folder,
    write_r2gen_layout,
    write_report_archive,
)
from labeler_cdan import CHEXPERT_OBSERVATIONS, NEGATIVE, NOT_MENTIONED, POSITIVE, UNCERTAIN, label_report

datasets.disable_progress_bars()
R2GEN_SPLIT_SIZES = {"train": 2069, "validation": 296, "test": 590}


def paths_of(dataset: datasets.Dataset, column: str = "images") -> list[list[str]]:
    """Stored image paths of a split (without decoding)."""
    undecoded = dataset.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return [[image["path"] for image in images] for images in undecoded[column]]


def skipped(builder) -> dict:
    return json.loads(builder.skipped_file.read_text(encoding="utf-8"))


def prepare(name: str, cache_dir: Path, **options):
    builder = get_cdan_builder(name, cache_dir=cache_dir, **options)
    builder.download_and_prepare()
    return builder


# --------------------------------------------------------------------------------------------------------------------
# Shared inputs
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pngs() -> list[Path]:
    return real_pngs()


@pytest.fixture(scope="module")
def annotation() -> dict:
    return load_annotation()


@pytest.fixture(scope="module")
def crosswalk() -> dict[str, dict]:
    return {entry["id"]: entry for entry in json.loads(CROSSWALK_FILE.read_text(encoding="utf-8"))}


@pytest.fixture(scope="module")
def reports_by_uid() -> dict[int, dict]:
    return {report["uid"]: report for report in openi_reports()}


@pytest.fixture(scope="module")
def openi_png_dir(tmp_path_factory, pngs, reports_by_uid) -> Path:
    image_ids = [image["id"] for report in reports_by_uid.values() for image in report["images"]]
    return write_png_folder(tmp_path_factory.mktemp("openi") / "NLMCXR_png", image_ids, pngs)


@pytest.fixture(scope="module")
def r2gen_dataset(tmp_path_factory, annotation, pngs) -> datasets.DatasetDict:
    root = write_r2gen_layout(tmp_path_factory.mktemp("r2gen") / "iu_xray", annotation, pngs)
    return load_cdan_dataset("iu_xray", data_dir=root, cache_dir=root.parent / "cache", verify_images=False)


def prepare_openi(cache_dir: Path, images_dir: Path, **options) -> IuXrayBuilder:
    """IU X-Ray from the real Open-I report archive, image paths not verified."""
    return prepare(
        "iu_xray", cache_dir, reports_file=REPORTS_ARCHIVE, images_dir=images_dir, verify_images=False, **options
    )


@pytest.fixture(scope="module")
def openi_builder(tmp_path_factory, openi_png_dir) -> IuXrayBuilder:
    return prepare_openi(
        tmp_path_factory.mktemp("openi_cache"),
        openi_png_dir,
        annotation_file=ANNOTATION_FILE,
        dicom_metadata_file=DICOM_METADATA_FILE,
    )


@pytest.fixture(scope="module")
def openi_dataset(openi_builder) -> datasets.DatasetDict:
    return openi_builder.as_dataset()


@pytest.fixture(scope="module")
def seeded_builder(tmp_path_factory, openi_png_dir) -> IuXrayBuilder:
    return prepare_openi(tmp_path_factory.mktemp("seeded_cache"), openi_png_dir)


@pytest.fixture(scope="module")
def seeded_dataset(seeded_builder) -> datasets.DatasetDict:
    return seeded_builder.as_dataset()


def small_annotation(annotation: dict, per_split: int = 2) -> dict:
    """The first `per_split` entries of each R2Gen split (deep copy)."""
    return json.loads(json.dumps({split: entries[:per_split] for split, entries in annotation.items()}))


def small_openi(tmp_path: Path, pngs, reports_by_uid, count: int = 4, extra_members: dict | None = None):
    """A report archive with the first `count` Open-I reports that have findings and images, and their PNGs."""
    uids = [uid for uid, report in sorted(reports_by_uid.items()) if report["findings"] and report["images"]][:count]
    members = read_archive_members(f"ecgen-radiology/{uid}.xml" for uid in uids)
    members.update(extra_members or {})
    archive = write_report_archive(tmp_path / "NLMCXR_reports.tgz", members)
    image_ids = [image["id"] for uid in uids for image in reports_by_uid[uid]["images"]]
    png_dir = write_png_folder(tmp_path / "NLMCXR_png", image_ids, pngs)
    return uids, archive, png_dir


# --------------------------------------------------------------------------------------------------------------------
# IU X-Ray, R2Gen layout (annotation.json + images/<id>/<k>.png)
# --------------------------------------------------------------------------------------------------------------------
def test_r2gen_layout_reproduces_r2gen_split_sizes(r2gen_dataset):
    assert {split: len(dataset) for split, dataset in r2gen_dataset.items()} == R2GEN_SPLIT_SIZES


def test_r2gen_layout_findings_are_the_annotation_reports(r2gen_dataset, annotation):
    expected = {entry["id"]: entry["report"] for entries in annotation.values() for entry in entries}
    found = {
        study_id: findings
        for dataset in r2gen_dataset.values()
        for study_id, findings in zip(dataset["id"], dataset["findings"])
    }
    assert found == expected


def test_r2gen_layout_stores_image_paths_with_r2gen_view_convention(r2gen_dataset):
    train = r2gen_dataset["train"]
    stored = paths_of(train)
    assert all(
        [Path(path).relative_to(Path(path).parents[1]).as_posix() for path in paths]
        == [f"{sid}/0.png", f"{sid}/1.png"]
        for sid, paths in zip(train["id"], stored)
    )
    assert set(map(tuple, train["views"])) == {("frontal", "lateral")}


def test_r2gen_layout_images_decode_lazily_to_pil(r2gen_dataset):
    images = r2gen_dataset["test"][0]["images"]
    assert len(images) == 2 and all(isinstance(image, Image.Image) for image in images)


# --------------------------------------------------------------------------------------------------------------------
# IU X-Ray, Open-I layout (NLMCXR_reports.tgz + NLMCXR_png)
# --------------------------------------------------------------------------------------------------------------------
def test_openi_layout_with_annotation_reproduces_r2gen_split_sizes(openi_dataset):
    assert {split: len(dataset) for split, dataset in openi_dataset.items()} == R2GEN_SPLIT_SIZES


def test_openi_to_r2gen_mapping_equals_crosswalk(crosswalk):
    mapping = match_r2gen_to_openi(ANNOTATION_FILE, REPORTS_ARCHIVE)
    expected = {
        study_id: {"uid": entry["uid"], "split": entry["split"], "files": [i["file"] for i in entry["openi_images"]]}
        for study_id, entry in crosswalk.items()
    }
    assert mapping == expected


def test_openi_layout_studies_have_the_crosswalk_uid_and_images(openi_dataset, crosswalk):
    found = {}
    for dataset in openi_dataset.values():
        for study_id, uid, paths in zip(dataset["id"], dataset["openi_uid"], paths_of(dataset)):
            found[study_id] = (uid, sorted(Path(path).name for path in paths))
    expected = {
        study_id: (entry["uid"], sorted(image["file"] for image in entry["openi_images"]))
        for study_id, entry in crosswalk.items()
    }
    assert found == expected


def test_openi_layout_keeps_the_report_sections_verbatim(openi_dataset, reports_by_uid):
    dataset = openi_dataset["validation"]
    for row in dataset.select_columns(["openi_uid", "findings", "impression", "indication", "comparison"]):
        report = reports_by_uid[row["openi_uid"]]
        expected = {key: report[key] or None for key in ("impression", "indication", "comparison")}
        assert row["findings"] == report["findings"]
        assert {key: row[key] for key in expected} == expected


def test_openi_layout_lists_reports_outside_the_annotation_in_skipped_file(openi_builder):
    summary = skipped(openi_builder)
    assert summary["count"] == 1000 and summary["counts_by_reason"] == {"not_in_annotation": 1000}


def test_skipped_file_lies_next_to_the_prepared_data(openi_builder):
    assert openi_builder.skipped_file.parent == openi_builder.prepared_dir
    assert (openi_builder.prepared_dir / "dataset_info.json").is_file() and openi_builder.skipped_file.is_file()


def test_openi_layout_orders_images_frontal_first_from_dicom_view_position(openi_dataset, crosswalk):
    lateral_first = next(
        study_id
        for study_id, entry in crosswalk.items()
        if [image["view_position"] for image in entry["openi_images"]] == ["LL", "PA"]
    )
    split = {"train": "train", "val": "validation", "test": "test"}[crosswalk[lateral_first]["split"]]
    dataset = openi_dataset[split]
    index = dataset["id"].index(lateral_first)
    files = [image["file"] for image in crosswalk[lateral_first]["openi_images"]]
    assert dataset[index]["views"] == ["frontal", "lateral"]
    assert dataset[index]["view_positions"] == ["PA", "LL"]
    assert [Path(path).name for path in paths_of(dataset.select([index]))[0]] == [files[1], files[0]]


def test_iu_view_rule_trusts_lateral_codes_and_single_frontal_codes():
    assert iu_views_from_dicom(["PA", "LL"]) == ["frontal", "lateral"]
    assert iu_views_from_dicom(["PA", "PA"]) == ["unknown", "unknown"]
    assert iu_views_from_dicom(["", ""]) == ["unknown", "unknown"]
    assert iu_views_from_dicom(["PA", "PA", "LATERAL"]) == ["frontal", "frontal", "lateral"]
    assert iu_views_from_dicom(["AP", ""], caption="Xray Chest PA and Lateral") == ["frontal", "lateral"]
    assert iu_views_from_dicom(["AP", ""], caption="Chest x-ray") == ["frontal", "unknown"]


def test_max_images_keeps_first_frontal_and_first_lateral():
    assert select_view_indices(["unknown", "lateral", "frontal", "frontal"], 2) == [2, 1]


def test_iu_labels_come_from_the_labeler_over_findings_and_impression(openi_dataset):
    rows = openi_dataset["test"].select(range(60))
    for row in rows:
        text = "\n".join(part for part in (row["findings"], row["impression"]) if part)
        assert row["chexpert_labels"] == label_report(text)
    assert set(rows["label_source"]) == {"labeler_cdan"}


# --------------------------------------------------------------------------------------------------------------------
# Seeded 7:1:2 split without an annotation
# --------------------------------------------------------------------------------------------------------------------
def test_seeded_split_without_annotation_has_7_1_2_sizes(seeded_dataset, reports_by_uid):
    sizes = {split: len(dataset) for split, dataset in seeded_dataset.items()}
    total = sum(sizes.values())
    assert sizes["train"] == int(np.floor(0.7 * total + 0.5)) and sizes["validation"] == int(
        np.floor(0.1 * total + 0.5)
    )
    assert total == sum(1 for report in reports_by_uid.values() if report["findings"] and report["images"])


def test_seeded_split_puts_each_patient_in_one_split(seeded_dataset):
    uids = [set(dataset["openi_uid"]) for dataset in seeded_dataset.values()]
    assert sum(len(group) for group in uids) == len(set().union(*uids))
    assert all(
        study_id == f"CXR{uid}" for d in seeded_dataset.values() for study_id, uid in zip(d["id"], d["openi_uid"])
    )


def test_seeded_split_is_the_documented_permutation_of_sorted_uids(seeded_dataset):
    found = {uid: split for split, dataset in seeded_dataset.items() for uid in dataset["openi_uid"]}
    assert found == seeded_split(found, seed=42)


def test_seeded_split_changes_with_the_seed_only():
    ids = list(range(1000))
    assert seeded_split(ids, 42) == seeded_split(reversed(ids), 42)
    assert seeded_split(ids, 42) != seeded_split(ids, 7)


def test_min_images_2_selects_the_r2gen_studies(tmp_path, openi_png_dir, crosswalk):
    builder = prepare_openi(tmp_path, openi_png_dir, min_images=2)
    uids = {uid for dataset in builder.as_dataset().values() for uid in dataset["openi_uid"]}
    assert uids == {entry["uid"] for entry in crosswalk.values()}
    assert skipped(builder)["counts_by_reason"] == {"empty_findings": 530, "too_few_images": 470}


# --------------------------------------------------------------------------------------------------------------------
# Bad input: each problem under "error" (message names file and id) and "skip" (count + ids in skipped.json)
# --------------------------------------------------------------------------------------------------------------------
def r2gen_inputs(tmp_path: Path, annotation: dict, pngs) -> Path:
    return write_r2gen_layout(tmp_path / "iu_xray", annotation, pngs)


def test_missing_image_error_names_file_and_id(tmp_path, annotation, pngs):
    root = r2gen_inputs(tmp_path, small_annotation(annotation), pngs)
    missing = root / "images" / annotation["val"][1]["id"] / "1.png"
    missing.unlink()
    with pytest.raises(CdanDataError, match=re.escape(str(missing))) as error:
        prepare("iu_xray", tmp_path / "cache", data_dir=root)
    assert annotation["val"][1]["id"] in str(error.value)


def test_missing_image_skip_writes_count_and_ids(tmp_path, annotation, pngs):
    root = r2gen_inputs(tmp_path, small_annotation(annotation), pngs)
    study_id = annotation["val"][1]["id"]
    (root / "images" / study_id / "1.png").unlink()
    builder = prepare("iu_xray", tmp_path / "cache", data_dir=root, on_missing_image="skip")
    summary = skipped(builder)
    assert summary["count"] == 1 and [(r["id"], r["reason"]) for r in summary["skipped"]] == [
        (study_id, "missing_image")
    ]
    assert study_id not in builder.as_dataset()["validation"]["id"]


def test_truncated_png_error_names_file_and_id(tmp_path, annotation, pngs):
    root = r2gen_inputs(tmp_path, small_annotation(annotation), pngs)
    study_id = annotation["test"][0]["id"]
    broken = truncate_file(pngs[0], root / "images" / study_id / "0.png")
    with pytest.raises(CdanDataError, match=re.escape(str(broken))) as error:
        prepare("iu_xray", tmp_path / "cache", data_dir=root)
    assert study_id in str(error.value)


def test_truncated_png_skip_writes_count_and_ids(tmp_path, annotation, pngs):
    root = r2gen_inputs(tmp_path, small_annotation(annotation), pngs)
    study_id = annotation["test"][0]["id"]
    truncate_file(pngs[0], root / "images" / study_id / "0.png")
    builder = prepare("iu_xray", tmp_path / "cache", data_dir=root, on_bad_image="skip")
    summary = skipped(builder)
    assert summary["count"] == 1 and [(r["id"], r["reason"]) for r in summary["skipped"]] == [(study_id, "bad_image")]


BROKEN_XML = {"ecgen-radiology/99999.xml": b"<?xml version='1.0' encoding='utf-8'?><eCitation><uId id='CXR99999'/>"}


def test_unparsable_report_xml_error_names_member(tmp_path, pngs, reports_by_uid):
    _, archive, png_dir = small_openi(tmp_path, pngs, reports_by_uid, extra_members=BROKEN_XML)
    with pytest.raises(CdanDataError, match=r"ecgen-radiology/99999\.xml in .*NLMCXR_reports\.tgz"):
        prepare("iu_xray", tmp_path / "cache", reports_file=archive, images_dir=png_dir)


def test_unparsable_report_xml_skip_writes_count_and_ids(tmp_path, pngs, reports_by_uid):
    uids, archive, png_dir = small_openi(tmp_path, pngs, reports_by_uid, extra_members=BROKEN_XML)
    builder = prepare("iu_xray", tmp_path / "cache", reports_file=archive, images_dir=png_dir, on_bad_report="skip")
    summary = skipped(builder)
    assert summary["count"] == 1
    assert [(r["id"], r["reason"]) for r in summary["skipped"]] == [("ecgen-radiology/99999.xml", "bad_report")]
    assert sum(len(dataset) for dataset in builder.as_dataset().values()) == len(uids)


def with_duplicate(annotation: dict) -> dict:
    small = small_annotation(annotation)
    small["val"].append(dict(small["train"][0], split="val"))
    return small


def test_duplicate_id_error_names_id_and_file(tmp_path, annotation, pngs):
    root = r2gen_inputs(tmp_path, with_duplicate(annotation), pngs)
    study_id = annotation["train"][0]["id"]
    with pytest.raises(CdanDataError, match=re.escape(study_id)) as error:
        prepare("iu_xray", tmp_path / "cache", data_dir=root)
    assert str(root / "annotation.json") in str(error.value)


def test_duplicate_id_skip_keeps_first_and_writes_count_and_ids(tmp_path, annotation, pngs):
    root = r2gen_inputs(tmp_path, with_duplicate(annotation), pngs)
    study_id = annotation["train"][0]["id"]
    builder = prepare("iu_xray", tmp_path / "cache", data_dir=root, on_duplicate_id="skip")
    summary = skipped(builder)
    assert summary["count"] == 1 and [(r["id"], r["reason"]) for r in summary["skipped"]] == [
        (study_id, "duplicate_id")
    ]
    dataset = builder.as_dataset()
    assert study_id in dataset["train"]["id"] and study_id not in dataset["validation"]["id"]


def with_empty_findings(annotation: dict) -> dict:
    small = small_annotation(annotation)
    small["test"][1]["report"] = "  "
    return small


def test_empty_findings_error_names_id_and_file(tmp_path, annotation, pngs):
    root = r2gen_inputs(tmp_path, with_empty_findings(annotation), pngs)
    study_id = annotation["test"][1]["id"]
    with pytest.raises(CdanDataError, match=re.escape(study_id)) as error:
        prepare("iu_xray", tmp_path / "cache", data_dir=root, on_empty_findings="error")
    assert str(root / "annotation.json") in str(error.value)


def test_empty_findings_skip_is_the_default_and_writes_count_and_ids(tmp_path, annotation, pngs):
    root = r2gen_inputs(tmp_path, with_empty_findings(annotation), pngs)
    builder = prepare("iu_xray", tmp_path / "cache", data_dir=root)
    summary = skipped(builder)
    assert summary["count"] == 1
    assert [(r["id"], r["reason"]) for r in summary["skipped"]] == [(annotation["test"][1]["id"], "empty_findings")]


def with_unknown_split(annotation: dict) -> dict:
    small = small_annotation(annotation)
    small["dev"] = [dict(small["val"].pop(), split="dev")]
    return small


def test_unknown_split_error_names_id_and_file(tmp_path, annotation, pngs):
    root = r2gen_inputs(tmp_path, with_unknown_split(annotation), pngs)
    study_id = annotation["val"][1]["id"]
    with pytest.raises(CdanDataError, match=re.escape(study_id)) as error:
        prepare("iu_xray", tmp_path / "cache", data_dir=root)
    assert "'dev'" in str(error.value) and str(root / "annotation.json") in str(error.value)


def test_unknown_split_skip_writes_count_and_ids(tmp_path, annotation, pngs):
    root = r2gen_inputs(tmp_path, with_unknown_split(annotation), pngs)
    builder = prepare("iu_xray", tmp_path / "cache", data_dir=root, on_unknown_split="skip")
    summary = skipped(builder)
    assert summary["count"] == 1
    assert [(r["id"], r["reason"]) for r in summary["skipped"]] == [(annotation["val"][1]["id"], "unknown_split")]
    assert {split: len(dataset) for split, dataset in builder.as_dataset().items()} == {
        "train": 2,
        "validation": 1,
        "test": 2,
    }


def test_annotation_entry_without_openi_report_error_names_id(tmp_path, pngs, reports_by_uid, annotation):
    _, archive, png_dir = small_openi(tmp_path, pngs, reports_by_uid)
    (tmp_path / "annotation.json").write_text(json.dumps(small_annotation(annotation, 1)), encoding="utf-8")
    with pytest.raises(CdanDataError, match=re.escape(annotation["train"][0]["id"])):
        prepare(
            "iu_xray",
            tmp_path / "cache",
            reports_file=archive,
            images_dir=png_dir,
            annotation_file=tmp_path / "annotation.json",
        )


@pytest.mark.parametrize(
    "facts, expected",
    [
        ({"split": None, "split_name": "dev"}, ("unknown_split", "unknown split 'dev'")),
        ({"split": "train", "is_duplicate": True}, ("duplicate_id", "id s1 appears more than once")),
        ({"findings": " \n "}, ("empty_findings", "the findings are empty")),
        ({"findings": "Clear.", "image_count": 1, "min_images": 2}, ("too_few_images", "1 image(s), fewer than")),
        ({"split": "test", "findings": "Clear.", "image_count": 2, "min_images": 2}, None),
    ],
    ids=["unknown_split", "duplicate_id", "empty_findings", "too_few_images", "passes"],
)
def test_check_study_returns_the_first_problem_and_its_message(facts, expected):
    found = check_study("s1", **facts)
    if expected is None:
        assert found is None
    else:
        assert found[0] == expected[0] and found[1].startswith(expected[1])


@pytest.mark.parametrize("builder_module", [iu_module, mimic_module], ids=["iu_xray", "mimic_cxr"])
def test_annotation_is_parsed_once_for_all_three_splits(monkeypatch, tmp_path, annotation, pngs, builder_module):
    calls = []
    real_reader = builder_module.iter_r2gen_annotation

    def counting_reader(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real_reader(path, *args, **kwargs)

    monkeypatch.setattr(builder_module, "iter_r2gen_annotation", counting_reader)
    if builder_module is mimic_module:
        root = write_mimic_fixture(tmp_path / "mimic_cxr", mimic_studies())
        builder = prepare("mimic_cxr", tmp_path / "cache", data_dir=root)
    else:
        root = r2gen_inputs(tmp_path, small_annotation(annotation), pngs)
        builder = prepare("iu_xray", tmp_path / "cache", data_dir=root)
    assert all(split.num_examples for split in builder.info.splits.values())
    assert calls == ["annotation.json"]


def test_unknown_policy_value_is_rejected():
    with pytest.raises(ValueError, match="on_missing_image"):
        IuXrayBuilder(data_dir="unused", on_missing_image="ignore")


def test_malformed_annotation_json_error_names_file(tmp_path):
    path = tmp_path / "annotation.json"
    path.write_text('{"train": [{"id": "a", "report": "x"}, {"id": ', encoding="utf-8")
    with pytest.raises(CdanDataError, match=re.escape(str(path))):
        list(iter_r2gen_annotation(path))


def test_annotation_streaming_in_small_chunks_equals_json_load(annotation):
    streamed: dict[str, list] = {}
    for key, index, entry in iter_r2gen_annotation(ANNOTATION_FILE, chunk_chars=4096):
        assert index == len(streamed.setdefault(key, []))
        streamed[key].append(entry)
    assert streamed == annotation


def annotation_inputs(kind: str, tmp_path: Path, annotation_text: str, pngs, reports_by_uid) -> dict:
    """The options of a builder of `kind` whose annotation file holds `annotation_text` (inputs otherwise valid)."""
    if kind == "mimic_cxr":
        root = write_mimic_fixture(tmp_path / "mimic_cxr", mimic_studies()[:3])
        (root / "annotation.json").write_text(annotation_text, encoding="utf-8")
        return {"data_dir": root}
    if kind == "openi":
        _, archive, png_dir = small_openi(tmp_path, pngs, reports_by_uid)
        (tmp_path / "annotation.json").write_text(annotation_text, encoding="utf-8")
        return {"reports_file": archive, "images_dir": png_dir, "annotation_file": tmp_path / "annotation.json"}
    root = r2gen_inputs(tmp_path, {}, pngs)
    (root / "images").mkdir()
    (root / "annotation.json").write_text(annotation_text, encoding="utf-8")
    return {"data_dir": root}


@pytest.mark.parametrize("kind", ["r2gen", "openi", "mimic_cxr"])
@pytest.mark.parametrize("annotation_text", ["{}", '{"train": [], "val": [], "test": []}'], ids=["no_key", "empty"])
def test_annotation_without_studies_is_an_error_naming_the_file(tmp_path, pngs, reports_by_uid, kind, annotation_text):
    options = annotation_inputs(kind, tmp_path, annotation_text, pngs, reports_by_uid)
    name = "mimic_cxr" if kind == "mimic_cxr" else "iu_xray"
    with pytest.raises(CdanDataError, match="No studies found in " + re.escape(str(tmp_path))):
        prepare(name, tmp_path / "cache", **options)


def test_annotation_with_text_after_its_closing_brace_is_an_error_naming_file_and_offset(tmp_path, annotation):
    path = tmp_path / "annotation.json"
    text = json.dumps(small_annotation(annotation, 1))
    path.write_text(text + '\n{"train": []}', encoding="utf-8")
    with pytest.raises(CdanDataError, match="text after the closing") as error:
        list(iter_r2gen_annotation(path, chunk_chars=64))
    assert str(path) in str(error.value) and f"at character {len(text) + 1}" in str(error.value)


def test_annotation_followed_by_whitespace_only_is_read(tmp_path, annotation):
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps(small_annotation(annotation, 1)) + "\n \t\r\n", encoding="utf-8")
    assert [key for key, _, _ in iter_r2gen_annotation(path, chunk_chars=64)] == ["train", "val", "test"]


@pytest.mark.parametrize("kind", ["r2gen", "openi", "mimic_cxr"])
def test_entry_whose_split_field_disagrees_with_its_key_is_an_error_naming_both(
    tmp_path, annotation, pngs, reports_by_uid, kind
):
    if kind == "mimic_cxr":
        source = write_mimic_fixture(tmp_path / "source", mimic_studies()[:3], write_images=False)
        entries = json.loads((source / "annotation.json").read_text(encoding="utf-8"))
    else:
        entries = small_annotation(annotation, 1)
    entries["train"][0]["split"] = "test"
    options = annotation_inputs(kind, tmp_path, json.dumps(entries), pngs, reports_by_uid)
    if kind == "r2gen":
        write_r2gen_layout(options["data_dir"], entries, pngs)
    name = "mimic_cxr" if kind == "mimic_cxr" else "iu_xray"
    with pytest.raises(CdanDataError, match="split field 'test' disagrees with the key 'train'") as error:
        prepare(name, tmp_path / "cache", **options)
    assert entries["train"][0]["id"] in str(error.value) and error.value.problem == "unknown_split"


# --------------------------------------------------------------------------------------------------------------------
# UTF-8 and Parquet
# --------------------------------------------------------------------------------------------------------------------
NON_ASCII_FINDINGS = "Cœur de taille normale — pas d'épanchement pleural; nodule de 5 mm ± 1 (Ø)."


def test_non_ascii_report_text_round_trips_through_dataset_and_parquet(tmp_path, pngs, reports_by_uid):
    uid = next(uid for uid, report in sorted(reports_by_uid.items()) if report["findings"] and report["images"])
    original = read_archive_members([f"ecgen-radiology/{uid}.xml"])[f"ecgen-radiology/{uid}.xml"]
    edited = original.decode("utf-8").replace(reports_by_uid[uid]["findings"], NON_ASCII_FINDINGS).encode("utf-8")
    archive = write_report_archive(tmp_path / "NLMCXR_reports.tgz", {f"ecgen-radiology/{uid}.xml": edited})
    png_dir = write_png_folder(tmp_path / "NLMCXR_png", [i["id"] for i in reports_by_uid[uid]["images"]], pngs)
    dataset = prepare("iu_xray", tmp_path / "cache", reports_file=archive, images_dir=png_dir).as_dataset()
    [row_split] = [split for split, data in dataset.items() if len(data)]
    assert dataset[row_split][0]["findings"] == NON_ASCII_FINDINGS
    files = export_to_parquet(dataset, tmp_path / "parquet")
    reloaded = datasets.Dataset.from_parquet([str(p) for p in files[row_split]], cache_dir=str(tmp_path / "pq"))
    assert reloaded[0]["findings"] == NON_ASCII_FINDINGS


def test_export_to_parquet_round_trip_embeds_images(tmp_path, annotation, pngs):
    root = r2gen_inputs(tmp_path, small_annotation(annotation), pngs)
    dataset = load_cdan_dataset("iu_xray", data_dir=root, cache_dir=tmp_path / "cache")
    expected_pixels = np.asarray(dataset["train"][0]["images"][0])
    files = export_to_parquet(dataset, tmp_path / "export")
    for path in (root / "images").rglob("*.png"):
        path.unlink()
    for split, shard_files in files.items():
        assert [path.name for path in shard_files] == [f"{split}-00000-of-00001.parquet"]
        reloaded = datasets.Dataset.from_parquet([str(p) for p in shard_files], cache_dir=str(tmp_path / "pq"))
        assert reloaded.features == dataset[split].features
        assert reloaded.remove_columns("images").to_list() == dataset[split].remove_columns("images").to_list()
    reloaded_train = datasets.Dataset.from_parquet([str(p) for p in files["train"]], cache_dir=str(tmp_path / "pq"))
    assert np.array_equal(np.asarray(reloaded_train[0]["images"][0]), expected_pixels)


def assert_parquet_holds_dataset(parquet_files: dict[str, list[bytes]], dataset: datasets.DatasetDict) -> None:
    """The Parquet files of each split hold its rows in order, with each image's file bytes embedded unchanged."""
    assert sorted(parquet_files) == sorted(dataset)
    for split, files in parquet_files.items():
        table = pa.concat_tables(pq.read_table(pa.BufferReader(data)) for data in files)
        rows = table.to_pylist()
        expected = dataset[split].cast_column("images", datasets.List(datasets.Image(decode=False))).to_list()
        assert len(rows) == len(expected) > 0
        for row, expected_row in zip(rows, expected):
            assert {k: v for k, v in row.items() if k != "images"} == {
                k: v for k, v in expected_row.items() if k != "images"
            }
            stored = [image["bytes"] for image in row["images"]]
            assert stored == [Path(image["path"]).read_bytes() for image in expected_row["images"]]


def test_export_to_parquet_shards_keep_rows_splits_and_exact_image_bytes(tmp_path, annotation, pngs):
    root = r2gen_inputs(tmp_path, small_annotation(annotation), pngs)
    dataset = load_cdan_dataset("iu_xray", data_dir=root, cache_dir=tmp_path / "cache")
    files = export_to_parquet(dataset, tmp_path / "export", max_shard_size=1)  # one shard per study
    assert {split: len(paths) for split, paths in files.items()} == {"train": 2, "validation": 2, "test": 2}
    assert_parquet_holds_dataset({split: [p.read_bytes() for p in paths] for split, paths in files.items()}, dataset)


class StopBeforeCommit(Exception):
    """Raised where `push_to_hub` would start talking to the Hub about the commit, after building every file."""


def test_push_to_hub_builds_parquet_with_rows_splits_and_exact_image_bytes(monkeypatch, tmp_path, annotation, pngs):
    root = r2gen_inputs(tmp_path, small_annotation(annotation), pngs)
    dataset = load_cdan_dataset("iu_xray", data_dir=root, cache_dir=tmp_path / "cache")
    uploaded: dict[str, bytes] = {}

    def preupload_lfs_files(self, repo_id, additions, **kwargs):
        for addition in additions:
            uploaded[addition.path_in_repo] = Path(addition.path_or_fileobj).read_bytes()

    def stop(*args, **kwargs):
        raise StopBeforeCommit

    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo_id, **kwargs: SimpleNamespace(id=repo_id, sha="0" * 40))
    monkeypatch.setattr(HfApi, "preupload_lfs_files", preupload_lfs_files)
    monkeypatch.setattr(HfApi, "create_commit", stop)
    monkeypatch.setattr(datasets.dataset_dict, "HfFileSystem", stop)
    with pytest.raises(StopBeforeCommit):
        push_to_hub(dataset, "someone/iu-xray-cdan")
    assert sorted(uploaded) == [f"data/{split}-00000-of-00001.parquet" for split in ("test", "train", "validation")]
    assert_parquet_holds_dataset({path[5:].split("-")[0]: [data] for path, data in uploaded.items()}, dataset)


def test_push_to_hub_uploads_parquet_with_embedded_images(monkeypatch, r2gen_dataset):
    calls = []
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", lambda self, repo_id, **kw: calls.append((repo_id, kw)))
    push_to_hub(r2gen_dataset, "someone/iu-xray-cdan")
    assert calls == [
        (
            "someone/iu-xray-cdan",
            {"private": True, "token": None, "max_shard_size": "500MB", "embed_external_files": True},
        )
    ]


# --------------------------------------------------------------------------------------------------------------------
# MIMIC-CXR (generated fixture in the MIMIC-CXR-JPG + R2Gen formats)
# --------------------------------------------------------------------------------------------------------------------
def mimic_studies() -> list[MimicStudy]:
    def study(subject, study_id, date, time, views, split="train", **kwargs):
        dicom_ids = [f"{study_id:08x}-{k:08x}-0000aaaa-bbbbcccc-dddd{k:04x}" for k in range(len(views))]
        return MimicStudy(subject, study_id, date, time, dicom_ids, list(views), split=split, **kwargs)

    return [
        study(
            10000001,
            50000011,
            21800101,
            100000.0,
            ["PA"],
            labels={"Atelectasis": 1.0, "Cardiomegaly": 0.0, "Edema": -1.0, "Support Devices": 1.0},
        ),
        study(10000001, 50000012, 21800301, 90000.0, ["PA", "LATERAL"]),
        study(10000001, 50000013, 21800201, 80000.0, ["AP"]),
        study(10000002, 50000021, 21810101, 143000.0, ["LL"], split="val"),
        study(10000002, 50000022, 21810101, 80000.5, ["PA"], split="val"),
        study(10000003, 50000030, 21811231, 235959.0, ["PA", "LATERAL"], split="test", in_annotation=False),
        study(10000003, 50000031, 21820101, 120000.0, [""], split="test"),
        study(10000004, 50000041, 21830101, 120000.0, ["PA"], split="test", in_chexpert=False),
    ]


@pytest.fixture(scope="module")
def mimic_root(tmp_path_factory) -> Path:
    return write_mimic_fixture(tmp_path_factory.mktemp("mimic") / "mimic_cxr", mimic_studies(), compress=True)


@pytest.fixture(scope="module")
def mimic_builder(mimic_root) -> MimicCxrBuilder:
    return prepare("mimic_cxr", mimic_root.parent / "cache", data_dir=mimic_root)


@pytest.fixture(scope="module")
def mimic_rows(mimic_builder) -> dict[str, dict]:
    return {row["id"]: row for dataset in mimic_builder.as_dataset().values() for row in dataset.to_list()}


def test_mimic_has_one_example_per_annotation_image_in_its_split(mimic_builder):
    sizes = {split: len(dataset) for split, dataset in mimic_builder.as_dataset().items()}
    assert sizes == {"train": 4, "validation": 2, "test": 1}  # 50000041 has no CheXpert row: skipped by default


def test_mimic_prior_study_is_the_latest_strictly_earlier_study(mimic_rows):
    prior = {row["study_id"]: row["prior_study_id"] for row in mimic_rows.values()}
    assert prior == {
        50000011: None,
        50000013: 50000011,
        50000012: 50000013,
        50000022: None,
        50000021: 50000022,
        50000031: 50000030,
    }


def test_mimic_prior_image_paths_list_the_prior_study_images(mimic_rows, mimic_root):
    row = next(row for row in mimic_rows.values() if row["study_id"] == 50000031)
    expected = {
        str(
            mimic_root
            / "files"
            / "p10"
            / "p10000003"
            / "s50000030"
            / f"{50000030:08x}-{k:08x}-0000aaaa-bbbbcccc-dddd{k:04x}.jpg"
        )
        for k in range(2)
    }
    assert set(row["prior_image_paths"]) == expected
    assert all(row["prior_image_paths"] == [] for row in mimic_rows.values() if row["prior_study_id"] is None)


def test_mimic_labels_keep_four_states_in_chexpert_observation_order(mimic_rows):
    row = next(row for row in mimic_rows.values() if row["study_id"] == 50000011)
    expected = [NOT_MENTIONED] * len(CHEXPERT_OBSERVATIONS)
    for name, state in (
        ("Atelectasis", POSITIVE),
        ("Cardiomegaly", NEGATIVE),
        ("Edema", UNCERTAIN),
        ("Support Devices", POSITIVE),
    ):
        expected[CHEXPERT_OBSERVATIONS.index(name)] = state
    assert row["chexpert_labels"] == expected and row["label_source"] == "mimic-cxr-2.0.0-chexpert"


def test_mimic_views_come_from_view_position(mimic_rows):
    found = {(tuple(row["view_positions"]), tuple(row["views"])) for row in mimic_rows.values()}
    assert found == {
        (("PA",), ("frontal",)),
        (("LATERAL",), ("lateral",)),
        (("AP",), ("frontal",)),
        (("LL",), ("lateral",)),
        (("",), ("unknown",)),
    }


def test_mimic_study_missing_from_chexpert_table_is_skipped_and_listed(mimic_builder):
    summary = skipped(mimic_builder)
    assert summary["count"] == 1 and summary["skipped"][0]["reason"] == "missing_labels"
    assert summary["skipped"][0]["id"].startswith(f"{50000041:08x}")


def test_mimic_missing_labels_can_fall_back_to_the_labeler(tmp_path, mimic_root):
    builder = prepare("mimic_cxr", tmp_path, data_dir=mimic_root, on_missing_labels="labeler")
    [row] = [row for row in builder.as_dataset()["test"] if row["study_id"] == 50000041]
    assert row["label_source"] == "labeler_cdan" and row["chexpert_labels"] == label_report(row["findings"])


def test_mimic_reads_uncompressed_tables(tmp_path):
    root = write_mimic_fixture(tmp_path / "mimic_cxr", mimic_studies()[:3], compress=False)
    builder = prepare("mimic_cxr", tmp_path / "cache", data_dir=root)
    assert len(builder.as_dataset()["train"]) == 4 and not list(root.glob("*.gz"))


def test_mimic_image_missing_from_metadata_error_names_id_and_table(tmp_path):
    studies = mimic_studies()[:3]
    root = write_mimic_fixture(tmp_path / "mimic_cxr", studies)
    metadata = root / "mimic-cxr-2.0.0-metadata.csv"
    lines = metadata.read_text(encoding="utf-8").splitlines(keepends=True)
    removed = studies[1].dicom_ids[1]
    metadata.write_text("".join(line for line in lines if not line.startswith(removed)), encoding="utf-8")
    with pytest.raises(CdanDataError, match=re.escape(removed)) as error:
        prepare("mimic_cxr", tmp_path / "cache", data_dir=root)
    assert str(metadata) in str(error.value)


def test_mimic_tables_reach_the_splits_through_gen_kwargs_not_the_builder(tmp_path, mimic_root):
    builder = get_cdan_builder("mimic_cxr", data_dir=mimic_root, cache_dir=tmp_path)
    generators = builder._split_generators(dl_manager=None)
    tables = generators[0].gen_kwargs["tables"]
    assert isinstance(tables, mimic_module.MimicTables)
    assert all(generator.gen_kwargs["tables"] is tables for generator in generators)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tables.images_dir = tmp_path
    builder.download_and_prepare()
    table_like = (np.ndarray, pa.Array, pa.ChunkedArray, pa.Table, mimic_module.MimicTables)
    assert [name for name, value in vars(builder).items() if isinstance(value, table_like)] == []


def test_mimic_split_entry_files_are_removed_after_prepare_also_on_error(tmp_path):
    root = write_mimic_fixture(tmp_path / "mimic_cxr", mimic_studies()[:3], compress=False)
    prepare("mimic_cxr", tmp_path / "cache", data_dir=root)
    annotation_file = root / "annotation.json"
    annotation = json.loads(annotation_file.read_text(encoding="utf-8"))
    annotation["train"].append(dict(annotation["train"][0]))
    annotation_file.write_text(json.dumps(annotation), encoding="utf-8")
    with pytest.raises(CdanDataError, match="more than once"):
        prepare("mimic_cxr", tmp_path / "cache_error", data_dir=root)
    assert list(tmp_path.glob("cache*/mimic_cxr-entries-*")) == []


def test_push_to_hub_refuses_mimic(mimic_builder):
    with pytest.raises(ValueError, match="MIMIC-CXR may not be redistributed"):
        push_to_hub(mimic_builder.as_dataset(), "someone/mimic")


# --------------------------------------------------------------------------------------------------------------------
# Demo (data/demo/reports.jsonl shipped in the repository, synthetic images)
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_builder(tmp_path_factory) -> DemoBuilder:
    return prepare("demo", tmp_path_factory.mktemp("demo_cache"), max_studies_per_split=3)


@pytest.fixture(scope="module")
def demo_dataset(demo_builder) -> datasets.DatasetDict:
    return demo_builder.as_dataset()


def test_demo_subset_builds_every_split_marked_synthetic(demo_dataset):
    assert {split: len(dataset) for split, dataset in demo_dataset.items()} == {"train": 3, "validation": 3, "test": 3}
    assert all(all(dataset["synthetic"]) for dataset in demo_dataset.values())


def test_demo_has_the_iu_xray_columns_plus_synthetic_boxes_and_priors(demo_builder, openi_builder):
    from data_cdan import BOX_FEATURES

    assert demo_builder.info.features == datasets.Features(
        {
            **openi_builder.info.features,
            "synthetic": datasets.Value("bool"),
            "boxes": datasets.List(BOX_FEATURES),
            "prior_images": datasets.List(datasets.Image()),
            "prior_views": datasets.List(datasets.Value("string")),
            "prior_view_positions": datasets.List(datasets.Value("string")),
            "prior_labels": datasets.List(datasets.Value("int8"), length=14),
        }
    )


def test_demo_reports_are_the_shipped_text_labelled_by_the_labeler(demo_dataset):
    with open(DEMO_REPORTS_FILE, encoding="utf-8") as lines:
        shipped = {record["r2gen_id"]: record for record in map(json.loads, lines)}
    for row in demo_dataset["train"]:
        record = shipped[row["id"]]
        assert row["findings"] == record["findings"].strip()
        text = "\n".join(part.strip() for part in (record["findings"], record["impression"]) if part and part.strip())
        assert row["chexpert_labels"] == label_report(text)


def test_demo_images_are_pngs_in_the_prepared_folder(demo_builder, demo_dataset):
    stored = paths_of(demo_dataset["validation"])
    assert all(Path(path).parent == demo_builder.prepared_dir / "images" for paths in stored for path in paths)
    images = demo_dataset["validation"][0]["images"]
    assert [(image.format, image.mode, image.size) for image in images] == [("PNG", "L", (256, 256))] * 2
    assert demo_dataset["validation"][0]["views"] == ["frontal", "lateral"]


def test_a_misspelt_builder_option_is_named_with_the_close_matches(tmp_path):
    with pytest.raises(TypeError, match="no option 'on_missing_images'.*'on_missing_image'"):
        get_cdan_builder("iu_xray", data_dir=tmp_path, on_missing_images="skip")


def test_a_cache_dir_that_is_a_file_is_a_clear_error(tmp_path):
    cache_file = tmp_path / "cache"
    cache_file.write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        get_cdan_builder("demo", cache_dir=cache_file)
