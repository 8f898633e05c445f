"""The detector's box file (`read_box_file`), the IU X-Ray and MIMIC-CXR builders' `boxes_file` option, and the
pipeline detector -> `scripts/predict_boxes.py` -> builder."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_cdan import CdanDataError, LesionBox, boxes_from_rows, load_cdan_dataset
from data_cdan.boxes import read_box_file
from data_cdan.testing import MimicStudy, write_mimic_fixture
from detection_cdan import DetectionSample, build_detector, save_detector, write_box_file
from scripts.predict_boxes import main as predict_boxes_main


IMAGE_WIDTH, IMAGE_HEIGHT = 64, 48
STUDY_IDS = {"train": ["CXR1_1_IM-0001", "CXR2_1_IM-0002"], "val": ["CXR3_1_IM-0003"], "test": ["CXR4_1_IM-0004"]}


def write_png(path: Path, seed: int, size: tuple[int, int] = (IMAGE_WIDTH, IMAGE_HEIGHT)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path)
    return path


@pytest.fixture(scope="module")
def iu_root(tmp_path_factory) -> Path:
    """A tiny IU X-Ray in R2Gen's layout: 2 / 1 / 1 studies of two 64x48 PNGs."""
    root = tmp_path_factory.mktemp("iu") / "iu_xray"
    annotation = {split: [] for split in STUDY_IDS}
    for seed, (split, study_id) in enumerate((split, study) for split, ids in STUDY_IDS.items() for study in ids):
        paths = [f"{study_id}/{index}.png" for index in range(2)]
        for index, path in enumerate(paths):
            write_png(root / "images" / path, seed=10 * seed + index)
        report = "The heart is normal in size. The lungs are clear."
        annotation[split].append({"id": study_id, "report": report, "image_path": paths, "split": split})
    (root / "annotation.json").write_text(json.dumps(annotation), encoding="utf-8")
    return root


def box_line(study_id: str, image_index: int, image_size: list[int], boxes: list[LesionBox]) -> str:
    record = {"study_id": study_id, "split": "train", "image_index": image_index, "view": "frontal"}
    return json.dumps({**record, "image_size": image_size, "boxes": [box.to_row() for box in boxes]})


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_same_boxes(stored: list[dict], expected: list[LesionBox]) -> None:
    boxes = boxes_from_rows(stored)
    assert [(box.label, box.source) for box in boxes] == [(box.label, box.source) for box in expected]
    for box, wanted in zip(boxes, expected):
        assert box.xyxy == pytest.approx(wanted.xyxy, abs=1e-4)
        assert box.score == pytest.approx(wanted.score, abs=1e-6)


PSEUDO_BOX = LesionBox(4.0, 6.0, 30.5, 40.25, label="Nodule", score=0.75, source="pseudo")
SECOND_BOX = LesionBox(10.0, 2.0, 20.0, 12.0, label="Effusion", score=0.5, source="pseudo")


# --------------------------------------------------------------------------------------------------------------------
# read_box_file
# --------------------------------------------------------------------------------------------------------------------


def test_read_box_file_reads_what_write_box_file_writes(tmp_path):
    samples = [
        DetectionSample(torch.zeros(48, 64, dtype=torch.uint8), torch.zeros(0, 4), torch.zeros(0), key)
        for key in ({"study_id": "a", "image_index": 0}, {"study_id": "a", "image_index": 1})
    ]
    predictions = [
        {"boxes": torch.tensor([SECOND_BOX.xyxy, PSEUDO_BOX.xyxy]), "labels": torch.tensor([2, 1]),
         "scores": torch.tensor([SECOND_BOX.score, PSEUDO_BOX.score])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)},
    ]  # fmt: skip
    write_box_file(tmp_path / "boxes.jsonl", samples, predictions, ["Nodule", "Effusion"])
    entries = read_box_file(tmp_path / "boxes.jsonl")
    assert list(entries) == [("a", 0), ("a", 1)]
    assert entries[("a", 0)][0] == (64, 48) and entries[("a", 1)] == ((64, 48), [])
    assert_same_boxes([box.to_row() for box in entries[("a", 0)][1]], [PSEUDO_BOX, SECOND_BOX])  # best score first


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a", 0]', "expected a JSON object"),
        ('{"study_id": "a", "image_index": 1, "boxes": []}', "'image_size' missing"),
        ('{"study_id": "a", "image_index": -1, "image_size": [64, 48], "boxes": []}', "image_index -1"),
        ('{"study_id": "a", "image_index": 1, "image_size": [64], "boxes": []}', "image_size \\[64\\]"),
        ('{"study_id": "a", "image_index": 1, "image_size": [64, 48], "boxes": [{"x_min": 1}]}', "box #0"),
        ('{"study_id": "a", "image_index": 0, "image_size": [64, 48], "boxes": []}', "already given on line 1"),
    ],
)
def test_a_malformed_box_file_line_is_an_error_naming_its_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "boxes.jsonl", [box_line("a", 0, [64, 48], [PSEUDO_BOX]), "", bad_line])
    with pytest.raises(CdanDataError, match=f"line 3: .*{message}"):
        read_box_file(path)


def test_a_missing_box_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(CdanDataError, match="nowhere.jsonl does not exist"):
        read_box_file(tmp_path / "nowhere.jsonl")


# --------------------------------------------------------------------------------------------------------------------
# IU X-Ray builder
# --------------------------------------------------------------------------------------------------------------------


def test_iu_builder_without_boxes_file_has_no_boxes_column(iu_root, tmp_path):
    dataset = load_cdan_dataset("iu_xray", data_dir=iu_root, cache_dir=tmp_path)
    assert "boxes" not in dataset["train"].column_names


def test_iu_builder_boxes_file_gives_a_boxes_column_per_image(iu_root, tmp_path):
    first, second = STUDY_IDS["train"]
    lines = [
        box_line(first, 0, [IMAGE_WIDTH, IMAGE_HEIGHT], [PSEUDO_BOX, SECOND_BOX]),
        box_line(first, 1, [2 * IMAGE_WIDTH, 2 * IMAGE_HEIGHT], [PSEUDO_BOX]),  # a copy twice as large: rescaled
        box_line("CXR999_1_IM-9999", 0, [IMAGE_WIDTH, IMAGE_HEIGHT], [SECOND_BOX]),  # not in the data set: unused
    ]
    box_file = write_lines(tmp_path / "boxes.jsonl", lines)
    dataset = load_cdan_dataset("iu_xray", data_dir=iu_root, cache_dir=tmp_path / "cache", boxes_file=box_file)
    rows = {row["id"]: row for split in dataset.values() for row in split}
    assert_same_boxes(rows[first]["boxes"][0], [PSEUDO_BOX, SECOND_BOX])
    halved = LesionBox(*(value / 2 for value in PSEUDO_BOX.xyxy), label="Nodule", score=0.75, source="pseudo")
    assert_same_boxes(rows[first]["boxes"][1], [halved])
    assert rows[second]["boxes"] == [[], []]
    assert all(len(row["boxes"]) == len(row["images"]) for row in rows.values())


def test_iu_builder_refuses_boxes_of_an_image_of_another_aspect_ratio(iu_root, tmp_path):
    box_file = write_lines(tmp_path / "boxes.jsonl", [box_line(STUDY_IDS["test"][0], 1, [64, 64], [SECOND_BOX])])
    with pytest.raises(CdanDataError, match="another aspect ratio"):
        load_cdan_dataset("iu_xray", data_dir=iu_root, cache_dir=tmp_path / "cache", boxes_file=box_file)


def test_iu_builder_refuses_boxes_of_an_image_the_row_does_not_have(iu_root, tmp_path):
    box_file = write_lines(tmp_path / "boxes.jsonl", [box_line(STUDY_IDS["val"][0], 2, [64, 48], [SECOND_BOX])])
    with pytest.raises(CdanDataError, match="image 2 of study CXR3_1_IM-0003, which has 2 image"):
        load_cdan_dataset("iu_xray", data_dir=iu_root, cache_dir=tmp_path / "cache", boxes_file=box_file)


# --------------------------------------------------------------------------------------------------------------------
# MIMIC-CXR builder
# --------------------------------------------------------------------------------------------------------------------


def test_mimic_builder_boxes_file_gives_a_boxes_column(tmp_path):
    image = write_png(tmp_path / "source.png", seed=1)
    studies = [
        MimicStudy(10000001, 50000001, 21000101, 120000.0, ["d-train-pa", "d-train-lat"], ["PA", "LATERAL"]),
        MimicStudy(10000002, 50000002, 21000102, 120000.0, ["d-val"], ["PA"], split="val"),
        MimicStudy(10000003, 50000003, 21000103, 120000.0, ["d-test"], ["PA"], split="test"),
    ]
    root = write_mimic_fixture(tmp_path / "mimic_cxr", studies, image_source=image)
    box_file = write_lines(tmp_path / "boxes.jsonl", [box_line("d-train-pa", 0, [64, 48], [PSEUDO_BOX])])
    dataset = load_cdan_dataset("mimic_cxr", data_dir=root, cache_dir=tmp_path / "cache", boxes_file=box_file)
    rows = {row["id"]: row for split in dataset.values() for row in split}
    assert set(rows) == {"d-train-pa", "d-train-lat", "d-val", "d-test"}
    assert_same_boxes(rows["d-train-pa"]["boxes"][0], [PSEUDO_BOX])
    assert [row["boxes"] for key, row in sorted(rows.items()) if key != "d-train-pa"] == [[[]], [[]], [[]]]


# --------------------------------------------------------------------------------------------------------------------
# Detector -> predict_boxes.py -> builder
# --------------------------------------------------------------------------------------------------------------------


def test_predicted_box_file_feeds_the_builder(iu_root, tmp_path):
    torch.manual_seed(0)
    labels = ["Nodule", "Effusion"]
    save_detector(build_detector(len(labels), image_size=64), tmp_path / "detector", labels, image_size=64)
    box_file = tmp_path / "predicted" / "boxes.jsonl"
    arguments = ["--detector_dir", str(tmp_path / "detector"), "--output_file", str(box_file)]
    arguments += ["--dataset", "iu_xray", "--data_dir", str(iu_root), "--cache_dir", str(tmp_path / "cache")]
    counts = predict_boxes_main(arguments + ["--batch_size", "3"])
    entries = read_box_file(box_file)
    assert counts["images"] == len(entries) == 8 and counts["boxes"] > 0
    dataset = load_cdan_dataset("iu_xray", data_dir=iu_root, cache_dir=tmp_path / "cache", boxes_file=box_file)
    for row in (row for split in dataset.values() for row in split):
        for image_index, stored in enumerate(row["boxes"]):
            image_size, boxes = entries[(row["id"], image_index)]
            assert image_size == (IMAGE_WIDTH, IMAGE_HEIGHT)
            assert_same_boxes(stored, boxes)
